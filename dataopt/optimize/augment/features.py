"""Feature-space augmentation for head-only training (issue 6 consumes these): Gaussian noise, SMOTE.

Both are pure functions on embeddings; the ``gaussian_noise`` and ``smote`` augmenters only record in
the plan that they are on (``plan.json`` ``augment.features``).
"""
from __future__ import annotations

from typing import Mapping, Optional

import faiss
import numpy as np
import torch

from dataopt.errors import ConfigError, DataError


def gaussian_noise(embeddings: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Add isotropic Gaussian noise to a batch of embeddings.

    Parameters
    ----------
    embeddings : (B, d) float tensor
    sigma : standard deviation of the noise (embeddings are L2-normalised, so 0.01 - 0.1 is typical)
    gen : CPU generator the noise is drawn from (deterministic for its seed)

    Returns
    -------
    (B, d) float tensor on the device of ``embeddings``
    """
    noise = torch.randn(embeddings.shape, generator=gen, dtype=torch.float32)
    return embeddings.float() + sigma * noise.to(embeddings.device)


def smote_targets(labels: np.ndarray, target: str | float = "max") -> np.ndarray:
    """Per-class target counts for :func:`smote`: ``"max"`` = the largest class count, or a share
    in (0, 1] of it (``0.5`` brings every class up to half the largest).

    Returns
    -------
    (n_classes,) int64, indexed by label value
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    share = 1.0 if target == "max" else float(target)
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"smote target must be 'max' or a share in (0, 1], got {target!r}")
    return np.maximum(counts, np.round(share * counts.max()).astype(np.int64))


def smote(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int,
    target_counts: Mapping[int, int] | np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE: synthetic minority samples interpolated between same-class neighbours.

    Chawla et al. 2002, "SMOTE", §4.2: for a minority sample x, pick one of its k nearest neighbours
    x' of the same class and emit ``x + u (x' - x)``, ``u ~ U[0, 1]``. Base samples are drawn uniformly
    (with replacement) from the class, so any number of synthetic rows can be made.

    Parameters
    ----------
    embeddings : (n, d) float
    labels : (n,) int
    k : neighbours per sample (capped at class size - 1)
    target_counts : class -> wanted count (array indexed by label, or mapping); classes already at or
        above their target get no synthetic row
    rng : numpy Generator

    Returns
    -------
    synthetic : (m, d) float32 new rows (the inputs are not included)
    synthetic_labels : (m,) int64
    """
    z = np.ascontiguousarray(embeddings, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise DataError(f"smote: embeddings {z.shape} and labels {y.shape} do not match")
    if k < 1:
        raise ConfigError(f"smote k must be >= 1, got {k}")
    targets = (dict(enumerate(np.asarray(target_counts).tolist()))
               if not isinstance(target_counts, Mapping) else dict(target_counts))
    out_z, out_y = [], []
    for c, want in sorted(targets.items()):  # loop over classes, vectorised within a class
        rows = np.flatnonzero(y == c)
        need = int(want) - rows.size
        if need <= 0 or rows.size == 0:
            continue
        zc = z[rows]
        if rows.size == 1:  # no neighbour: the class can only be copied
            out_z.append(np.repeat(zc, need, axis=0))
            out_y.append(np.full(need, c, dtype=np.int64))
            continue
        kk = min(k, rows.size - 1)
        index = faiss.IndexFlatL2(zc.shape[1])
        index.add(zc)
        _, nn = index.search(zc, kk + 1)
        # drop self (the first hit, or wherever it appears when duplicates tie)
        not_self = nn != np.arange(rows.size)[:, None]
        order = np.argsort(~not_self, axis=1, kind="stable")
        nn = np.take_along_axis(nn, order, axis=1)[:, :kk]
        base = rng.integers(0, rows.size, need)
        partner = nn[base, rng.integers(0, kk, need)]
        u = rng.random((need, 1)).astype(np.float32)
        out_z.append(zc[base] + u * (zc[partner] - zc[base]))
        out_y.append(np.full(need, c, dtype=np.int64))
    if not out_z:
        return np.zeros((0, z.shape[1]), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_z).astype(np.float32), np.concatenate(out_y)
