"""Evaluation plots (matplotlib, Agg, no pyplot): confusion matrix, per-class accuracy, reliability
diagram and training curve, as the PNGs that `dvc plots show` and MLflow display."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
# a bare Figure renders through the Agg canvas without pyplot: headless, no global backend switch
from matplotlib.figure import Figure

from dataopt.io import atomic_path


def confusion_png(path: str | Path, cm: np.ndarray, class_names: Sequence[str]) -> None:
    """Write the row-normalised confusion matrix (rows = true class) with raw counts in the cells."""
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    frac = cm / np.maximum(rows, 1)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    if n <= 30:  # counts stay legible up to ~30 classes
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _save(fig, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def per_class_png(path: str | Path, class_names: Sequence[str], accuracy: Sequence[float | None],
                  train_counts: Sequence[int]) -> None:
    """Horizontal bars of test accuracy per class: class names on the y axis (first class on top),
    accuracy on x, the class's training images written beside its bar; a class without test
    samples gets no bar and the note "no test sample"."""

    n = len(class_names)
    acc = np.array([np.nan if a is None else a for a in accuracy], dtype=np.float64)
    fig = Figure(figsize=(7, min(30.0, 1.2 + 0.32 * n)))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(acc), color="#4c78a8")
    ax.set_yticks(y, labels=list(class_names))
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.15)
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("class")
    for i, (a, c) in enumerate(zip(acc, train_counts)):
        note = f"{a:.3f}  (train {int(c)})" if np.isfinite(a) else f"no test sample  (train {int(c)})"
        ax.text((a if np.isfinite(a) else 0.0) + 0.01, i, note, va="center", fontsize=7)
    ax.set_title("accuracy per class (test)")
    _save(fig, path)


def reliability_png(path: str | Path, rel: dict[str, np.ndarray], ece: float) -> None:
    """Reliability diagram: accuracy against mean confidence per equal-width confidence bin, the
    diagonal of perfect calibration, and the share of test samples per bin underneath."""

    lower, upper = np.asarray(rel["lower"]), np.asarray(rel["upper"])
    count = np.asarray(rel["count"])
    fig = Figure(figsize=(5.5, 6))
    ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(lower[filled], np.asarray(rel["accuracy"])[filled], width=(upper - lower)[filled],
           align="edge", color="#4c78a8", edgecolor="white", label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.plot(np.asarray(rel["confidence"])[filled], np.asarray(rel["accuracy"])[filled], "o",
            color="#e45756", markersize=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (test), ECE {ece:.4f}")
    ax.legend(fontsize=8, loc="upper left")
    axc.bar(lower, count / max(1, count.sum()), width=upper - lower, align="edge", color="#9d9d9d")
    axc.set_xlabel("confidence")
    axc.set_ylabel("share")
    _save(fig, path)


def training_curve_png(path: str | Path, history: Sequence[dict]) -> None:
    """Training loss per epoch (left axis) and, when the history records it, the learning rate."""

    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    ax.plot(epochs, [r["loss"] for r in history], "o-", color="#4c78a8", label="training loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    if all("lr" in r for r in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [r["lr"] for r in history], color="#9d9d9d", linewidth=1, label="lr")
        ax2.set_ylabel("learning rate", color="#6d6d6d")
    last = history[-1]
    ax.set_title(f"training: {len(history)} epochs, {int(last.get('samples_seen', 0))} samples seen, "
                 f"{float(last.get('seconds', 0.0)):.1f} s")
    _save(fig, path)
