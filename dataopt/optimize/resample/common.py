"""Vectorised helpers shared by the resample, weight and perturb families.

All of them work over the train rows; ``keep`` (n,) bool marks the rows still kept by earlier steps of
the plan. Class statistics are counted over the kept rows only (what training will actually see);
rows that are not kept get values too (the plan stores every row) but they are never trained on.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dataopt.errors import ConfigError, DataError


def keep_mask(keep: Optional[np.ndarray], n: int) -> np.ndarray:
    """``keep`` as an (n,) bool array (None = every row kept); DataError when nothing is kept."""
    if keep is None:
        mask = np.ones(n, dtype=bool)
    else:
        mask = np.asarray(keep, dtype=bool)
        if mask.shape != (n,):
            raise DataError(f"keep has shape {mask.shape}, expected ({n},) like the labels")
    if n and not mask.any():
        raise DataError("no training sample is kept by the earlier optimize steps")
    return mask


def class_counts(labels: np.ndarray, keep: np.ndarray, n_classes: Optional[int] = None) -> np.ndarray:
    """Kept rows per class: ``(C,)`` int64 with ``C = max(n_classes, max(labels) + 1)``."""
    labels = np.asarray(labels, dtype=np.int64)
    c = max(int(n_classes or 0), int(labels.max()) + 1 if labels.size else 0)
    return np.bincount(labels[keep], minlength=c).astype(np.int64)


def mean_one(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Scale ``w`` so that its mean over the kept rows is 1 (the loop renormalises anyway)."""
    m = float(w[keep].mean()) if keep.any() else 1.0
    return w / m if m > 0 else np.ones_like(w)


def check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """``value`` as a float in the interval, else a ConfigError naming the kwarg."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or not np.isfinite(v):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def column(table: Any, name: str, what: str, kwarg: str) -> np.ndarray:
    """Column ``name`` of a DataFrame / mapping of (n,) arrays as float64; ConfigError lists the valid."""
    cols = list(table.columns) if hasattr(table, "columns") else list(table)
    if name not in cols:
        raise ConfigError(f"{kwarg}={name!r} is not a column of {what}; available: "
                          f"{', '.join(map(str, cols))}")
    values = np.asarray(table[name], dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{what} column {name!r} has {int((~np.isfinite(values)).sum())} "
                        "non-finite values; re-run the stage that writes it")
    return values


def power_weights(score: np.ndarray, keep: np.ndarray, temperature: float, floor: float,
                  max_weight: float) -> np.ndarray:
    """Weights proportional to a non-negative score, sharpened or flattened by a temperature.

    ``w_i = (s_i / mean_kept(s))^(1/T) + floor``, clipped at ``max_weight``, then scaled to mean 1 over
    the kept rows. ``T = 1`` is the proportional rule of survey 000 §VI-A eq. 2 (rate ∝ difficulty);
    ``T -> inf`` is uniform; ``floor`` keeps a zero-score row drawable.
    """
    s = np.clip(score, 0.0, None)
    mean = float(s[keep].mean())
    rel = s / mean if mean > 0 else np.ones_like(s)
    w = np.minimum(rel ** (1.0 / temperature) + floor, max_weight)
    return mean_one(w, keep)


def counts_summary(values: np.ndarray, keep: np.ndarray, name: str) -> dict[str, Any]:
    """``summary_`` for plan.json: counts and min/mean/max of ``values`` over the kept rows."""
    v = values[keep]
    return {
        "counts": {"kept": int(keep.sum()), "above_1": int((v > 1 + 1e-12).sum()),
                   "below_1": int((v < 1 - 1e-12).sum()), "zero": int((v == 0).sum())},
        name: {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())},
    }
