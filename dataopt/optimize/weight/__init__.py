"""Per-sample loss weights (``WEIGHTERS``).

Fitted state: ``weight_`` (n,) float, ``reason_`` (n,) str (empty where the weighting has nothing to
say), ``summary_`` (dict for plan.json, with ``counts``).
"""
from __future__ import annotations

import numpy as np

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError
from dataopt.registry import WEIGHTERS


@WEIGHTERS.register("none")
class UniformWeight:
    """Every sample has weight 1."""

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray) -> "UniformWeight":
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

    def fit(self, p_clean: np.ndarray) -> "PCleanWeight":
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
