"""Evaluation plots: a confusion-matrix PNG (matplotlib, Agg) and JSON rows for DVC plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dataopt.io import atomic_path


def confusion_png(path: str | Path, cm: np.ndarray, class_names: Sequence[str]) -> None:
    """Write the row-normalised confusion matrix (rows = true class) with raw counts in the cells."""
    # a bare Figure renders through the Agg canvas without pyplot: headless, no global backend switch
    from matplotlib.figure import Figure  # why: matplotlib is slow to import and only plots need it

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
