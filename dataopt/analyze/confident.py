"""Confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 70): per-class thresholds, the confident joint, its calibration to the joint
distribution of given and true labels, and pruning by noise rate. Implemented from the paper's
definitions (cleanlab is used only by bench/noise.py, as the reference to compare with).

Conventions: ``joint[i, j]`` is indexed ``[given label i, true label j]`` as the paper's
``C[ỹ=i][y*=j]``; the transition matrix is ``T[j, i] = P(given = i | true = j)`` (rows sum to 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from dataopt.errors import ConfigError, DataError
from dataopt.registry import DETECTORS


def check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate out-of-fold probabilities ``(n, C)`` against labels ``(n,)``; return float64 / int64."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if probs.ndim != 2 or len(probs) != len(labels):
        raise DataError(f"probs must be (n, C) with n = {len(labels)} labels; got {probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise DataError(f"labels must lie in [0, {probs.shape[1]}); got [{labels.min()}, "
                        f"{labels.max()}]")
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if bad.size:
        raise DataError(f"probs are not finite at {bad.size} rows (first: row {bad[0]})")
    return probs, labels


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``t_j`` = mean of ``p̂(j; x)`` over the samples labelled ``j`` (paper eq. 2); ``(C,)``.

    A class nobody carries gets threshold 1 (nothing can be confidently counted in it but a
    sample with ``p̂ = 1``).
    """
    C = probs.shape[1]
    counts = np.bincount(labels, minlength=C)
    sums = np.zeros(C)
    np.add.at(sums, labels, probs[np.arange(len(labels)), labels])
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_joint(probs: np.ndarray, labels: np.ndarray,
                    thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The confident joint ``C[i, j]`` (paper eq. 1) and each sample's confident true-label guess.

    Sample ``x`` with given label ``i`` counts in ``C[i, j]`` when ``p̂(j; x) >= t_j`` and, of the
    classes whose threshold it reaches, ``j`` has the largest ``p̂`` (the paper's tie-break for a
    sample above several thresholds). Samples above no threshold are not counted.

    Parameters
    ----------
    probs : (n, C) float out-of-fold predicted probabilities
    labels : (n,) int given labels
    thresholds : (C,) float, default :func:`per_class_thresholds`

    Returns
    -------
    joint : (C, C) int64 counts, ``[given, true]``
    guess : (n,) int64 confident true label, -1 where no threshold is reached
    """
    C = probs.shape[1]
    t = per_class_thresholds(probs, labels) if thresholds is None else np.asarray(thresholds)
    above = probs >= t[None, :] - 1e-12
    guess = np.where(above, probs, -np.inf).argmax(axis=1)
    guess = np.where(above.any(axis=1), guess, -1)
    counted = guess >= 0
    joint = np.zeros((C, C), np.int64)
    np.add.at(joint, (labels[counted], guess[counted]), 1)
    return joint, guess


def calibrate_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Calibrate the confident joint to the estimated joint ``Q[i, j]`` (paper eq. 3), sums to 1.

    Each row (given label ``i``) is rescaled to the number of samples labelled ``i`` (the confident
    joint leaves out samples above no threshold), then the whole matrix is divided by ``n``. A row
    with no confident sample keeps its mass on the diagonal (no evidence of noise).

    Parameters
    ----------
    joint : (C, C) confident joint, ``[given, true]``
    labels : (n,) int given labels

    Returns
    -------
    (C, C) float ``Q[given, true]``, summing to 1
    """
    C = joint.shape[0]
    counts = np.bincount(labels, minlength=C).astype(np.float64)
    rows = joint.sum(axis=1).astype(np.float64)
    q = np.where(rows[:, None] > 0, joint / np.maximum(rows, 1)[:, None], np.eye(C))
    q = q * counts[:, None]
    return q / max(q.sum(), 1e-12)


def transition_matrix(q: np.ndarray) -> np.ndarray:
    """``T[j, i] = P(given = i | true = j)`` from the joint ``Q[given, true]``; rows sum to 1.

    A true class with no mass (never confidently predicted) gets the identity row.
    """
    prior = q.sum(axis=0)  # P(true = j)
    C = q.shape[0]
    return np.where(prior[:, None] > 0, q.T / np.maximum(prior, 1e-300)[:, None], np.eye(C))


def prune_by_noise_rate(probs: np.ndarray, labels: np.ndarray, q: np.ndarray,
                        min_per_class: int = 1) -> np.ndarray:
    """Paper §3.2 "Prune by Noise Rate": for every off-diagonal ``(i, j)``, flag the
    ``round(n Q[i, j])`` samples labelled ``i`` with the largest margin ``p̂(j; x) - p̂(i; x)``.

    Parameters
    ----------
    probs : (n, C), labels : (n,), q : (C, C) calibrated joint ``[given, true]``
    min_per_class : int
        Never flag more than ``count_i - min_per_class`` samples labelled ``i``.

    Returns
    -------
    (n,) bool flags (a sample may be chosen for several ``j``; it is flagged once)
    """
    n, C = probs.shape
    flags = np.zeros(n, bool)
    counts = np.rint(q * n).astype(np.int64)
    for i in range(C):  # loops over class pairs (C^2), each step vectorised over the class's samples
        rows = np.flatnonzero(labels == i)
        if rows.size == 0:
            continue
        budget = max(rows.size - min_per_class, 0)
        for j in range(C):
            k = min(int(counts[i, j]), budget) if j != i else 0
            if k <= 0:
                continue
            margin = probs[rows, j] - probs[rows, i]
            top = np.argpartition(-margin, k - 1)[:k]
            flags[rows[top]] = True
    return flags


@DETECTORS.register("confident_learning")
class ConfidentLearning:
    """Confident learning on out-of-fold probabilities (Northcutt et al. 2021).

    Parameters
    ----------
    filter_by : {"prune_by_noise_rate", "confident_joint", "both"}
        Which samples are flagged: the pruning of §3.2 (largest margins, ``n Q[i, j]`` per
        off-diagonal), the off-diagonal of the confident joint (``C_confusion``-free §3.1 rule), or
        both at once.
    trust_predicted : bool
        Never flag a sample whose predicted class equals its label (as cleanlab does).
    min_per_class : int
        Pruning keeps at least this many samples per given label.

    Fitted attributes: ``thresholds_`` (C,), ``confident_joint_`` (C, C) ``[given, true]`` counts,
    ``joint_`` (C, C) calibrated ``Q``, ``transition_matrix_`` (C, C) ``[true, given]``,
    ``noise_rate_`` (``1 - trace(Q)``), ``guess_`` (n,), ``is_label_issue_`` (n,), ``p_clean_`` (n,)
    (``p̂(given) / (p̂(given) + max other p̂)``: 0.5 where the label ties with the best other class).
    """

    requires = ("probs", "labels")
    flags_own_issues = True  # flags come from the pruning, not from a p_clean threshold

    def __init__(self, filter_by: str = "prune_by_noise_rate", trust_predicted: bool = True,
                 min_per_class: int = 1):
        self.filter_by = filter_by
        self.trust_predicted = trust_predicted
        self.min_per_class = min_per_class

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> "ConfidentLearning":
        """Fit on out-of-fold probabilities ``(n, C)`` and given labels ``(n,)``; returns self."""
        if self.filter_by not in ("prune_by_noise_rate", "confident_joint", "both"):
            raise ConfigError("analyze.kwargs.filter_by must be prune_by_noise_rate, "
                              f"confident_joint or both; got {self.filter_by!r}")
        probs, labels = check_probs(probs, labels)
        self.thresholds_ = per_class_thresholds(probs, labels)
        self.confident_joint_, self.guess_ = confident_joint(probs, labels, self.thresholds_)
        self.joint_ = calibrate_joint(self.confident_joint_, labels)
        self.transition_matrix_ = transition_matrix(self.joint_)
        self.noise_rate_ = float(1.0 - np.trace(self.joint_))
        off = (self.guess_ >= 0) & (self.guess_ != labels)
        pruned = prune_by_noise_rate(probs, labels, self.joint_, self.min_per_class)
        flags = {"prune_by_noise_rate": pruned, "confident_joint": off,
                 "both": pruned & off}[self.filter_by]
        if self.trust_predicted:
            flags = flags & (probs.argmax(axis=1) != labels)
        self.is_label_issue_ = flags
        self.p_clean_ = normalised_margin(probs, labels)
        return self

    def summary(self) -> dict[str, Any]:
        """Fitted state for analysis.json."""
        return {
            "thresholds": self.thresholds_.round(6).tolist(),
            "confident_joint": self.confident_joint_.tolist(),
            "n_confident": int(self.confident_joint_.sum()),
            "noise_rate_confident_joint": self.noise_rate_,
        }


def normalised_margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``p̂(given) / (p̂(given) + max_{j != given} p̂(j))`` in [0, 1]; ``(n,)``."""
    rows = np.arange(len(labels))
    p_y = probs[rows, labels]
    other = probs.copy()
    other[rows, labels] = -np.inf
    return p_y / np.maximum(p_y + other.max(axis=1), 1e-12)


@DETECTORS.register("cl_mixture")
class ConfidentLossMixture:
    """Confident learning gated by a two-component loss mixture: a sample is a label issue when the
    pruning of :class:`ConfidentLearning` flags it AND the loss mixture puts it in the noisy component.

    Why: with a weak proxy model the confident joint over-counts noise (the proxy's own errors land
    off the diagonal; on a 37 %-accurate CIFAR-10N proxy CL flagged 50 % for a true 17 %), while the
    mixture on the out-of-fold loss separates by a different criterion (how far the label's loss sits
    above the clean mode). Their intersection keeps CL's precise ranking and the mixture's
    calibrated count: F1 0.42 vs 0.39 (CL alone) on that proxy (bench/noise.py measures it).

    Parameters
    ----------
    loss : str
        The signals.parquet loss column the mixture is fitted to (``loss_last``: final-epoch
        out-of-fold loss, the same model as the probabilities; ``loss_early``: mean early-epoch loss).
    mixture : {"gmm", "bmm"}
        The loss-mixture detector.
    filter_by, trust_predicted, min_per_class : passed to :class:`ConfidentLearning`.
    random_state : int or None
        Seeds the Gaussian mixture.

    Fitted attributes: everything :class:`ConfidentLearning` sets under ``cl_``, the mixture under
    ``mixture_``; ``transition_matrix_`` (from CL), ``is_label_issue_`` (n,), ``p_clean_`` (n,)
    (the mixture posterior where CL flags, ``0.5 + p_mix / 2`` elsewhere, so that ``p_clean < 0.5``
    exactly where the sample is flagged), ``noise_rate_`` (share flagged).
    """

    requires = ("probs", "labels", "signals")
    flags_own_issues = True

    def __init__(self, loss: str = "loss_last", mixture: str = "gmm",
                 filter_by: str = "prune_by_noise_rate", trust_predicted: bool = True,
                 min_per_class: int = 1, random_state: int | None = None):
        self.loss = loss
        self.mixture = mixture
        self.filter_by = filter_by
        self.trust_predicted = trust_predicted
        self.min_per_class = min_per_class
        self.random_state = random_state

    def fit(self, probs: np.ndarray, labels: np.ndarray, signals: Any) -> "ConfidentLossMixture":
        """Fit on probs ``(n, C)``, labels ``(n,)`` and the signals table (column ``loss``)."""
        if self.mixture not in ("gmm", "bmm"):
            raise ConfigError(f"analyze.kwargs.mixture must be gmm or bmm; got {self.mixture!r}")
        if self.loss not in signals:
            raise DataError(f"perceive/signals.parquet has no column {self.loss!r} "
                            f"(analyze.kwargs.loss); re-run perceive with that signal")
        self.cl_ = ConfidentLearning(self.filter_by, self.trust_predicted,
                                     self.min_per_class).fit(probs, labels)
        kw = {"random_state": self.random_state} if self.mixture == "gmm" else {}
        self.mixture_ = DETECTORS.build(self.mixture, {}, **kw).fit(
            np.asarray(signals[self.loss], dtype=np.float64))
        p_mix = self.mixture_.p_clean_
        self.is_label_issue_ = self.cl_.is_label_issue_ & (p_mix < 0.5)
        self.p_clean_ = np.where(self.is_label_issue_, np.minimum(p_mix, 0.499999), 0.5 + p_mix / 2)
        self.transition_matrix_ = self.cl_.transition_matrix_
        self.noise_rate_ = float(self.is_label_issue_.mean())
        return self

    def summary(self) -> dict[str, Any]:
        """Fitted state for analysis.json: the CL part and the mixture part."""
        return {"confident_learning": self.cl_.summary(), "mixture": self.mixture_.summary(),
                "n_flagged_by_cl": int(self.cl_.is_label_issue_.sum()),
                "n_noisy_by_mixture": int((self.mixture_.p_clean_ < 0.5).sum())}


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(log p̂ / T)`` on the given labels
    (Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2), bounded to [0.05, 20].

    Uses the given (possibly noisy) labels only, like every other detector input.
    """
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        return float(-_scaled_log_softmax(logp, t)[rows, labels].mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def temperature_scale(probs: np.ndarray, t: float) -> np.ndarray:
    """``softmax(log p̂ / t)``, ``(n, C)``."""
    return np.exp(_scaled_log_softmax(np.log(np.clip(probs, 1e-12, 1.0)), t))


def _scaled_log_softmax(logp: np.ndarray, t: float) -> np.ndarray:
    return log_softmax(logp / t, axis=1)


@DETECTORS.register("calibrated_confidence")
class CalibratedConfidence:
    """Confident learning's noise-rate estimate on temperature-calibrated probabilities, then a single
    global ranking by self-confidence: flag the ``round(n * noise_rate)`` samples with the lowest
    calibrated probability of their given label.

    Why: networks trained with label smoothing (or for few epochs) are under-confident, and confident
    learning's per-class thresholds then under-count the noise (CIFAR-10N, airbench out-of-fold
    probabilities: 15.8 % estimated vs 17.2 % true on ``random_label1``, 6.9 % vs 9.0 % on
    ``aggre_label``). Temperature scaling fitted on the given labels (Guo et al. 2017) fixes most of it
    (16.7 %, 8.5 %). Ranking by self-confidence, the score with the highest AUROC in that benchmark,
    and cutting at the estimated count is close to the best F1 any threshold reaches (the count is
    where precision meets recall); CL's per-off-diagonal pruning by margin ranks worse there.

    Parameters
    ----------
    calibrate : bool
        Fit the temperature (True) or use the probabilities as given (False).
    trust_predicted : bool
        Never flag a sample whose predicted class equals its label.

    Fitted attributes: ``temperature_``, ``cl_`` (:class:`ConfidentLearning` on the calibrated
    probabilities), ``joint_`` (C, C), ``transition_matrix_`` (C, C), ``noise_rate_``,
    ``self_confidence_`` (n,) calibrated ``p̂(given)``, ``is_label_issue_`` (n,), ``p_clean_`` (n,)
    (the calibrated ``p̂(given)`` mapped monotonically so that ``p_clean < 0.5`` exactly where flagged;
    the ranking, hence AUROC and AP, is the self-confidence's).
    """

    requires = ("probs", "labels")
    flags_own_issues = True

    def __init__(self, calibrate: bool = True, trust_predicted: bool = False):
        self.calibrate = calibrate
        self.trust_predicted = trust_predicted

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> "CalibratedConfidence":
        """Fit on out-of-fold probabilities ``(n, C)`` and given labels ``(n,)``; returns self."""
        probs, labels = check_probs(probs, labels)
        self.temperature_ = fit_temperature(probs, labels) if self.calibrate else 1.0
        q = temperature_scale(probs, self.temperature_) if self.calibrate else probs
        self.cl_ = ConfidentLearning(trust_predicted=self.trust_predicted).fit(q, labels)
        self.joint_, self.transition_matrix_ = self.cl_.joint_, self.cl_.transition_matrix_
        self.noise_rate_ = self.cl_.noise_rate_
        n = len(labels)
        self.self_confidence_ = q[np.arange(n), labels]
        eligible = q.argmax(axis=1) != labels if self.trust_predicted else np.ones(n, bool)
        k = min(int(round(self.noise_rate_ * n)), int(eligible.sum()))
        order = np.argsort(np.where(eligible, self.self_confidence_, np.inf), kind="stable")
        self.is_label_issue_ = np.zeros(n, bool)
        self.is_label_issue_[order[:k]] = True
        self.p_clean_ = _split_at(self.self_confidence_, self.is_label_issue_)
        return self

    def summary(self) -> dict[str, Any]:
        """Fitted state for analysis.json."""
        return {"temperature": self.temperature_, "n_flagged": int(self.is_label_issue_.sum()),
                "confident_learning": self.cl_.summary()}


def _split_at(score: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """Map ``score`` (n,) in [0, 1] monotonically to [0, 1] with the flagged (lowest) scores below 0.5
    and the others at or above it: piecewise linear around the cut ``c`` between the two groups."""
    if not flagged.any():
        return 0.5 + 0.5 * score
    if flagged.all():
        return 0.499999 * score
    c = 0.5 * (score[flagged].max() + score[~flagged].min())
    low = 0.5 * score / max(c, 1e-12)
    high = 0.5 + 0.5 * (score - c) / max(1.0 - c, 1e-12)
    return np.clip(np.where(flagged, np.minimum(low, 0.499999), np.maximum(high, 0.5)), 0.0, 1.0)
