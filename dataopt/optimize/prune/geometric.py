"""Geometric static selectors on the embeddings: herding, k-center greedy, semantic de-duplication.

The two greedy selectors add one sample per step (the steps are inherently sequential); each step
is one matrix-vector product over the candidates in torch (float32). Above ``dim`` dimensions the
embeddings are first projected on their top ``dim`` principal components (exact PCA of the
candidates' covariance), which keeps a 50k x 512 selection within seconds on 2 cores: one step
reads ``n x dim`` floats instead of ``n x d``.
"""
from __future__ import annotations

from typing import Optional

import faiss
import numpy as np
import torch

from dataopt.errors import ConfigError
from dataopt.optimize.prune.base import Budget, finish, fmt, groups, join, quotas, top_m
from dataopt.registry import SELECTORS


def _project(z: np.ndarray, dim: Optional[int]):
    """Candidates' embeddings as a float32 torch tensor, on their top ``dim`` principal components
    when ``d > dim`` (centred; distances and mean-matching are translation invariant)."""
    x = torch.as_tensor(np.ascontiguousarray(z, dtype=np.float32))
    if dim is None or x.shape[1] <= int(dim):
        return x
    xc = x - x.mean(0, keepdim=True)
    cov = (xc.T.double() @ xc.double()) / max(len(x) - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return (xc @ vecs[:, -int(dim):].float()).contiguous()


def _check_dim(dim: Optional[int], who: str) -> None:
    if dim is not None and int(dim) < 1:
        raise ConfigError(f"{who}: dim must be >= 1 or null, got {dim}")


def herding_order(x, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy herding (Welling, ICML 2009; Chen et al., UAI 2010 "kernel herding", linear kernel):
    step t adds the sample that brings the running mean of the selected rows closest to the mean
    ``mu`` of all rows.

    ``argmin_i ||mu - (S_t + x_i) / (t+1)||^2 = argmax_i x_i . v_t - ||x_i||^2 / 2`` with
    ``v_t = (t+1) mu - S_t``; ``v_{t+1} = v_t + mu - x_sel``, so the scores update with one
    matrix-vector product per step.

    Parameters
    ----------
    x : (a, d) float32 torch tensor
    m : int

    Returns
    -------
    order (m,) int64 positions in selection order; gap (m,) float64 ``||mean(selected) - mu||`` after
    each step.
    """
    mu = x.double().mean(0).float()
    s = x @ mu - 0.5 * (x * x).sum(1)  # scores at t = 0 (v_0 = mu)
    c = x @ mu
    out = np.empty(m, dtype=np.int64)
    for t in range(m):  # one step per selected sample (sequential by definition)
        j = int(torch.argmax(s))
        out[t] = j
        s.add_(c).addmv_(x, x[j], alpha=-1.0)
        s[j] = -float("inf")
    sel = x[torch.as_tensor(out)].double()
    running = torch.cumsum(sel, 0) / torch.arange(1, m + 1, dtype=torch.float64)[:, None]
    gap = torch.linalg.norm(running - mu.double(), dim=1).numpy()
    return out, gap


def kcenter_order(x, m: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy (Sener & Savarese, ICLR 2018, Algorithm 1): start from ``first``, then
    repeatedly add the row farthest from its nearest selected centre; the min-distances are updated
    incrementally (one matrix-vector product per step).

    Parameters
    ----------
    x : (a, d) float32 torch tensor
    m : int
    first : int

    Returns
    -------
    order (m,) int64; radius (m,) float64: the covering radius ``max_i min_c ||x_i - c||`` just
    before each pick (the distance of the picked row to the earlier centres; inf for the first).
    """
    sq = (x * x).sum(1)
    mind = torch.full((len(x),), float("inf"))
    out = np.empty(m, dtype=np.int64)
    radius = np.empty(m, dtype=np.float64)
    j = int(first)
    for t in range(m):  # one centre per step (sequential by definition)
        out[t] = j
        radius[t] = float(mind[j])
        d = (sq + sq[j]).addmv_(x, x[j], alpha=-2.0)
        torch.minimum(mind, d, out=mind)
        mind[j] = -1.0  # never picked again
        j = int(torch.argmax(mind))
    return out, np.sqrt(np.maximum(radius, 0.0))


class _Greedy:
    requires = ("labels", "embeddings")

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0, dim: Optional[int] = 64):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state
        self.dim = dim

    def _run(self, labels, embeddings, keep):
        """(budget, chosen (a,) bool, step (a,) int: 1-based pick order within the group, 0 = not
        picked, group (a,), value (a,) float64: the per-pick diagnostic)."""
        _check_dim(self.dim, self.registered_name)
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        group = groups(labels, b.rows, self.per_class)
        m_g = quotas(np.bincount(group), b.m)
        emb = np.asarray(embeddings)
        rng = np.random.default_rng(self.random_state)
        step = np.zeros(b.rows.size, dtype=np.int64)
        value = np.full(b.rows.size, np.nan)
        with torch.no_grad():
            for g in range(m_g.size):  # loop over classes (or one group)
                idx = np.flatnonzero(group == g)
                if m_g[g] == 0:
                    continue
                x = _project(emb[b.rows[idx]], self.dim)
                order, val = self._order(x, int(m_g[g]), rng)
                step[idx[order]] = np.arange(1, order.size + 1)
                value[idx[order]] = val
        return b, step > 0, step, group, value


@SELECTORS.register("herding")
class Herding(_Greedy):
    """Herding selection (Welling, ICML 2009; as a coreset: Chen et al., UAI 2010; Rebuffi et al.,
    iCaRL, CVPR 2017): greedily add the sample that brings the running mean of the selected
    embeddings closest to the mean of all candidates (of its class when ``per_class``). See
    :func:`herding_order`.

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random`` (herding is deterministic).
    dim : int or None
        Project on the top ``dim`` principal components first when the embedding is wider
        (speed, see the module doc); None = the full embedding.
    """

    def _order(self, x, m, rng):
        return herding_order(x, m)

    def fit(self, labels: np.ndarray, embeddings: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "Herding":
        """``labels`` (n,), ``embeddings`` (n, d) -> ``keep_`` (n,) bool, ``score_`` = pick step."""
        b, chosen, step, group, gap = self._run(labels, embeddings, keep)
        kept = join("herding pick ", step.astype(str), ", mean gap ", fmt(gap, "%.4g"),
                    " after it")
        dropped = "not needed to match the mean within the budget"
        final = [float(gap[(group == g) & (step == step[group == g].max())][0])
                 for g in range(group.max() + 1) if (step[group == g] > 0).any()]
        finish(self, b, chosen, np.where(chosen, step, np.inf).astype(np.float64), kept, dropped,
               {"per_class": bool(self.per_class), "dim": self.dim,
                "final_mean_gap": float(max(final)) if final else None})
        return self


@SELECTORS.register("kcenter")
class KCenterGreedy(_Greedy):
    """k-center greedy coreset (Sener & Savarese, ICLR 2018, §4.2 / Algorithm 1): farthest-point
    traversal of the embeddings (per class when ``per_class``), starting from a seeded random row.
    See :func:`kcenter_order`.

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random``.
    dim : int or None
        As for ``herding``.
    """

    def _order(self, x, m, rng):
        return kcenter_order(x, m, int(rng.integers(len(x))))

    def fit(self, labels: np.ndarray, embeddings: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "KCenterGreedy":
        """``labels`` (n,), ``embeddings`` (n, d) -> ``keep_`` (n,) bool, ``score_`` = pick step."""
        b, chosen, step, group, radius = self._run(labels, embeddings, keep)
        kept = join("k-center pick ", step.astype(str), ", distance to earlier centres ",
                    fmt(radius, "%.4g"))
        finish(self, b, chosen, np.where(chosen, step, np.inf).astype(np.float64), kept,
               "covered by the kept centres", {"per_class": bool(self.per_class), "dim": self.dim})
        return self


@SELECTORS.register("semantic_dedup")
class SemanticDedup:
    """SemDeDup (Abbas et al., 2023, §3): k-means on the embeddings (faiss, seeded); within each
    cluster, samples are ordered by decreasing distance to the centroid and a sample whose cosine
    similarity with an earlier one exceeds ``1 - eps`` is a near duplicate (the earlier one is
    kept). Without a budget the near duplicates are dropped; with ``ratio`` / ``n_keep`` the
    ``m`` least redundant samples are kept (redundancy = the highest cosine with an earlier sample
    of its cluster), so duplicates go first and the budget is filled or trimmed by redundancy.

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random`` (``per_class``: quotas when trimming).
    eps : float
        Duplicate threshold on ``1 - cosine``.
    n_clusters : int or None
        k of k-means; None = ``max(1, round(candidates / 500))``.
    niter : int
        k-means iterations.
    """

    requires = ("labels", "embeddings")

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0, eps: float = 0.05,
                 n_clusters: Optional[int] = None, niter: int = 20):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state
        self.eps = eps
        self.n_clusters = n_clusters
        self.niter = niter

    def fit(self, labels: np.ndarray, embeddings: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "SemanticDedup":
        """``labels`` (n,), ``embeddings`` (n, d) -> ``keep_`` (n,) bool, ``score_`` = redundancy."""
        if not 0.0 <= self.eps < 2.0:
            raise ConfigError(f"semantic_dedup: eps must be in [0, 2), got {self.eps}")
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        z = np.ascontiguousarray(np.asarray(embeddings)[b.rows], dtype=np.float32)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        a = len(z)
        k = int(self.n_clusters) if self.n_clusters else max(1, round(a / 500))
        k = min(max(k, 1), a)
        if k > 1:
            km = faiss.Kmeans(z.shape[1], k, niter=int(self.niter), seed=int(self.random_state or 0),
                              spherical=True, verbose=False, max_points_per_centroid=100000)
            km.train(z)
            _, assign = km.index.search(z, 1)
            cluster = assign[:, 0].astype(np.int64)
            centroid_sim = np.einsum("ij,ij->i", z, km.centroids[cluster])
        else:
            cluster = np.zeros(a, dtype=np.int64)
            c = z.mean(0)
            centroid_sim = z @ (c / max(np.linalg.norm(c), 1e-12))
        redundancy = np.full(a, -1.0)
        dup_of = np.full(a, -1, dtype=np.int64)
        zt = torch.as_tensor(z)
        # order within a cluster: farthest from the centroid first (SemDeDup keeps that one)
        order = np.lexsort((centroid_sim, cluster))
        bounds = np.flatnonzero(np.diff(cluster[order])) + 1
        with torch.no_grad():
            for members in np.split(order, bounds):  # loop over clusters, blocks inside
                x = zt[torch.as_tensor(members)]
                for s in range(1, len(members), 2048):
                    sim = x[s:s + 2048] @ x[: s + 2048].T  # (block, earlier + block)
                    # only earlier members count: mask the diagonal and everything after it
                    col = torch.arange(sim.shape[1])
                    row = torch.arange(s, s + sim.shape[0])[:, None]
                    sim.masked_fill_(col[None, :] >= row, -2.0)
                    best, arg = sim.max(1)
                    redundancy[members[s:s + sim.shape[0]]] = best.double().numpy()
                    dup_of[members[s:s + sim.shape[0]]] = members[arg.numpy()]
        is_dup = redundancy > 1.0 - self.eps
        if b.target is None:
            chosen = ~is_dup
        else:
            tb = np.random.default_rng(self.random_state).random(a)
            chosen = top_m(-redundancy, b.m, groups(labels, b.rows, self.per_class), tb)
        other = np.where(dup_of >= 0, b.rows[np.maximum(dup_of, 0)], -1)
        where = join("cluster ", cluster.astype(str))
        near = join(where, ", cosine ", fmt(redundancy, "%.4f"), " to row ", other.astype(str))
        kept = np.where(dup_of >= 0, join(near, " (max redundancy)"),
                        join(where, ", first of its cluster"))
        dropped = np.where(is_dup, join(near, f" > 1 - eps = {1 - self.eps:g} (near duplicate; "
                                        "that row is the one kept)"),
                           join(near, ": among the most redundant beyond the budget"))
        finish(self, b, chosen, redundancy, kept, dropped,
               {"n_clusters": int(k), "eps": float(self.eps), "near_duplicates": int(is_dup.sum()),
                "per_class": bool(self.per_class)})
        return self
