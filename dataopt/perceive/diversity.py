"""Geometry of a set of embeddings: diversity (the Vendi score, Friedman & Dieng 2023) and the distance
to the class centre (paper 002 §3)."""
from __future__ import annotations

import numpy as np
from sklearn.utils.extmath import randomized_svd


VENDI_MAX_RANK = 512  # eigenvalues computed exactly up to this rank; wider sets use a randomized SVD


def vendi_score(x: np.ndarray, max_rank: int = VENDI_MAX_RANK) -> float:
    """Vendi score with the cosine-similarity kernel: ``exp(-sum_k l_k log l_k)`` over the eigenvalues
    ``l_k`` of ``K / n``, ``K = X_hat X_hat^T`` (rows of ``x`` L2-normalised).

    The effective number of distinct samples: 1 for identical vectors, ``n`` for orthogonal ones.
    ``K / n`` and ``X_hat^T X_hat / n`` share their non-zero eigenvalues, so the smaller Gram is used:
    ``O(n min(n, d)^2)`` time, never an ``n x n`` matrix when ``n > d``.

    Parameters
    ----------
    x : (n, d) float vectors (zero rows are ignored)

    When ``min(n, d) > max_rank`` (5,000 rows of 8,192 whitened_patches coordinates: a 5,000 x 5,000
    eigendecomposition per class, minutes on 2 cores) only the ``max_rank`` largest eigenvalues are
    computed (randomized SVD, seeded) and the spectrum's remaining mass (the eigenvalues sum to 1) is
    spread evenly over the other ``min(n, d) - max_rank``: exact for an even tail, and close whenever the
    leading components hold nearly all of the mass, as embeddings' do.

    Returns
    -------
    float in ``[1, min(n, d)]``; 0.0 for an empty set.
    """
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1)
    x = x[norms > 0] / norms[norms > 0, None]
    n = len(x)
    if n == 0:
        return 0.0
    if min(n, x.shape[1]) > max_rank:
        lam = randomized_svd(x, max_rank, n_iter=3, random_state=0)[1] ** 2 / n
        rest, tail = min(n, x.shape[1]) - max_rank, max(0.0, 1.0 - float(lam.sum()))
        lam = np.concatenate([lam, np.full(rest, tail / rest)])
    else:
        gram = (x @ x.T) if n <= x.shape[1] else (x.T @ x)
        lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def class_centre_distance(embeddings: np.ndarray, labels: np.ndarray,
                          block: int = 16384) -> np.ndarray:
    """Euclidean distance of each embedding to the mean embedding of its class.

    Parameters
    ----------
    embeddings : (n, d) float
    labels : (n,) int

    Returns
    -------
    (n,) float64
    """
    z = np.asarray(embeddings, dtype=np.float32)
    classes, inv = np.unique(labels, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.searchsorted(inv[order], np.arange(classes.size))
    centres = np.add.reduceat(z[order], starts, axis=0, dtype=np.float64)
    centres = (centres / np.bincount(inv)[:, None]).astype(np.float32)
    out = np.empty(len(z), dtype=np.float64)
    for s in range(0, len(z), block):  # blocks of rows bound the (block, d) temporary
        diff = z[s:s + block] - centres[inv[s:s + block]]
        out[s:s + block] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out
