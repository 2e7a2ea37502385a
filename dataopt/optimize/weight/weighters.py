"""Per-sample loss weights (``WEIGHTERS``).

Fitted state: ``weight_`` (n,) float >= 0 (multiplied into the plan's ``weight``), ``reason_`` (n,)
str (empty where the weighting has nothing to say), ``summary_`` (dict for plan.json, with
``counts``); weighters applied in the loss (focal, self-paced) also set ``train_``, a training
directive for :func:`dataopt.train.losses.make_loss`. ``fit`` takes the inputs named in ``requires``
plus ``keep`` (n,) bool, the rows still kept by earlier steps (class counts are taken over them).
Survey 000 §VI-D: weights by category proportion (inverse frequency, effective number), by learning
difficulty (focal = hard-first, self-paced = easy-first), by noise (``p_clean``) and by a
validation/LOO objective (DIVA).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError
from dataopt.optimize.resample.common import (check_range, class_counts, column, counts_summary,
                                              keep_mask, mean_one)
from dataopt.perceive.valuation import diva_loo_gradient, ridge_loo_predictions
from dataopt.registry import WEIGHTERS


@WEIGHTERS.register("none")
class UniformWeight:
    """Every sample has weight 1."""

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "UniformWeight":
        """``labels`` (n,) -> ``weight_`` (n,) ones."""
        n = len(labels)
        self.weight_ = np.ones(n, dtype=np.float64)
        self.reason_ = np.full(n, "")
        self.summary_ = {"counts": {"weighted": 0, "unweighted": n}}
        return self


@WEIGHTERS.register("p_clean")
class PCleanWeight:
    """Weight each sample by its probability of being correctly labeled (analyze's ``p_clean``).

    Down-weighting by the clean posterior is the "weighting" use of loss-mixture modelling in survey
    000 §V-B: a probably-mislabeled sample still contributes, but little.

    Parameters
    ----------
    min_weight : float
        Floor in [0, 1]: ``weight = max(p_clean, min_weight)``.
    """

    requires = ("p_clean",)

    def __init__(self, min_weight: float = 0.0):
        self.min_weight = min_weight

    def fit(self, p_clean: np.ndarray, keep: Optional[np.ndarray] = None) -> "PCleanWeight":
        """``p_clean`` (n,) in [0, 1] -> ``weight_`` (n,) float64."""
        if not 0.0 <= self.min_weight <= 1.0:
            raise ConfigError(
                f"optimize.weighting_kwargs.min_weight must be in [0, 1], got {self.min_weight}"
            )
        p = np.clip(np.asarray(p_clean, dtype=np.float64), 0.0, 1.0)
        self.weight_ = np.maximum(p, self.min_weight)
        floored = p < self.min_weight
        self.reason_ = np.where(
            floored,
            join("p_clean ", fmt(p, "%.3f"), ", weight floored at ", fmt(self.weight_, "%.3f")),
            join("p_clean weight ", fmt(self.weight_, "%.3f")),
        )
        self.summary_ = {"counts": {"weighted": int(p.size),
                                    "below_1": int((self.weight_ < 1).sum()),
                                    "floored": int(floored.sum())}}
        return self


def _class_weight_reason(name: str, labels: np.ndarray, counts: np.ndarray,
                         w: np.ndarray) -> np.ndarray:
    return join(name, ": class ", labels.astype(str), " has ", counts[labels].astype(str),
                " kept, weight ", fmt(w, "%.3f"))


@WEIGHTERS.register("inverse_frequency")
class InverseFrequencyWeight:
    """Inverse class frequency, ``w_i ∝ 1 / n_{y_i}`` (survey 000 §VI-D, category-proportion factor),
    scaled to mean 1 over the kept rows: every class carries the same total loss weight.
    """

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "InverseFrequencyWeight":
        """``labels`` (n,) int -> ``weight_`` (n,) ∝ 1 / (kept rows of the sample's class)."""
        labels = np.asarray(labels, dtype=np.int64)
        k = keep_mask(keep, labels.size)
        counts = class_counts(labels, k)
        w = mean_one(1.0 / np.maximum(counts, 1)[labels], k)
        self.weight_ = w
        self.reason_ = _class_weight_reason("inverse_frequency", labels, counts, w)
        self.summary_ = counts_summary(w, k, "weight")
        return self


@WEIGHTERS.register("effective_number")
class EffectiveNumberWeight:
    """Class-balanced loss weights by the effective number of samples (Cui et al., CVPR 2019, §3):
    ``E_n = (1 - β^n) / (1 - β)``, class weight ``w_c = (1 - β) / (1 - β^{n_c})``, normalised so that
    ``sum_c w_c = C`` over the classes present (the paper's normalisation). ``β = 0`` is no
    re-weighting, ``β -> 1`` inverse frequency.

    Parameters
    ----------
    beta : float
        In [0, 1); the paper uses 0.9 .. 0.9999 (0.999 for CIFAR-LT).
    """

    requires = ("labels",)

    def __init__(self, beta: float = 0.999):
        self.beta = beta

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "EffectiveNumberWeight":
        """``labels`` (n,) int -> ``weight_`` (n,) = the class weight of each sample's class."""
        beta = check_range("effective_number.beta", self.beta, 0.0, 1.0, hi_open=True)
        labels = np.asarray(labels, dtype=np.int64)
        k = keep_mask(keep, labels.size)
        counts = class_counts(labels, k)
        n_c = np.maximum(counts, 1).astype(np.float64)
        # (1 - β) / (1 - β^n) via expm1/log1p: exact near β = 1 where 1 - β^n underflows in precision
        # E_n = (1 - β^n) / (1 - β) via expm1: exact near β = 1, where 1 - β^n loses precision
        eff = -np.expm1(n_c * np.log(beta)) / (1.0 - beta) if beta > 0 else np.ones_like(n_c)
        cw = 1.0 / eff
        present = counts > 0
        cw = cw * present.sum() / cw[present].sum()
        w = cw[labels]
        self.effective_number_ = eff
        self.class_weight_ = cw
        self.weight_ = w
        self.reason_ = join(_class_weight_reason("effective_number", labels, counts, w),
                            " (effective number ", fmt(eff[labels], "%.1f"), ")")
        self.summary_ = counts_summary(w, k, "weight")
        return self


@WEIGHTERS.register("focal")
class FocalWeight:
    """Focal loss (Lin et al., ICCV 2017, §3.2): ``FL(p_t) = -(1 - p_t)^γ log p_t``.

    The modulation depends on the current prediction, so it is applied in training: ``weight_`` is 1
    and ``train_ = {"focal": {"gamma": γ}}`` tells :func:`dataopt.train.losses.make_loss` to modulate
    each sample's cross-entropy. ``γ = 0`` is plain cross-entropy; the paper uses 2.

    Parameters
    ----------
    gamma : float
        Focusing parameter, >= 0.
    """

    requires = ("labels",)

    def __init__(self, gamma: float = 2.0):
        self.gamma = gamma

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "FocalWeight":
        """``labels`` (n,) -> ``weight_`` ones and ``train_`` the focal directive."""
        gamma = check_range("focal.gamma", self.gamma, 0.0, 100.0)
        n = len(labels)
        k = keep_mask(keep, n)
        self.weight_ = np.ones(n, dtype=np.float64)
        self.train_ = {"focal": {"gamma": gamma}}
        self.reason_ = np.full(n, f"focal: loss modulated by (1 - p_t)^{gamma:g} in training")
        self.summary_ = {"counts": {"kept": int(k.sum())}, "train": self.train_}
        return self


@WEIGHTERS.register("self_paced")
class SelfPacedWeight:
    """Self-paced learning, easy first (Kumar et al., NeurIPS 2010, §3; survey 000 §VI-D "easy-first").

    Hard SPL minimises ``sum_i v_i l_i - λ sum_i v_i`` over ``v ∈ {0, 1}``: ``v_i = 1[l_i < λ]`` for the
    current losses, with λ growing so that harder samples join over training. The losses change
    every epoch, so the faithful form is applied in training (``dynamic=True``, default):
    ``weight_`` is 1 and ``train_ = {"self_paced": {"start_share": q0, "growth": g}}`` makes the loss
    keep, in every batch of epoch ``e`` (1-based), the ``min(1, q0 * g^(e-1))`` share of samples with
    the lowest current loss. λ is thus set as a quantile of the current losses (as Kumar et al.
    initialise it so that about half the samples are selected); an absolute λ from the proxy's
    ``loss_early`` would not match a fresh network's loss scale and could select nothing.

    ``dynamic=False`` is the static form, no training directive: the same schedule over ``epochs``
    epochs, run on the proxy's ``signal`` (``loss_early``) instead of the live loss, gives each
    sample the share of epochs in which it would be selected; ``weight_`` = that share (easy samples
    1, the hardest ``1 / epochs``-ish, never 0 unless the schedule never reaches them).

    Either way, ``reason_`` names the sample's ``signal`` value and the epoch at which the schedule
    lets it in.

    Parameters
    ----------
    start_share : float
        Share of samples selected in the first epoch, in (0, 1].
    growth : float
        Multiplicative growth of the share per epoch, >= 1.
    signal : str
        A column of perceive/signals.parquet ranking difficulty (lower = easier).
    dynamic : bool
        True: thresholding in the loss per epoch; False: static weights.
    epochs : int
        Length of the schedule for the static form (and for the entry epoch in reasons); use
        ``train.epochs``.
    """

    requires = ("signals",)

    def __init__(self, start_share: float = 0.5, growth: float = 1.2, signal: str = "loss_early",
                 dynamic: bool = True, epochs: int = 10):
        self.start_share = start_share
        self.growth = growth
        self.signal = signal
        self.dynamic = dynamic
        self.epochs = epochs

    def fit(self, signals: Any, keep: Optional[np.ndarray] = None) -> "SelfPacedWeight":
        """``signals`` table (n rows) -> ``weight_`` (n,) and, when dynamic, ``train_``."""
        q0 = check_range("self_paced.start_share", self.start_share, 0.0, 1.0, lo_open=True)
        g = check_range("self_paced.growth", self.growth, 1.0, 1e6)
        epochs = int(check_range("self_paced.epochs", self.epochs, 1, 1e6))
        loss = column(signals, self.signal, "perceive/signals.parquet", "self_paced.signal")
        k = keep_mask(keep, len(loss))
        # rank share among the kept rows: the share of kept rows at least as easy (in (0, 1])
        kept_sorted = np.sort(loss[k])
        share = np.searchsorted(kept_sorted, loss, side="right") / kept_sorted.size
        share = np.clip(share, 1.0 / kept_sorted.size, 1.0)
        # entry epoch: the first e with q0 * g^(e-1) >= share (vectorised log; e = 1 when g == 1
        # and the sample is in the first share, never otherwise)
        if g > 1:
            entry = 1 + np.ceil(np.maximum(np.log(share / q0) / np.log(g) - 1e-12, 0.0))
        else:
            entry = np.where(share <= q0, 1.0, np.inf)
        active = np.clip(epochs - entry + 1, 0, epochs) / epochs
        entry_txt = np.where(np.isfinite(entry), np.minimum(entry, 1e9).astype(np.int64).astype(str),
                             "never")
        base = join(f"self_paced: {self.signal} ", fmt(loss, "%.3f"), ", easiest ",
                    fmt(100 * share, "%.1f"), "%, enters at epoch ", entry_txt)
        n = loss.size
        if self.dynamic:
            self.weight_ = np.ones(n, dtype=np.float64)
            self.train_ = {"self_paced": {"start_share": q0, "growth": g}}
            self.reason_ = join(base, " (thresholded per epoch in training)")
        else:
            self.weight_ = active.astype(np.float64)
            self.train_ = {}
            self.reason_ = join(base, ", weight ", fmt(self.weight_, "%.3f"))
        self.entry_epoch_ = entry
        self.summary_ = counts_summary(self.weight_, k, "weight")
        self.summary_["counts"]["in_first_epoch"] = int((entry[k] <= 1).sum())
        self.summary_["train"] = self.train_
        return self


@WEIGHTERS.register("diva")
class DivaWeight:
    """DIVA Reweight (paper 003 §3.5 "DIVA Reweight", eq. 14, with the LOO loss of §3.4, eq. 11-13).

    Start from ``α = 1`` and take ``steps`` (the paper: 1-3) gradient steps ``α ← α - η ∇_α L_LOO``,
    clipping at 0, on the kept train rows' embeddings (a linear ridge model on fixed features, as in
    the paper's experiments). The first gradient is
    :func:`dataopt.perceive.valuation.diva_loo_gradient`; later ones differentiate
    :func:`dataopt.perceive.valuation.ridge_loo_predictions` at the current α with the same ridge
    penalty. ``(∇)_i > 0`` marks a detrimental (e.g. mislabeled) sample, which loses weight.

    The raw gradient of the summed LOO loss is O(0.1) per sample on L2-normalised embeddings, so
    ``η = 0.1`` would move α by about 1%. With ``normalise=True`` (default) each step divides the
    gradient by its mean absolute value over the kept rows, so ``lr`` is the mean change of α per step
    (scale-free; paper 003 does not state its gradient scale). Rows not kept keep weight 1.

    Parameters
    ----------
    lr : float
        η, > 0.
    steps : int
        1 .. 10 (the paper warns more steps over-fit the LOO loss).
    ridge : float
        Relative ridge penalty of ``diva_loo_gradient``.
    normalise : bool
    """

    requires = ("embeddings", "labels", "n_classes")

    def __init__(self, lr: float = 0.1, steps: int = 3, ridge: float = 1.0, normalise: bool = True):
        self.lr = lr
        self.steps = steps
        self.ridge = ridge
        self.normalise = normalise

    def fit(self, embeddings: np.ndarray, labels: np.ndarray, n_classes: int,
            keep: Optional[np.ndarray] = None) -> "DivaWeight":
        """``embeddings`` (n, d), ``labels`` (n,) -> ``weight_`` (n,) = α after the steps (>= 0)."""
        lr = check_range("diva.lr", self.lr, 0.0, 1e6, lo_open=True)
        steps = int(check_range("diva.steps", self.steps, 1, 10))
        check_range("diva.ridge", self.ridge, 0.0, 1e12, lo_open=True)
        labels = np.asarray(labels, dtype=np.int64)
        n = labels.size
        k = keep_mask(keep, n)
        c = max(int(n_classes), int(labels.max()) + 1)
        zk = np.asarray(embeddings)[k]
        yk = labels[k]
        grad, lam = diva_loo_gradient(zk, yk, c, ridge=self.ridge)
        z = torch.tensor(np.asarray(zk), dtype=torch.float64)
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)  # the bias diva_loo_gradient adds
        y = torch.nn.functional.one_hot(torch.from_numpy(yk), c).double()
        alpha = np.ones(len(yk), dtype=np.float64)
        first = grad.copy()
        for step in range(steps):
            if step > 0:
                a = torch.tensor(alpha, requires_grad=True)
                loss = (ridge_loo_predictions(z, y, a, lam) - y).pow(2).sum()
                (g,) = torch.autograd.grad(loss, a)
                grad = g.numpy()
            scale = float(np.abs(grad).mean()) if self.normalise else 1.0
            alpha = np.maximum(alpha - lr * grad / max(scale, 1e-300), 0.0)  # eq. 14, clipped at 0
        w = np.ones(n, dtype=np.float64)
        w[k] = alpha
        g_all = np.zeros(n)
        g_all[k] = first
        self.loo_gradient_ = g_all
        self.weight_ = w
        self.reason_ = np.where(k, join("diva: LOO gradient ", fmt(g_all, "%+.4f"),
                                        " -> weight ", fmt(w, "%.3f"),
                                        np.where(g_all > 0, " (detrimental)", "")), "")
        self.summary_ = counts_summary(w, k, "weight")
        self.summary_["counts"]["detrimental"] = int((first > 0).sum())
        self.summary_["ridge_lambda"] = float(lam)
        return self
