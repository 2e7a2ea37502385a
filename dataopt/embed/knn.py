"""Exact k-nearest-neighbour search in faiss, blockwise, with every row's own entry removed."""
from __future__ import annotations

import faiss
import numpy as np

from dataopt.errors import DataError

KNN_BLOCK = 8192  # queries per faiss search call: bounds the (block x k) result buffers


def knn_search(x: np.ndarray, k: int, block: int = KNN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of every row of ``x`` (exact Euclidean search).

    A row is never its own neighbour, also when exact duplicates of it exist: each query asks faiss
    for ``k + 1`` results and drops the one that is the query itself, or, when the query is not among
    them (more than ``k`` duplicates tie at distance 0), the last one.

    Parameters
    ----------
    x : (n, d) float array (cast to float32)
    k : int
        Neighbours per row; must be <= n - 1.
    block : int
        Queries per search call.

    Returns
    -------
    indices : (n, k) int64, positions into ``x``, nearest first
    distances : (n, k) float32 Euclidean distances, ascending
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n - 1:
        raise DataError(f"kNN needs 1 <= k <= n - 1; got k={k} for n={n} rows")
    index = faiss.IndexFlatL2(d)
    index.add(x)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for s in range(0, n, block):
        q = x[s : s + block]
        m = len(q)
        d2, idx = index.search(q, k + 1)
        drop = idx == np.arange(s, s + m)[:, None]
        drop[~drop.any(axis=1), -1] = True  # exactly one dropped entry per row
        keep = ~drop
        indices[s : s + m] = idx[keep].reshape(m, k)
        # faiss returns squared distances computed as |a|^2 + |b|^2 - 2ab: clamp tiny negatives
        distances[s : s + m] = np.sqrt(np.maximum(d2[keep].reshape(m, k), 0.0))
    return indices, distances
