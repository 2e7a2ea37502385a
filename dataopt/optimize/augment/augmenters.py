"""Augmentation (``AUGMENTERS``): which policy trains the model, and how strongly per sample.

Fitted state (family contract of issue 5): ``augment_`` (dict, the policy directive written to
plan.json ``augment`` under its slot - ``image``, ``mix`` or ``features``, see
:func:`dataopt.optimize.augment.batch.slot`) and/or ``augment_magnitude_`` ((n,) float in [0, 1],
the plan column ``augment_magnitude``: 0 = no augmentation beyond ``train.augment``), plus
``reason_`` ((n,) str) and ``summary_`` (dict with ``counts``).

Image policies are torchvision v2 (flips and crops, RandAugment, TrivialAugmentWide, AutoAugment,
AugMix), applied on the device per batch by :class:`~dataopt.optimize.augment.batch.BatchAugmenter`;
MixUp/CutMix mix batches (soft targets, see that module); ``gaussian_noise`` and ``smote`` are
feature-space augmentations for head-only training (pure functions in
:mod:`dataopt.optimize.augment.features`).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError, DataError
from dataopt.optimize.augment.features import smote_targets
from dataopt.registry import AUGMENTERS


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"augmenter {name} must be in [{lo}, {hi}], got {value}")


class _Policy:
    """Shared fit for policies with one magnitude for every sample."""

    requires = ("labels",)
    policy = ""

    def _directive(self) -> dict[str, Any]:
        raise NotImplementedError

    def _magnitude(self) -> Optional[float]:
        return None

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "_Policy":
        """``labels`` (n,) -> ``augment_`` dict, ``augment_magnitude_`` (n,) (None for mixing)."""
        n = len(labels)
        self.augment_ = {"policy": self.policy, **self._directive()}
        m = self._magnitude()
        self.augment_magnitude_ = None if m is None else np.full(n, float(m))
        desc = ", ".join(f"{k} {v}" for k, v in self.augment_.items() if k != "policy")
        text = f"{self.policy}: {desc}" if m is None else f"{self.policy}: magnitude {m:.2f} ({desc})"
        self.reason_ = np.full(n, text)
        self.summary_ = {"counts": {"augmented": n if m is None or m > 0 else 0}}
        return self


@AUGMENTERS.register("flips_crops")
class FlipsCrops(_Policy):
    """Random translation (reflect padding, up to ``pad_fraction`` of the width) and horizontal flips.

    The standard CIFAR augmentation (He et al. 2016, ResNet §4.2). ``magnitude`` scales the largest
    shift per sample (plan ``augment_magnitude``).
    """

    policy = "flips_crops"

    def __init__(self, magnitude: float = 1.0, pad_fraction: float = 0.125, flip: bool = True):
        self.magnitude = magnitude
        self.pad_fraction = pad_fraction
        self.flip = flip

    def _directive(self):
        _check("flips_crops.pad_fraction", self.pad_fraction, 0.0, 0.5)
        return {"pad_fraction": float(self.pad_fraction), "flip": bool(self.flip)}

    def _magnitude(self):
        _check("flips_crops.magnitude", self.magnitude, 0.0, 1.0)
        return float(self.magnitude)


@AUGMENTERS.register("randaugment")
class RandAugmentPolicy(_Policy):
    """RandAugment (Cubuk et al. 2020, §3): ``num_ops`` random ops at one global ``magnitude``.

    ``magnitude`` is a bin in ``[0, num_magnitude_bins - 1]``; the plan magnitude is
    ``magnitude / (num_magnitude_bins - 1)`` (a later ``magnitude_from_plan`` step can vary it).
    """

    policy = "randaugment"

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins

    def _directive(self):
        if self.num_magnitude_bins < 2 or self.num_ops < 1:
            raise ConfigError("randaugment needs num_ops >= 1 and num_magnitude_bins >= 2")
        _check("randaugment.magnitude", self.magnitude, 0, self.num_magnitude_bins - 1)
        return {"num_ops": int(self.num_ops), "magnitude": int(self.magnitude),
                "num_magnitude_bins": int(self.num_magnitude_bins)}

    def _magnitude(self):
        return self.magnitude / (self.num_magnitude_bins - 1)


@AUGMENTERS.register("trivialaugment")
class TrivialAugmentPolicy(_Policy):
    """TrivialAugment Wide (Müller & Hutter 2021, §3): one random op at a random magnitude.

    It has no magnitude knob: the plan magnitude is the probability the policy is applied.
    """

    policy = "trivialaugment"

    def __init__(self, probability: float = 1.0, num_magnitude_bins: int = 31):
        self.probability = probability
        self.num_magnitude_bins = num_magnitude_bins

    def _directive(self):
        return {"num_magnitude_bins": int(self.num_magnitude_bins)}

    def _magnitude(self):
        _check("trivialaugment.probability", self.probability, 0.0, 1.0)
        return float(self.probability)


@AUGMENTERS.register("autoaugment")
class AutoAugmentPolicy(_Policy):
    """AutoAugment (Cubuk et al. 2019, §3) with a learned policy set: ``cifar10``, ``imagenet``, ``svhn``.

    The plan magnitude is the probability the policy is applied.
    """

    policy = "autoaugment"

    def __init__(self, policy_name: str = "cifar10", probability: float = 1.0):
        self.policy_name = policy_name
        self.probability = probability

    def _directive(self):
        valid = ("cifar10", "imagenet", "svhn")
        if self.policy_name not in valid:
            raise ConfigError(f"autoaugment policy_name {self.policy_name!r}; valid: {', '.join(valid)}")
        return {"policy_name": self.policy_name}

    def _magnitude(self):
        _check("autoaugment.probability", self.probability, 0.0, 1.0)
        return float(self.probability)


@AUGMENTERS.register("augmix")
class AugMixPolicy(_Policy):
    """AugMix (Hendrycks et al. 2020, §3): mixed chains of ops; ``severity`` 1..10 (plan magnitude
    ``(severity - 1) / 9``). The Jensen-Shannon consistency loss of the paper is not used."""

    policy = "augmix"

    def __init__(self, severity: int = 3, mixture_width: int = 3, chain_depth: int = -1, alpha: float = 1.0):
        self.severity = severity
        self.mixture_width = mixture_width
        self.chain_depth = chain_depth
        self.alpha = alpha

    def _directive(self):
        _check("augmix.severity", self.severity, 1, 10)
        return {"severity": int(self.severity), "mixture_width": int(self.mixture_width),
                "chain_depth": int(self.chain_depth), "alpha": float(self.alpha)}

    def _magnitude(self):
        return (self.severity - 1) / 9


@AUGMENTERS.register("mixup")
class MixUpPolicy(_Policy):
    """MixUp (Zhang et al. 2018, §2): convex combinations of sample pairs and of their labels,
    ``lam ~ Beta(alpha, alpha)`` per batch. Trained with soft targets (see ``augment/batch.py``)."""

    policy = "mixup"

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha

    def _directive(self):
        if not self.alpha > 0:
            raise ConfigError(f"mixup alpha must be > 0, got {self.alpha}")
        return {"alpha": float(self.alpha)}


@AUGMENTERS.register("cutmix")
class CutMixPolicy(_Policy):
    """CutMix (Yun et al. 2019, §3.1): paste a random box of the partner image; label weight = area."""

    policy = "cutmix"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _directive(self):
        if not self.alpha > 0:
            raise ConfigError(f"cutmix alpha must be > 0, got {self.alpha}")
        return {"alpha": float(self.alpha)}


@AUGMENTERS.register("gaussian_noise")
class GaussianNoisePolicy(_Policy):
    """Feature-space Gaussian noise on embeddings for head-only training (survey 000 §VI-B,
    feature-space augmentation); applied by :func:`~dataopt.optimize.augment.features.gaussian_noise`."""

    policy = "gaussian_noise"

    def __init__(self, sigma: float = 0.05):
        self.sigma = sigma

    def _directive(self):
        if not self.sigma >= 0:
            raise ConfigError(f"gaussian_noise sigma must be >= 0, got {self.sigma}")
        return {"sigma": float(self.sigma)}


@AUGMENTERS.register("smote")
class SmotePolicy:
    """SMOTE for minority classes (Chawla et al. 2002, §4.2), feature space, head-only training.

    The plan records only that SMOTE is on (``augment.features``) and how many synthetic rows each
    class would get; the head trainer calls :func:`~dataopt.optimize.augment.features.smote`.

    Parameters
    ----------
    k : neighbours within the class
    target : ``"max"`` (every class up to the largest kept class) or a share in (0, 1] of it
    """

    requires = ("labels",)

    def __init__(self, k: int = 5, target: Any = "max"):
        self.k = k
        self.target = target

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "SmotePolicy":
        """``labels`` (n,) -> ``augment_`` dict with per-class synthetic counts over the kept rows."""
        y = np.asarray(labels, dtype=np.int64)
        if self.k < 1:
            raise ConfigError(f"smote k must be >= 1, got {self.k}")
        kept = y if keep is None else y[np.asarray(keep, bool)]
        if kept.size == 0:
            raise DataError("smote: no kept training sample")
        counts = np.bincount(kept, minlength=int(y.max()) + 1)
        targets = smote_targets(kept, self.target)
        targets = np.pad(targets, (0, counts.size - targets.size))
        extra = np.where(counts > 0, targets - counts, 0)
        self.augment_ = {"policy": "smote", "k": int(self.k), "target": self.target,
                         "synthetic_per_class": {str(c): int(e) for c, e in enumerate(extra) if e > 0}}
        self.augment_magnitude_ = None
        self.reason_ = np.where(extra[y] > 0, join("smote: minority class, ", fmt(extra[y], "%d"),
                                                   " synthetic rows for it"), "")
        self.summary_ = {"counts": {"synthetic": int(extra.sum()),
                                    "minority_classes": int((extra > 0).sum())}}
        return self


@AUGMENTERS.register("magnitude_from_plan")
class MagnitudeFromSignal:
    """Per-sample augmentation magnitude from a signal: strong for easy samples, weak for hard ones.

    Static form of AdaAugment's intuition (paper 001: the augmentation strength should follow how well
    the model already fits the sample - easy, low-loss samples tolerate stronger augmentation, hard
    or noisy ones get little). The magnitude is the sample's rank percentile of ``signal`` mapped to
    ``[low, high]``; ``easy_high=True`` gives the lowest signal value the highest magnitude.

    Parameters
    ----------
    signal : a numeric column of perceive/signals.parquet (default ``loss_last``)
    low, high : magnitude range in [0, 1]
    easy_high : True = low signal (easy) -> high magnitude; False = the reverse
    """

    requires = ("signals",)

    def __init__(self, signal: str = "loss_last", low: float = 0.0, high: float = 1.0, easy_high: bool = True):
        self.signal = signal
        self.low = low
        self.high = high
        self.easy_high = easy_high

    def fit(self, signals: pd.DataFrame, keep: Optional[np.ndarray] = None) -> "MagnitudeFromSignal":
        """``signals`` (n rows) -> ``augment_magnitude_`` (n,) in [low, high]."""
        numeric = [c for c in signals.columns if c not in ("sample_id", "label", "pred_label")
                   and pd.api.types.is_numeric_dtype(signals[c])]
        if self.signal not in numeric:
            raise ConfigError(f"magnitude_from_plan signal {self.signal!r} is not a numeric signal; "
                              f"valid: {', '.join(numeric)}")
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ConfigError(f"magnitude_from_plan needs 0 <= low <= high <= 1, got {self.low}, {self.high}")
        s = signals[self.signal].to_numpy(np.float64)
        if not np.isfinite(s).all():
            raise DataError(f"signal {self.signal!r} has values that are not finite")
        n = s.size
        rank = np.empty(n)
        rank[np.argsort(s, kind="stable")] = np.arange(n)
        pct = rank / max(1, n - 1)  # 0 = smallest signal value
        scale = 1.0 - pct if self.easy_high else pct
        self.augment_magnitude_ = self.low + (self.high - self.low) * scale
        self.augment_ = None
        self.reason_ = join(f"magnitude_from_plan: {self.signal} ", fmt(s, "%.3g"), " -> magnitude ",
                            fmt(self.augment_magnitude_, "%.2f"))
        self.summary_ = {"counts": {"augmented": int((self.augment_magnitude_ > 0).sum())},
                         "magnitude_mean": float(self.augment_magnitude_.mean()) if n else 0.0}
        return self
