"""Resampling: how often each kept training sample is drawn (``RESAMPLERS``).

Survey 000 §VI-A splits resampling by sampling rate into uniform, proportion(class)-based,
importance-based, learning-difficulty-based and uncertainty-based sampling; one class each here.

Fitted state: ``sampling_weight_`` (n,) float >= 0 (relative draw probability, multiplied into the
plan's ``sampling_weight``; scaled to mean 1 over the kept rows, 1 everywhere = uniform),
``reason_`` (n,) str, ``summary_`` (dict for plan.json, with ``counts``). ``fit`` takes the inputs
named in ``requires`` plus ``keep`` (n,) bool, the rows still kept by earlier steps: class counts,
means and normalisations are taken over those rows.

The train stage honours ``sampling_weight`` with a weighted sampler that draws N samples with
replacement per epoch (:func:`dataopt.train.loop.fit`), so an epoch keeps its length whatever the
weights are.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from sklearn.linear_model import LogisticRegression

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError, DataError
from dataopt.optimize.resample.common import (check_range, class_counts, column, counts_summary,
                                              keep_mask, mean_one, power_weights)
from dataopt.registry import RESAMPLERS


def _class_reason(name: str, labels: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    return join(name, ": class ", labels.astype(str), " has ", counts[labels].astype(str),
                " kept, sampling weight ", fmt(w, "%.3f"))


@RESAMPLERS.register("uniform")
class UniformSampling:
    """Every kept sample is drawn equally often (survey 000 §VI-A "uniform sampling")."""

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "UniformSampling":
        """``labels`` (n,) -> ``sampling_weight_`` (n,) ones."""
        n = len(labels)
        k = keep_mask(keep, n)
        self.sampling_weight_ = np.ones(n, dtype=np.float64)
        self.reason_ = np.full(n, "")
        self.summary_ = counts_summary(self.sampling_weight_, k, "sampling_weight") if n else {
            "counts": {"kept": 0}}
        return self


class _ClassSampling:
    """Per-class sampling weight ``w_c = n_c ** -power`` (n_c = kept rows of class c)."""

    requires = ("labels",)
    power = 1.0

    def _fit_classes(self, labels: np.ndarray, keep: Optional[np.ndarray]) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        n = labels.size
        k = keep_mask(keep, n)
        counts = class_counts(labels, k)
        # a class with no kept row is never drawn; give its (dropped) rows a finite weight anyway
        per_class = np.maximum(counts, 1).astype(np.float64) ** -self.power
        w = mean_one(per_class[labels], k)
        self.sampling_weight_ = w
        self.reason_ = _class_reason(self.registered_name, labels, counts, w)
        self.summary_ = counts_summary(w, k, "sampling_weight")
        present = counts > 0
        mass = np.bincount(labels[k], weights=w[k], minlength=counts.size)
        self.summary_["class_draw_share"] = {str(c): float(mass[c] / mass.sum())
                                             for c in np.flatnonzero(present)}
        return counts


@RESAMPLERS.register("class_balanced_over")
class ClassBalancedOver(_ClassSampling):
    """Class-balanced over-sampling: ``w_i ∝ 1 / n_{y_i}``, so every class is drawn equally often.

    Survey 000 §VI-A "proportion-based sampling" (minor classes get large sampling rates); drawn with
    replacement, minority samples repeat within an epoch (over-sampling).
    """

    power = 1.0

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "ClassBalancedOver":
        """``labels`` (n,) int -> ``sampling_weight_`` (n,), equal total mass per kept class."""
        self._fit_classes(labels, keep)
        return self


@RESAMPLERS.register("class_balanced_under")
class ClassBalancedUnder(_ClassSampling):
    """Class-balanced under-sampling with a per-epoch budget of ``K * min_c n_c`` draws.

    Random under-sampling (survey 000 §VI-A, first dimension) shows each epoch ``min_c n_c`` samples of
    every one of the K classes: a majority sample is seen with probability ``min n / n_c`` per epoch,
    a minority sample once. As sampling weights that is ``w_i ∝ 1 / n_{y_i}`` - the same relative
    draw probabilities as :class:`ClassBalancedOver`; nothing is zeroed, so no sample is lost for good.
    The difference is the budget: the loop draws N (= kept rows) samples per epoch, i.e.
    ``N / (K min n)`` under-sampled epochs per loop epoch. ``summary_["epoch_budget"]`` records
    ``K * min n`` (scale ``train.epochs`` by ``epoch_budget / N`` for the classic schedule).
    """

    power = 1.0

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "ClassBalancedUnder":
        """``labels`` (n,) int -> ``sampling_weight_`` (n,), equal mass per class; budget in summary."""
        counts = self._fit_classes(labels, keep)
        present = counts[counts > 0]
        budget = int(present.size * present.min())
        self.summary_["epoch_budget"] = budget
        self.reason_ = join(self.reason_, f" (under-sampling budget {budget} draws per epoch)")
        return self


@RESAMPLERS.register("sqrt")
class SquareRootSampling(_ClassSampling):
    """Square-root sampling (Mahajan et al., ECCV 2018, §3.1 "square-root sampling"): class c is drawn
    with probability ∝ sqrt(n_c), i.e. per sample ``w_i ∝ 1 / sqrt(n_{y_i})`` - halfway (in log space)
    between instance-uniform and class-balanced sampling.
    """

    power = 0.5

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "SquareRootSampling":
        """``labels`` (n,) int -> ``sampling_weight_`` (n,), class mass ∝ sqrt(n_c)."""
        self._fit_classes(labels, keep)
        return self


@RESAMPLERS.register("importance")
class ImportanceSampling:
    """Importance sampling towards a target split by a classifier density ratio.

    Survey 000 §VI-A "importance-based sampling", eq. 1: ``w(x) = q(x) / p(x)`` with ``p`` the training
    distribution (kept train rows) and ``q`` the target (the test rows by default). The ratio comes from
    a probabilistic classifier (scikit-learn ``LogisticRegression``) trained on the embeddings to
    separate target (1) from train (0) rows: by Bayes,
    ``q(x)/p(x) = P(target|x) / P(train|x) * n_train / n_target`` (Bickel et al., ICML 2007, §2).
    Weights are clipped to ``[min_weight, max_weight]`` (a ratio estimate is unstable in the tails),
    then scaled to mean 1 over the kept rows.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation of the logistic regression (> 0).
    max_weight, min_weight : float
        Clip range of the raw ratio (0 <= min_weight < max_weight).
    max_iter : int
        lbfgs iterations.
    """

    requires = ("embeddings", "test_embeddings")

    def __init__(self, C: float = 1.0, max_weight: float = 10.0, min_weight: float = 0.05,
                 max_iter: int = 200, random_state: Optional[int] = None):
        self.C = C
        self.max_weight = max_weight
        self.min_weight = min_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, embeddings: np.ndarray, test_embeddings: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "ImportanceSampling":
        """``embeddings`` (n, d) train rows, ``test_embeddings`` (m, d) target rows ->
        ``sampling_weight_`` (n,) ≈ q(x)/p(x)."""
        check_range("importance.C", self.C, 0.0, np.inf, lo_open=True, hi_open=True)
        hi = check_range("importance.max_weight", self.max_weight, 0.0, np.inf, lo_open=True,
                         hi_open=True)
        lo = check_range("importance.min_weight", self.min_weight, 0.0, hi, hi_open=True)
        x = np.asarray(embeddings, dtype=np.float32)
        t = np.asarray(test_embeddings, dtype=np.float32)
        n = len(x)
        k = keep_mask(keep, n)
        if t.ndim != 2 or len(t) == 0 or t.shape[1] != x.shape[1]:
            raise DataError(f"importance sampling needs target embeddings of shape (m, {x.shape[1]}) "
                            f"with m > 0, got {t.shape}; is there a test split in samples.parquet?")
        xs = x[k]
        clf = LogisticRegression(C=float(self.C), max_iter=int(self.max_iter),
                                 random_state=self.random_state)
        clf.fit(np.concatenate([xs, t]), np.r_[np.zeros(len(xs)), np.ones(len(t))])
        # log-odds minus log prior odds = log density ratio; exp in float64 after clipping
        log_odds = clf.decision_function(x).astype(np.float64)
        log_ratio = log_odds + np.log(len(xs) / len(t))
        raw = np.exp(np.clip(log_ratio, np.log(max(lo, 1e-300)), np.log(hi)))
        raw = np.clip(raw, lo, hi)
        w = mean_one(raw, k)
        self.density_ratio_ = raw
        self.sampling_weight_ = w
        p_target = 1.0 / (1.0 + np.exp(-log_odds))
        self.reason_ = join("importance: P(target|x) ", fmt(p_target, "%.3f"), ", density ratio ",
                            fmt(raw, "%.3f"), ", sampling weight ", fmt(w, "%.3f"))
        self.summary_ = counts_summary(w, k, "sampling_weight")
        self.summary_["counts"]["clipped"] = int(((raw <= lo) | (raw >= hi))[k].sum())
        self.summary_["n_target"] = int(len(t))
        return self


@RESAMPLERS.register("difficulty")
class DifficultySampling:
    """Learning-difficulty-based sampling (survey 000 §VI-A, eq. 2: rate ∝ difficulty, Johnson &
    Guestrin 2018): hard samples (high loss / EL2N) are drawn more often.

    ``w_i = (s_i / mean(s))^(±1/T) + floor``, clipped at ``max_weight``, mean 1 over the kept rows;
    ``direction="hard"`` uses ``+1/T`` (hard-first), ``"easy"`` ``-1/T`` (easy-first, e.g. Gui et al.
    2021 for noisy labels, where large mean losses get low rates).

    Parameters
    ----------
    signal : str
        A column of perceive/signals.parquet (``loss_last``, ``el2n``, ``loss_early``, ``grand``...).
    temperature : float
        > 0; 1 = proportional, larger = flatter.
    direction : {"hard", "easy"}
    floor : float
        Added to every relative weight (>= 0) so zero-score rows stay drawable.
    max_weight : float
        Cap on the relative weight before normalisation.
    """

    requires = ("signals",)

    def __init__(self, signal: str = "loss_last", temperature: float = 1.0, direction: str = "hard",
                 floor: float = 0.1, max_weight: float = 10.0):
        self.signal = signal
        self.temperature = temperature
        self.direction = direction
        self.floor = floor
        self.max_weight = max_weight

    def fit(self, signals: Any, keep: Optional[np.ndarray] = None) -> "DifficultySampling":
        """``signals`` table (n rows) -> ``sampling_weight_`` (n,) ∝ difficulty^(1/T)."""
        if self.direction not in ("hard", "easy"):
            raise ConfigError(f"difficulty.direction must be 'hard' or 'easy', got {self.direction!r}")
        t = check_range("difficulty.temperature", self.temperature, 0.0, np.inf, lo_open=True,
                        hi_open=True)
        floor = check_range("difficulty.floor", self.floor, 0.0, np.inf, hi_open=True)
        cap = check_range("difficulty.max_weight", self.max_weight, 0.0, np.inf, lo_open=True,
                          hi_open=True)
        raw = column(signals, self.signal, "perceive/signals.parquet", "difficulty.signal")
        k = keep_mask(keep, len(raw))
        s = np.clip(raw, 0.0, None)
        if self.direction == "easy":
            mean = float(s[k].mean())
            # inverse relative score, bounded so a zero loss does not blow up
            s = 1.0 / np.maximum(s / mean if mean > 0 else np.ones_like(s), 1.0 / cap)
        w = power_weights(s, k, t, floor, cap)
        self.sampling_weight_ = w
        self.reason_ = join(f"difficulty ({self.direction}): {self.signal} ",
                            fmt(raw, "%.3f"),
                            ", sampling weight ", fmt(w, "%.3f"))
        self.summary_ = counts_summary(w, k, "sampling_weight")
        return self


@RESAMPLERS.register("uncertainty")
class UncertaintySampling:
    """Uncertainty-based sampling (survey 000 §VI-A; predictive entropy as in Aljuhani et al. 2022):
    samples whose out-of-fold prediction is uncertain are drawn more often.

    ``H_i = -sum_c p_ic log p_ic`` of the out-of-fold probabilities (perceive/dynamics.npz ``probs``),
    normalised by ``log C``; ``w_i = (H_i / mean(H))^(1/T) + floor``, clipped, mean 1 over kept rows.

    Parameters
    ----------
    temperature, floor, max_weight : as in :class:`DifficultySampling`.
    """

    requires = ("probs",)

    def __init__(self, temperature: float = 1.0, floor: float = 0.1, max_weight: float = 10.0):
        self.temperature = temperature
        self.floor = floor
        self.max_weight = max_weight

    def fit(self, probs: np.ndarray, keep: Optional[np.ndarray] = None) -> "UncertaintySampling":
        """``probs`` (n, C) rows summing to 1 -> ``sampling_weight_`` (n,) ∝ entropy^(1/T)."""
        t = check_range("uncertainty.temperature", self.temperature, 0.0, np.inf, lo_open=True,
                        hi_open=True)
        floor = check_range("uncertainty.floor", self.floor, 0.0, np.inf, hi_open=True)
        cap = check_range("uncertainty.max_weight", self.max_weight, 0.0, np.inf, lo_open=True,
                          hi_open=True)
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or not np.isfinite(p).all():
            raise DataError(f"probs must be a finite (n, C) array, got shape {p.shape}")
        k = keep_mask(keep, len(p))
        p = np.clip(p, 0.0, None)
        p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1) / np.log(max(p.shape[1], 2))
        w = power_weights(h, k, t, floor, cap)
        self.entropy_ = h
        self.sampling_weight_ = w
        self.reason_ = join("uncertainty: normalised entropy ", fmt(h, "%.3f"),
                            ", sampling weight ", fmt(w, "%.3f"))
        self.summary_ = counts_summary(w, k, "sampling_weight")
        return self
