"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this folder is on
``sys.path``)."""
from __future__ import annotations

import numpy as np


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row positions of a class-stratified subset of ``n`` rows (all rows when n = 0)."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    take[: n - take.sum()] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(rows))
