"""Exact and near duplicates as groups: connected components of the kNN graph's short edges.

Two rows are joined when one lists the other among its ``k`` nearest neighbours at distance
``<= threshold``; a group is a connected component of two or more rows. Exact duplicates are the
components of the edges at distance exactly 0 (``knn_graph`` recomputes distances from the rows, so
identical vectors are at 0). Because only kNN edges are seen, a set of more than ``k + 1`` mutual
duplicates is still one group as long as their neighbour lists link up (ties are returned in row
order by faiss, so identical copies do).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dataopt.errors import ConfigError, DataError

MAX_GROUPS = 1000  # groups listed in duplicates.json (the counts always cover all of them)


def component_groups(indices: np.ndarray, edge: np.ndarray) -> list[np.ndarray]:
    """Row positions of every connected component of >= 2 rows over the kNN edges where ``edge``.

    Parameters
    ----------
    indices : (n, k) int64 neighbour positions
    edge : (n, k) bool, which neighbour entries are edges

    Returns
    -------
    list of int64 arrays (ascending positions), largest group first, ties by smallest position.
    """
    n = len(indices)
    rows = np.broadcast_to(np.arange(n)[:, None], indices.shape)[edge]
    cols = indices[edge]
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(label)
    member = np.flatnonzero(sizes[label] >= 2)
    if not len(member):
        return []
    # positions sorted by (component, position), cut where the component changes
    member = member[np.argsort(label[member], kind="stable")]
    cuts = np.flatnonzero(np.diff(label[member])) + 1
    groups = np.split(member, cuts)
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def duplicate_groups(
    indices: np.ndarray,
    distances: np.ndarray,
    threshold: float,
    sample_ids: Optional[np.ndarray] = None,
    max_groups: int = MAX_GROUPS,
) -> dict[str, Any]:
    """Near-duplicate (distance <= ``threshold``) and exact-duplicate (distance 0) groups.

    Parameters
    ----------
    indices : (n, k) int64 neighbour positions (``knn.npz`` ``indices``)
    distances : (n, k) float Euclidean distances (``knn.npz`` ``distances``)
    threshold : float >= 0, largest distance of a near duplicate
    sample_ids : (n,) int64, optional; names row i in the groups (default: the positions)
    max_groups : int, groups listed per kind (the counts cover all)

    Returns
    -------
    dict for ``embed/duplicates.json``: ``threshold``, ``n_groups``, ``n_samples_in_groups``,
    ``groups`` (lists of sample ids, each ascending; largest group first), ``truncated``, and the same
    counts and groups for exact duplicates under ``exact``.
    """
    indices = np.asarray(indices)
    distances = np.asarray(distances)
    if indices.shape != distances.shape or indices.ndim != 2:
        raise DataError(f"kNN indices {indices.shape} and distances {distances.shape} must be the same (n, k)")
    if not threshold >= 0:
        raise ConfigError(f"embed.near_duplicate_threshold must be >= 0; got {threshold}")
    ids = np.arange(len(indices), dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, np.int64)
    if len(ids) != len(indices):
        raise DataError(f"{len(ids)} sample ids for {len(indices)} kNN rows")

    def report(edge: np.ndarray) -> dict[str, Any]:
        groups = component_groups(indices, edge)
        return {
            "n_groups": len(groups),
            "n_samples_in_groups": int(sum(len(g) for g in groups)),
            "groups": [np.sort(ids[g]).tolist() for g in groups[:max_groups]],
            "truncated": len(groups) > max_groups,
        }

    near = report(distances <= threshold)
    return {"threshold": float(threshold), "max_groups": int(max_groups), **near,
            "exact": report(distances == 0)}
