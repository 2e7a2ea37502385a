"""Label and logit perturbation (``PERTURBERS``; survey 000 §VI-C "data perturbation").

Fitted state: ``new_label_`` (n,) int64 (the label to train on; == the label where unchanged),
``train_`` (dict: training directives for :func:`dataopt.train.losses.make_loss`, ``{}`` for none),
``reason_`` (n,) str, ``summary_`` (dict for plan.json, with ``counts``). ``fit`` takes the inputs
named in ``requires`` plus ``keep`` (n,) bool, the rows still kept by earlier steps.

Directive formats (merged into plan.json ``train``):

- ``{"label_smoothing": eps}``
- ``{"logit_adjustment": {"tau": τ, "prior": [π_0, ..., π_{C-1}]}}``
- ``{"bootstrap": {"kind": "soft" | "hard", "beta": β}}``
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError, DataError
from dataopt.optimize.resample.common import check_range, class_counts, keep_mask
from dataopt.registry import PERTURBERS


class _DirectivePerturber:
    """A perturbation applied in the loss: labels unchanged, one training directive."""

    requires = ("labels",)

    def _finish(self, labels: np.ndarray, keep: Optional[np.ndarray], directive: dict[str, Any],
                reason: str) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        k = keep_mask(keep, labels.size)
        self.new_label_ = labels.copy()
        self.train_ = directive
        self.reason_ = np.full(labels.size, reason)
        self.summary_ = {"counts": {"kept": int(k.sum()), "relabelled": 0}, "train": directive}


@PERTURBERS.register("label_smoothing")
class LabelSmoothing(_DirectivePerturber):
    """Label smoothing (Szegedy et al., CVPR 2016, §7): train on ``(1 - ε) one_hot(y) + ε / C``.

    Parameters
    ----------
    epsilon : float
        In [0, 1); 0.1 in the paper.
    """

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = epsilon

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "LabelSmoothing":
        """``labels`` (n,) -> ``train_ = {"label_smoothing": ε}``, labels unchanged."""
        eps = check_range("label_smoothing.epsilon", self.epsilon, 0.0, 1.0, hi_open=True)
        self._finish(labels, keep, {"label_smoothing": eps}, f"label_smoothing: ε = {eps:g} in training")
        return self


@PERTURBERS.register("logit_adjustment")
class LogitAdjustment(_DirectivePerturber):
    """Logit-adjusted loss (Menon et al., ICLR 2021, §4 eq. 10): train on ``softmax(f(x) + τ log π)``
    with π the class prior (kept rows per class / kept rows), predict with ``f(x)`` alone; the loss
    enforces a larger margin on rare classes and is Fisher-consistent for the balanced error (τ = 1).

    Parameters
    ----------
    tau : float
        >= 0; 1 in the paper. 0 is plain cross-entropy.
    """

    requires = ("labels", "n_classes")

    def __init__(self, tau: float = 1.0):
        self.tau = tau

    def fit(self, labels: np.ndarray, n_classes: int,
            keep: Optional[np.ndarray] = None) -> "LogitAdjustment":
        """``labels`` (n,), ``n_classes`` -> ``train_ = {"logit_adjustment": {"tau", "prior"}}``."""
        tau = check_range("logit_adjustment.tau", self.tau, 0.0, 100.0)
        labels = np.asarray(labels, dtype=np.int64)
        k = keep_mask(keep, labels.size)
        counts = class_counts(labels, k, n_classes)
        prior = counts / counts.sum()
        directive = {"logit_adjustment": {"tau": tau, "prior": [float(p) for p in prior]}}
        self._finish(labels, keep, directive, "")
        self.reason_ = join(f"logit_adjustment: τ = {tau:g}, prior of class ", labels.astype(str),
                            " ", fmt(prior[labels], "%.4f"))
        return self


@PERTURBERS.register("bootstrap")
class Bootstrapping(_DirectivePerturber):
    """Bootstrapping targets (Reed et al., ICLR-W 2015, §3): the target mixes the given label with the
    model's own prediction ``p``: soft ``β y + (1 - β) p`` (β = 0.95 in the paper) or hard
    ``β y + (1 - β) one_hot(argmax p)`` (β = 0.8), so confidently contradicted noisy labels pull less.

    Parameters
    ----------
    kind : {"soft", "hard"}
    beta : float
        Weight of the given label, in [0, 1]; None = the paper's value for ``kind``.
    """

    def __init__(self, kind: str = "soft", beta: Optional[float] = None):
        self.kind = kind
        self.beta = beta

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "Bootstrapping":
        """``labels`` (n,) -> ``train_ = {"bootstrap": {"kind", "beta"}}``."""
        if self.kind not in ("soft", "hard"):
            raise ConfigError(f"bootstrap.kind must be 'soft' or 'hard', got {self.kind!r}")
        beta = {"soft": 0.95, "hard": 0.8}[self.kind] if self.beta is None else self.beta
        beta = check_range("bootstrap.beta", beta, 0.0, 1.0)
        self._finish(labels, keep, {"bootstrap": {"kind": self.kind, "beta": beta}},
                     f"bootstrap ({self.kind}): target = {beta:g} label + {1 - beta:g} prediction")
        return self


@PERTURBERS.register("relabel")
class Relabel:
    """Relabel confidently mislabeled samples to the suggested label.

    A row is relabelled when analyze flagged it (``is_label_issue``), the ``suggested_label`` differs
    from its label, and the out-of-fold probability of the suggested label is at least ``threshold``
    (survey 000 §VI-C label perturbation; the correction step of confident learning, Northcutt et al.,
    JAIR 2021, §5, restricted to confident cases). Other rows keep their label. Only kept rows are
    relabelled.

    Parameters
    ----------
    threshold : float
        Minimum out-of-fold confidence in the suggested label, in [0, 1].
    """

    requires = ("labels", "analysis", "probs")

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold

    def fit(self, labels: np.ndarray, analysis: Any, probs: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "Relabel":
        """``labels`` (n,), ``analysis`` table (n rows: is_label_issue, suggested_label), ``probs``
        (n, C) out-of-fold -> ``new_label_`` (n,)."""
        thr = check_range("relabel.threshold", self.threshold, 0.0, 1.0)
        labels = np.asarray(labels, dtype=np.int64)
        n = labels.size
        k = keep_mask(keep, n)
        cols = list(analysis.columns) if hasattr(analysis, "columns") else list(analysis)
        for col in ("is_label_issue", "suggested_label"):
            if col not in cols:
                raise DataError(f"analyze/analysis.parquet has no column {col!r}; re-run analyze")
        flagged = np.asarray(analysis["is_label_issue"], dtype=bool)
        suggested = np.asarray(analysis["suggested_label"], dtype=np.int64)
        p = np.asarray(probs, dtype=np.float64)
        if flagged.shape != (n,) or suggested.shape != (n,) or p.ndim != 2 or len(p) != n:
            raise DataError(f"analysis ({flagged.shape[0]} rows) and probs {p.shape} must cover the "
                            f"{n} train rows; re-run perceive and analyze")
        valid = (suggested >= 0) & (suggested < p.shape[1])
        conf = np.where(valid, p[np.arange(n), np.clip(suggested, 0, p.shape[1] - 1)], 0.0)
        change = k & flagged & valid & (suggested != labels) & (conf >= thr)
        self.new_label_ = np.where(change, suggested, labels)
        self.train_ = {}
        self.confidence_ = conf
        low = k & flagged & valid & (suggested != labels) & ~change
        self.reason_ = np.where(
            change,
            join("relabel: ", labels.astype(str), " -> ", suggested.astype(str),
                 " (out-of-fold confidence ", fmt(conf, "%.3f"), f" >= {thr:g})"),
            np.where(low, join("relabel: flagged, kept label ", labels.astype(str), " (confidence in ",
                               suggested.astype(str), " ", fmt(conf, "%.3f"), f" < {thr:g})"), ""),
        )
        self.summary_ = {"counts": {"kept": int(k.sum()), "relabelled": int(change.sum()),
                                    "flagged_not_confident": int(low.sum())}}
        return self
