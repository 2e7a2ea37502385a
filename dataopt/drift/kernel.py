"""Kernel two-sample tests on embeddings: MMD² (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012)
with a Gaussian (RBF) kernel whose bandwidth is the median heuristic, and its per-class version.

The permutation null is computed in one pass: with the pooled kernel matrix ``K`` (N = m + n) and
a weight vector ``w`` (+1/m on reference rows, -1/n on batch rows), the biased MMD² is ``w' K w``.
Each permutation only permutes ``w``; stacking B permuted vectors as the rows of ``W`` (B, N) gives
every null statistic from one matrix product ``K @ W.T``, never re-indexing ``K``. The p-value
counts the observed statistic as one draw of the null: ``(1 + k) / (1 + B)``, exact under H0.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from dataopt.drift.result import DriftResult, benjamini_hochberg, need, take
from dataopt.registry import DRIFT_TESTS

MEDIAN_ROWS = 1000  # rows whose pairwise distances set the median-heuristic bandwidth


def mmd_permutation(x: np.ndarray, y: np.ndarray, permutations: int,
                    rng: np.random.Generator) -> tuple[float, float, np.ndarray]:
    """``(unbiased MMD², permutation p-value, witness of each y row)`` of reference ``x`` vs batch ``y``.

    The witness of a batch row is the mean kernel to the batch minus the mean kernel to the reference:
    high where the batch has mass the reference lacks ("looks new")."""
    m, n = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float32)
    sq = (z * z).sum(1)
    k = z @ z.T  # numpy's BLAS: on small inputs torch's per-op overhead dominated
    k *= -2.0
    k += sq[:, None]
    k += sq[None, :]
    np.maximum(k, 0.0, out=k)  # squared distances
    sub = take(z, MEDIAN_ROWS, rng)
    d2 = k[np.ix_(sub, sub)]
    med = float(np.median(d2[~np.eye(len(sub), dtype=bool)])) if len(sub) > 1 else 1.0
    k *= -1.0 / (2.0 * max(med, 1e-12))
    np.exp(k, out=k)  # RBF with sigma^2 = median squared distance
    w0 = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    perms = np.argsort(rng.random((permutations, m + n)), axis=1)
    w = np.vstack([w0, w0[perms]]).astype(np.float32)  # (B + 1, N), row 0 observed
    stats = ((k @ w.T) * w.T).sum(0)  # biased MMD² of each row
    p = (1 + int((stats[1:] >= stats[0] - 1e-6 * abs(stats[0])).sum())) / (1 + permutations)
    kxx, kyy, kxy = float(k[:m, :m].sum()), float(k[m:, m:].sum()), float(k[:m, m:].sum())
    # unbiased: drop the diagonal (k(x, x) = 1) from the within-sample means
    mmd2 = (kxx - m) / max(m * (m - 1), 1) + (kyy - n) / max(n * (n - 1), 1) - 2 * kxy / (m * n)
    witness = k[m:, m:].mean(1) - k[m:, :m].mean(1)
    return float(mmd2), float(p), witness


@DRIFT_TESTS.register("mmd")
class MMD:
    """Kernel MMD² between reference and batch embeddings, with a permutation p-value.

    The reference is subsampled to ``max_reference`` rows (and the batch to ``max_batch``): the
    pooled kernel is (m + n)², so this bounds time and memory. Effect size: the unbiased MMD² (0 when
    the distributions match; at most 2 for an RBF kernel). Breakdown: each batch row's witness value
    (``looks_new``; rows left out by ``max_batch`` get NaN).
    """

    requires = ("embeddings",)

    def __init__(self, *, alpha: float = 0.05, permutations: int = 500, max_reference: int = 2000,
                 max_batch: Optional[int] = 2000, random_state: int = 0):
        self.alpha = alpha
        self.permutations = permutations
        self.max_reference = max_reference
        self.max_batch = max_batch
        self.random_state = random_state

    def fit(self, reference: Mapping, batch: Mapping) -> "MMD":
        rng = np.random.default_rng(self.random_state)
        x, y = need(reference, "embeddings", "reference"), need(batch, "embeddings", "batch")
        xi, yi = take(x, self.max_reference, rng), take(y, self.max_batch, rng)
        mmd2, p, witness = mmd_permutation(x[xi], y[yi], self.permutations, rng)
        looks_new = np.full(len(y), np.nan)
        looks_new[yi] = witness
        decision = p <= self.alpha
        why = (f"MMD²={mmd2:.4g} on {len(xi)} reference vs {len(yi)} batch rows, "
               f"p={p:.3g} over {self.permutations} permutations: "
               + ("the embeddings differ" if decision else "no evidence the embeddings differ"))
        self.result_ = DriftResult("mmd", mmd2, p, max(mmd2, 0.0), bool(decision), why, len(x), len(y),
                                   self.alpha, {"looks_new": looks_new})
        return self


@DRIFT_TESTS.register("per_class_mmd")
class PerClassMMD:
    """MMD² per class present in both the reference and the batch (by their labels), with
    Benjamini–Hochberg across the classes. The p-value of the whole test is the smallest BH-adjusted
    one (Simes' test of "no class shifted"). Classes with fewer than ``min_class_rows`` rows on either
    side are reported, not tested. Effect size: the largest per-class MMD²."""

    requires = ("embeddings", "labels")

    def __init__(self, *, alpha: float = 0.05, permutations: int = 500, max_per_class: int = 500,
                 min_class_rows: int = 5, random_state: int = 0):
        self.alpha = alpha
        self.permutations = permutations
        self.max_per_class = max_per_class
        self.min_class_rows = min_class_rows
        self.random_state = random_state

    def fit(self, reference: Mapping, batch: Mapping) -> "PerClassMMD":
        rng = np.random.default_rng(self.random_state)
        x, y = need(reference, "embeddings", "reference"), need(batch, "embeddings", "batch")
        lx, ly = need(reference, "labels", "reference"), need(batch, "labels", "batch")
        classes = np.union1d(np.unique(lx), np.unique(ly))
        rows = []
        for c in classes:
            xc, yc = x[lx == c], y[ly == c]
            if min(len(xc), len(yc)) < self.min_class_rows:
                rows.append((c, len(xc), len(yc), np.nan, np.nan))
                continue
            xc, yc = xc[take(xc, self.max_per_class, rng)], yc[take(yc, self.max_per_class, rng)]
            mmd2, p, _ = mmd_permutation(xc, yc, self.permutations, rng)
            rows.append((c, int((lx == c).sum()), int((ly == c).sum()), mmd2, p))
        cls, n_ref, n_bat, mmd2, p = (np.array(v) for v in zip(*rows))
        tested = ~np.isnan(p)
        p_bh = np.full(len(cls), np.nan)
        p_bh[tested] = benjamini_hochberg(p[tested])
        shifted = np.where(tested, p_bh <= self.alpha, False)
        p_all = float(np.nanmin(p_bh)) if tested.any() else 1.0
        effect = float(max(np.nanmax(mmd2), 0.0)) if tested.any() else 0.0
        names = [str(c) for c in cls[shifted]]
        why = (f"{tested.sum()} classes tested (BH at {self.alpha:g}): "
               + (f"class(es) {', '.join(names)} shifted" if names else "no class shifted")
               + (f"; {(~tested).sum()} class(es) too small to test" if (~tested).any() else ""))
        self.result_ = DriftResult("per_class_mmd", float(np.nanmax(mmd2)) if tested.any() else 0.0,
                                   p_all, effect, bool(p_all <= self.alpha), why, len(x), len(y),
                                   self.alpha, {"class": cls, "n_reference": n_ref, "n_batch": n_bat,
                                                "mmd2": mmd2, "p_value": p, "p_bh": p_bh, "shifted": shifted})
        return self
