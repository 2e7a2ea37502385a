"""Drift report plots (matplotlib Figure, Agg, no pyplot; PNGs that render offline): the reference vs
batch projection, per-class shift bars, each test's adjusted p-value, and the most new-looking batch
images as a grid."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from dataopt.io import atomic_path


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def projection_png(path: str | Path, reference: np.ndarray, batch: np.ndarray,
                   looks_new: Optional[np.ndarray] = None, max_points: int = 3000, seed: int = 0) -> None:
    """2-D PCA of the reference and batch embeddings (the PCA fitted on the reference): batch points
    coloured by their "looks new" score when there is one."""
    rng = np.random.default_rng(seed)
    ri = rng.choice(len(reference), min(len(reference), max_points), replace=False)
    bi = rng.choice(len(batch), min(len(batch), max_points), replace=False)
    pca = PCA(2, random_state=seed).fit(np.asarray(reference[ri], np.float32))
    r2, b2 = pca.transform(np.asarray(reference[ri], np.float32)), pca.transform(np.asarray(batch[bi], np.float32))
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    ax.scatter(r2[:, 0], r2[:, 1], s=6, c="#bbbbbb", label=f"reference ({len(reference)})", linewidths=0)
    if looks_new is not None and np.isfinite(looks_new[bi]).any():
        sc = ax.scatter(b2[:, 0], b2[:, 1], s=10, c=looks_new[bi], cmap="viridis", linewidths=0,
                        label=f"batch ({len(batch)})")
        fig.colorbar(sc, ax=ax, label="looks new (classifier two-sample test)")
    else:
        ax.scatter(b2[:, 0], b2[:, 1], s=10, c="#d62728", linewidths=0, label=f"batch ({len(batch)})")
    ax.set_title("embeddings: reference vs batch (PCA of the reference)")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def class_shift_png(path: str | Path, class_names: Sequence[str], reference_share: np.ndarray,
                    batch_share: np.ndarray, per_class_mmd: Optional[np.ndarray] = None) -> None:
    """Per class: the share of the reference and of the batch (bars), and the class's MMD² when the
    per-class test ran (second panel)."""
    n = len(class_names)
    panels = 2 if per_class_mmd is not None else 1
    fig = Figure(figsize=(max(6.0, 0.5 * n + 2), 3.2 * panels))
    ax = fig.add_subplot(panels, 1, 1)
    x = np.arange(n)
    ax.bar(x - 0.2, reference_share, 0.4, label="reference", color="#888888")
    ax.bar(x + 0.2, batch_share, 0.4, label="batch", color="#d62728")
    ax.set_xticks(x, labels=list(class_names), rotation=90 if n > 12 else 0)
    ax.set_ylabel("share of rows")
    ax.set_title("class proportions (given labels)")
    ax.legend(fontsize=8)
    if per_class_mmd is not None:
        ax2 = fig.add_subplot(panels, 1, 2)
        ax2.bar(x, np.nan_to_num(per_class_mmd, nan=0.0), color="#1f77b4")
        ax2.set_xticks(x, labels=list(class_names), rotation=90 if n > 12 else 0)
        ax2.set_ylabel("MMD² within the class")
        ax2.set_title("per-class embedding shift (blank: too few rows to test)")
    fig.tight_layout()
    _save(fig, path)


def p_values_png(path: str | Path, adjusted_p: Mapping[str, float], decided: Mapping[str, bool],
                 alpha: float) -> None:
    """-log10 of each test's Holm-adjusted p-value; red where the test decided drift."""
    names = list(adjusted_p)
    score = [-np.log10(max(adjusted_p[n], 1e-300)) for n in names]
    fig = Figure(figsize=(6.5, 0.45 * len(names) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    ax.barh(y, score, color=["#d62728" if decided[n] else "#888888" for n in names])
    ax.axvline(-np.log10(alpha), color="black", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    ax.set_yticks(y, labels=names)
    ax.set_xlabel("-log10 Holm-adjusted p-value (right of the line: significant)")
    ax.set_title("drift tests (red: drift, significant and above the effect floor)")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def image_grid_png(path: str | Path, images: np.ndarray, titles: Sequence[str], columns: int = 8) -> None:
    """The given uint8 images in a grid, each with its title (e.g. the most new-looking rows)."""
    n = max(len(images), 1)
    rows = int(np.ceil(n / columns))
    fig = Figure(figsize=(1.4 * columns, 1.6 * rows))
    for i, im in enumerate(images):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(im, interpolation="nearest")
        ax.set_title(titles[i], fontsize=6)
        ax.axis("off")
    if not len(images):
        fig.add_subplot().text(0.5, 0.5, "no batch row scored", ha="center")
    fig.suptitle("batch rows that look most unlike the reference", fontsize=9)
    _save(fig, path)
