"""Label-quality drift: is the batch's estimated label-noise rate higher than the reference's?

The caller scores both sides with the same reference-trained proxy and an analyze detector, and
passes per-sample "label issue" flags (or ``p_clean``, flagged below ``threshold``). The test is the
one-sided two-proportion z-test (batch worse); the interval of the difference is Newcombe's hybrid
score interval built from two Wilson intervals (Newcombe, "Interval estimation for the difference
between independent proportions", Statistics in Medicine 1998, method 10).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import norm

from dataopt.drift.result import DriftResult
from dataopt.registry import DRIFT_TESTS


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1, z), wilson(k2, n2, z)
    d = p1 - p2
    return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def issue_flags(side: Mapping, which: str, threshold: float) -> np.ndarray:
    if side.get("label_issue") is not None:
        return np.asarray(side["label_issue"], bool)
    if side.get("p_clean") is not None:
        return np.asarray(side["p_clean"], float) < threshold
    raise ValueError(f"the {which} lacks 'label_issue' (or 'p_clean')")


@DRIFT_TESTS.register("label_quality")
class LabelQuality:
    """One-sided two-proportion z-test that the batch's label-issue rate exceeds the reference's.

    Effect size: the difference of the rates (batch - reference) as a fraction (0.15 = 15 points),
    0 when the batch is not worse. Breakdown: both rates and the (1 - alpha) Newcombe interval of the
    difference."""

    requires = ("label_issue",)

    def __init__(self, *, alpha: float = 0.05, threshold: float = 0.5):
        self.alpha = alpha
        self.threshold = threshold

    def fit(self, reference: Mapping, batch: Mapping) -> "LabelQuality":
        fr, fb = issue_flags(reference, "reference", self.threshold), issue_flags(batch, "batch", self.threshold)
        n1, n2, k1, k2 = len(fb), len(fr), int(fb.sum()), int(fr.sum())
        p1, p2 = k1 / n1, k2 / n2
        pooled = (k1 + k2) / (n1 + n2)
        se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        z = (p1 - p2) / se if se > 0 else 0.0
        p = float(norm.sf(z))
        lo, hi = newcombe(k1, n1, k2, n2, norm.ppf(1 - self.alpha / 2))
        decision = p <= self.alpha
        why = (f"label-issue rate {100 * p1:.1f}% in the batch vs {100 * p2:.1f}% in the reference "
               f"({100 * (p1 - p2):+.1f} points, {100 * (1 - self.alpha):g}% CI [{100 * lo:+.1f}, "
               f"{100 * hi:+.1f}]), z={z:.2f}, one-sided p={p:.3g}: "
               + ("the batch's labels are worse" if decision else "no evidence of worse labels"))
        self.result_ = DriftResult("label_quality", float(z), p, max(p1 - p2, 0.0), bool(decision), why,
                                   n2, n1, self.alpha, {"batch_rate": p1, "reference_rate": p2,
                                                        "difference": p1 - p2, "ci_low": float(lo),
                                                        "ci_high": float(hi)})
        return self
