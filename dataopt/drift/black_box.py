"""Tests on a proxy model's outputs and on labels.

Black-box shift detection (Rabanser, Günnemann & Lipton, "Failing Loudly: An Empirical Study of
Methods for Detecting Dataset Shift", NeurIPS 2019): the proxy's softmax is a low-dimensional
representation of the images, tested column by column (KS, Bonferroni) and through its predicted
labels (chi-square). Label shift: chi-square on the given labels, and black-box shift estimation
(BBSE; Lipton, Wang & Smola, "Detecting and Correcting for Label Shift with Black Box Predictors",
ICML 2018), which estimates the class-prior ratio w = q(y) / p(y) from the proxy's confusion matrix.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

from dataopt.drift.result import DriftResult, bonferroni, need
from dataopt.registry import DRIFT_TESTS


def counts_test(ref: np.ndarray, bat: np.ndarray, classes: np.ndarray) -> tuple[float, float, float]:
    """``(chi-square, p, total-variation distance)`` of the class counts of two label arrays."""
    table = np.array([[np.sum(ref == c) for c in classes], [np.sum(bat == c) for c in classes]])
    table = table[:, table.sum(0) > 0]
    tv = 0.5 * float(np.abs(table[0] / table[0].sum() - table[1] / table[1].sum()).sum())
    if table.shape[1] < 2:
        return 0.0, 1.0, tv
    stat, p, _, _ = chi2_contingency(table, correction=False)
    return float(stat), float(p), tv


@DRIFT_TESTS.register("bbsd_ks")
class BBSDKS:
    """KS test per softmax column of the proxy's probabilities, Bonferroni across columns.
    Effect size: the largest KS distance. Breakdown per class: KS distance and p-value."""

    requires = ("probs",)

    def __init__(self, *, alpha: float = 0.05):
        self.alpha = alpha

    def fit(self, reference: Mapping, batch: Mapping) -> "BBSDKS":
        pr, pb = need(reference, "probs", "reference"), need(batch, "probs", "batch")
        tests = [ks_2samp(pr[:, j], pb[:, j]) for j in range(pr.shape[1])]
        d = np.array([t.statistic for t in tests])
        p_cols = np.array([t.pvalue for t in tests])
        p = bonferroni(p_cols)
        worst = int(np.argmax(d))
        decision = p <= self.alpha
        why = (f"largest KS distance {d[worst]:.3f} on softmax column {worst}, Bonferroni p={p:.3g} over "
               f"{len(d)} columns: " + ("the proxy sees other images" if decision
                                        else "the proxy's outputs are alike"))
        self.result_ = DriftResult("bbsd_ks", float(d.max()), p, float(d.max()), bool(decision), why,
                                   len(pr), len(pb), self.alpha,
                                   {"class": np.arange(len(d)), "ks": d, "p_value": p_cols})
        return self


@DRIFT_TESTS.register("bbsd_chi2")
class BBSDChi2:
    """Chi-square on the counts of the proxy's predicted labels (argmax of ``probs``).
    Effect size: total-variation distance of the predicted-label distributions."""

    requires = ("probs",)

    def __init__(self, *, alpha: float = 0.05):
        self.alpha = alpha

    def fit(self, reference: Mapping, batch: Mapping) -> "BBSDChi2":
        pr, pb = need(reference, "probs", "reference"), need(batch, "probs", "batch")
        classes = np.arange(pr.shape[1])
        yr, yb = pr.argmax(1), pb.argmax(1)
        stat, p, tv = counts_test(yr, yb, classes)
        decision = p <= self.alpha
        why = (f"predicted-label counts: chi2={stat:.1f}, p={p:.3g}, total variation {tv:.3f}: "
               + ("the proxy predicts other proportions" if decision else "alike predicted proportions"))
        share = lambda v: np.bincount(v, minlength=len(classes)) / max(len(v), 1)  # noqa: E731
        self.result_ = DriftResult("bbsd_chi2", stat, p, tv, bool(decision), why, len(pr), len(pb),
                                   self.alpha, {"class": classes, "reference_share": share(yr),
                                                "batch_share": share(yb)})
        return self


def bbse_weights(ref_probs: np.ndarray, ref_labels: np.ndarray, batch_probs: np.ndarray,
                 n_classes: int) -> np.ndarray:
    """BBSE class weights w[c] ~ q(y=c) / p(y=c): solve ``C w = mu`` where ``C[i, j] = p(ŷ=i, y=j)`` on
    the reference and ``mu[i] = q(ŷ=i)`` on the batch (hard predictions), least squares, clipped at 0."""
    yhat = ref_probs.argmax(1)
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (yhat, ref_labels), 1.0)
    joint /= len(ref_labels)
    mu = np.bincount(batch_probs.argmax(1), minlength=n_classes)[:n_classes] / len(batch_probs)
    w = np.linalg.lstsq(joint, mu, rcond=None)[0]
    return np.clip(w, 0.0, None)


@DRIFT_TESTS.register("label_shift")
class LabelShift:
    """Chi-square on the given labels' class counts (reference vs batch); a label the reference never
    had is named in ``why``. With ``probs`` on both sides, BBSE class weights ``class_weights_``
    (q(y) / p(y), usable as per-sample weights ``class_weights_[label]`` by the resampling and
    weighting methods) go into the breakdown. Effect size: total-variation distance of the label
    distributions."""

    requires = ("labels",)

    def __init__(self, *, alpha: float = 0.05):
        self.alpha = alpha

    def fit(self, reference: Mapping, batch: Mapping) -> "LabelShift":
        lr, lb = need(reference, "labels", "reference").astype(int), need(batch, "labels", "batch").astype(int)
        classes = np.union1d(np.unique(lr), np.unique(lb))
        stat, p, tv = counts_test(lr, lb, classes)
        new = np.setdiff1d(np.unique(lb), np.unique(lr))
        n_new = int(np.isin(lb, new).sum())
        decision = p <= self.alpha
        why = (f"class counts: chi2={stat:.1f}, p={p:.3g}, total variation {tv:.3f}"
               + (f"; NEW class(es) {', '.join(map(str, new))} never in the reference: {n_new} batch rows"
                  if len(new) else "")
               + (": other class proportions" if decision else ": alike class proportions"))
        breakdown = {"class": classes,
                     "reference_share": np.array([np.mean(lr == c) for c in classes]),
                     "batch_share": np.array([np.mean(lb == c) for c in classes]),
                     "new_class": np.isin(classes, new)}
        self.class_weights_ = None
        if reference.get("probs") is not None and batch.get("probs") is not None:
            pr, pb = np.asarray(reference["probs"]), np.asarray(batch["probs"])
            self.class_weights_ = bbse_weights(pr, lr, pb, pr.shape[1])
            breakdown["bbse_weight"] = np.array([self.class_weights_[c] if c < len(self.class_weights_)
                                                 else np.nan for c in classes])
        self.result_ = DriftResult("label_shift", stat, p, tv, bool(decision), why, len(lr), len(lb),
                                   self.alpha, breakdown)
        return self
