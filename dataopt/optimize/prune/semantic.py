"""Selectors that combine semantic alignment (consistency with the label) and diversity/density:
CLIP-powered selection (paper 001 part four, ICLR 2025) and density x consistency (paper 004, static).

Both read two perceive signals, so they run on any embedder:

- ``semantic_consistency``: ``cos(E_I(x_i), E_T(y_i))`` when the embedder has a text tower
  (``text_embeddings`` present), else the out-of-fold probability of the given label;
- ``knn_density``: ``rho_i``, the mean distance to the k nearest train neighbours (larger = sparser).

Both are rank-normalised to (0, 1] over the candidates (``rank / a``): robust to the very different
scales of a cosine (CLIP: ~0.2-0.35) and of a probability, and to outliers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from dataopt.errors import ConfigError, DataError
from dataopt.optimize.prune.base import (Budget, finish, fmt, groups, join, signal_column,
                                         top_m)
from dataopt.registry import SELECTORS


def rank01(v: np.ndarray) -> np.ndarray:
    """Rank-normalise ``v`` (a,) to ``(rank + 1) / a`` in (0, 1] (ties: average rank)."""
    return (pd.Series(v).rank(method="average").to_numpy() / max(v.size, 1)).astype(np.float64)


def value01(v: np.ndarray, name: str) -> np.ndarray:
    """``v`` (a,) over its maximum, floored at 1e-6: ``p ∝ v``, the density x consistency formula taken
    literally (a negative cosine is as unlikely as the floor). A non-positive maximum is a DataError."""
    top = float(v.max()) if v.size else 0.0
    if not top > 0:
        raise DataError(f"density_consistency: normalise='value' needs a positive {name}, max is {top:.4g}")
    return np.clip(v / top, 1e-6, 1.0)


def density_consistency_p(rho: np.ndarray, con: np.ndarray, normalise: str,
                          temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``p_rho``, ``p_con`` (a,) each from ``rho`` and ``con`` (a,): ``"rank"`` -> :func:`rank01`,
    ``"value"`` -> :func:`value01`, ``"softmax"`` -> ``softmax(z / temperature)`` of the z-scores."""
    def norm(v: np.ndarray, name: str) -> np.ndarray:
        if normalise == "rank":
            return rank01(v)
        if normalise == "value":
            return value01(v, name)
        z = (v - v.mean()) / max(v.std(), 1e-12) / temperature
        e = np.exp(z - z.max())
        return e / e.sum()

    return norm(rho, "knn_density"), norm(con, "semantic_consistency")


def _alignment_source(text_embeddings) -> str:
    return ("text_cosine" if text_embeddings is not None
            else "oof_probability (no text embeddings: out-of-fold p(label))")


@SELECTORS.register("clip_selection")
class ClipSelection:
    """CLIP-powered data selection (Yang et al., ICLR 2025; paper 001 part four): optimise a
    continuous score ``d`` (one per candidate) with Adam on

    ``L = w_sa L_sa + w_sd L_sd + w_s L_s``,
    ``L_sa = -mean(sigmoid(d) * S_A)``, ``L_sd = -mean(sigmoid(d) * S_D)``,
    ``L_s = |mean(STE[sigmoid(d) > 0.5]) - s_r|`` (straight-through estimator: the forward pass uses
    the hard indicator, the backward pass the gradient of ``sigmoid(d)``),

    with ``S_A`` the semantic alignment (``semantic_consistency``: text cosine when the embedder has a
    text tower, else the out-of-fold probability of the label) and ``S_D`` the diversity (``knn_density``:
    mean distance to the k nearest neighbours; a sample in a sparse region adds more diversity), both
    rank-normalised. ``s_r`` is the kept share of the candidates. The ``m`` candidates with the
    largest final ``d`` are kept, so the ratio is exact (the paper's threshold at 0.5 meets it only
    approximately); ``summary_["losses"]`` records the final terms.

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random``.
    alignment_weight, diversity_weight, ratio_weight : float >= 0
        ``w_sa``, ``w_sd``, ``w_s``. Per sample, ``L_sa + L_sd`` pulls ``d_i`` up by up to
        ``w_sa + w_sd`` (rank-normalised scores are <= 1) while ``L_s`` pushes every ``d_i`` by
        ``w_s``, so the constraint binds only when ``w_s > w_sa + w_sd``: default 3 (with
        ``w_s = 1`` about half of the samples end above 0.5 whatever the ratio).
    steps : int
        Adam steps.
    lr : float
        Adam learning rate.
    """

    requires = ("labels", "signals", "text_embeddings")

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0,
                 alignment_weight: float = 1.0, diversity_weight: float = 1.0,
                 ratio_weight: float = 3.0, steps: int = 300, lr: float = 0.05):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state
        self.alignment_weight = alignment_weight
        self.diversity_weight = diversity_weight
        self.ratio_weight = ratio_weight
        self.steps = steps
        self.lr = lr

    def fit(self, labels: np.ndarray, signals: pd.DataFrame,
            text_embeddings: Optional[np.ndarray] = None,
            keep: Optional[np.ndarray] = None) -> "ClipSelection":
        """``labels`` (n,), ``signals`` (columns semantic_consistency, knn_density),
        ``text_embeddings`` (C, d) or None (only names the alignment source) -> ``keep_`` (n,)."""
        for k in ("alignment_weight", "diversity_weight", "ratio_weight", "lr"):
            if not getattr(self, k) >= 0:
                raise ConfigError(f"clip_selection: {k} must be >= 0, got {getattr(self, k)}")
        if int(self.steps) < 1:
            raise ConfigError(f"clip_selection: steps must be >= 1, got {self.steps}")
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        con = signal_column(signals, "semantic_consistency", "clip_selection")[b.rows]
        rho = signal_column(signals, "knn_density", "clip_selection")[b.rows]
        sa, sd = rank01(con), rank01(rho)
        s_r = b.m / max(b.rows.size, 1)
        gen = torch.Generator().manual_seed(int(self.random_state or 0))
        d = (0.01 * torch.randn(b.rows.size, generator=gen, dtype=torch.float64)).requires_grad_()
        t_sa, t_sd = torch.as_tensor(sa), torch.as_tensor(sd)
        opt = torch.optim.Adam([d], lr=float(self.lr))
        for _ in range(int(self.steps)):  # optimisation steps, vectorised over samples
            p = torch.sigmoid(d)
            l_sa = -(p * t_sa).mean()
            l_sd = -(p * t_sd).mean()
            hard = (p > 0.5).double()
            ste = hard + p - p.detach()  # straight-through: forward hard, backward sigmoid
            l_s = (ste.mean() - s_r).abs()
            loss = (self.alignment_weight * l_sa + self.diversity_weight * l_sd
                    + self.ratio_weight * l_s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = d.detach().numpy().copy()
        tb = np.random.default_rng(self.random_state).random(score.size)
        chosen = top_m(score, b.m, groups(labels, b.rows, self.per_class), tb)
        value = join("d ", fmt(score, "%.3f"), ", S_A ", fmt(sa, "%.3f"), " (consistency ",
                     fmt(con, "%.4g"), "), S_D ", fmt(sd, "%.3f"), " (rho ", fmt(rho, "%.4g"), ")")
        with torch.no_grad():
            p = torch.sigmoid(d)
            losses = {"L_sa": float(-(p * t_sa).mean()), "L_sd": float(-(p * t_sd).mean()),
                      "L_s": float(abs(float((p > 0.5).double().mean()) - s_r)),
                      "share_above_half": float((p > 0.5).double().mean())}
        finish(self, b, chosen, score, join(value, ": among the top d"),
               join(value, ": below the kept d"),
               {"alignment": _alignment_source(text_embeddings), "s_r": float(s_r),
                "losses": losses, "per_class": bool(self.per_class)})
        return self


@SELECTORS.register("density_consistency")
class DensityConsistency:
    """Density x consistency selection (Yang et al., ICML 2025; paper 004 / 001 part five), static
    form: ``p_sel(i) ∝ p_rho(i) * p_con(i)`` with ``rho_i`` the mean kNN distance (larger = sparser
    = preferred) and ``con_i`` the semantic consistency with the label; ``m`` samples are drawn
    without replacement with probability ``p_sel`` (Gumbel top-k: keep the ``m`` largest
    ``log p_sel + Gumbel``, an exact vectorised sampler, seeded).

    ``normalise="rank"`` (default): ``p_rho``, ``p_con`` are the ranks / a, in (0, 1];
    ``normalise="value"``: proportional to the values themselves (the formula taken literally; much
    flatter, as kNN distances and cosines are concentrated);
    ``normalise="softmax"``: ``softmax(z / temperature)`` of the z-scored values. ``sharpness``
    raises ``p_sel`` to a power (1 = the paper's proportional draw; larger = closer to a
    deterministic top-m).

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random``.
    normalise : "rank" | "value" | "softmax"
    temperature : float > 0
        Softmax temperature (``normalise="softmax"``).
    sharpness : float > 0
    """

    requires = ("labels", "signals", "text_embeddings")

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0,
                 normalise: str = "rank", temperature: float = 1.0, sharpness: float = 1.0):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state
        self.normalise = normalise
        self.temperature = temperature
        self.sharpness = sharpness

    def fit(self, labels: np.ndarray, signals: pd.DataFrame,
            text_embeddings: Optional[np.ndarray] = None,
            keep: Optional[np.ndarray] = None) -> "DensityConsistency":
        """``labels`` (n,), ``signals`` (semantic_consistency, knn_density) -> ``keep_`` (n,)."""
        if self.normalise not in ("rank", "value", "softmax"):
            raise ConfigError(f"density_consistency: normalise must be 'rank', 'value' or 'softmax', "
                              f"got {self.normalise!r}")
        if not (self.temperature > 0 and self.sharpness > 0):
            raise ConfigError("density_consistency: temperature and sharpness must be > 0")
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        con = signal_column(signals, "semantic_consistency", "density_consistency")[b.rows]
        rho = signal_column(signals, "knn_density", "density_consistency")[b.rows]
        p_rho, p_con = density_consistency_p(rho, con, self.normalise, self.temperature)
        logp = self.sharpness * (np.log(p_rho) + np.log(p_con))
        p = np.exp(logp - logp.max())
        p /= p.sum()
        gumbel = np.random.default_rng(self.random_state).gumbel(size=p.size)
        key = logp + gumbel  # Gumbel top-k = sampling m without replacement proportionally to p
        chosen = top_m(key, b.m, groups(labels, b.rows, self.per_class))
        value = join("p_sel ", fmt(p * p.size, "%.3g"), "x uniform (p_rho ", fmt(p_rho, "%.3g"),
                     " from rho ", fmt(rho, "%.4g"), ", p_con ", fmt(p_con, "%.3g"),
                     " from consistency ", fmt(con, "%.4g"), ")")
        finish(self, b, chosen, p, join(value, ": drawn"), join(value, ": not drawn"),
               {"alignment": _alignment_source(text_embeddings), "normalise": self.normalise,
                "sharpness": float(self.sharpness), "per_class": bool(self.per_class)})
        return self
