"""Plumbing shared by the static selectors: the budget, per-class quotas, top-m picks, signal lookup.

Budget rule (issue-5 contract): ``ratio`` / ``n_keep`` count against the ORIGINAL train set (``n`` rows
passed to ``fit``); the ``m`` samples are chosen among the rows still kept (``keep``). When fewer rows
remain than asked for, all of them are kept and the reason says so.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError, DataError
from dataopt.perceive import signals as _signals  # noqa: F401  (fills SIGNALS: their directions)
from dataopt.registry import SIGNALS

NOT_SCORES = {"sample_id", "label", "pred_label"}  # numeric signal columns that are not scores


def n_keep(n: int, ratio: float) -> int:
    """How many of ``n`` samples a selection at ``ratio`` keeps: ``round(ratio * n)``, in [1, n]."""
    if n < 1:
        raise DataError("there are no training samples to select from")
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"optimize.ratio must be in (0, 1], got {ratio}")
    return int(min(n, max(1, round(ratio * n))))


def counts(keep: np.ndarray) -> dict[str, int]:
    return {"kept": int(keep.sum()), "dropped": int(keep.size - keep.sum())}


def quotas(sizes: np.ndarray, m: int) -> np.ndarray:
    """Split ``m`` kept samples over groups of ``sizes`` proportionally (largest remainder).

    Parameters
    ----------
    sizes : (g,) int
    m : int, ``0 <= m <= sizes.sum()``

    Returns
    -------
    (g,) int64, summing to ``m``, each ``<= sizes``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    q = m * sizes / max(int(sizes.sum()), 1)
    base = np.minimum(np.floor(q + 1e-9).astype(np.int64), sizes)
    rest = m - int(base.sum())
    frac = np.where(base < sizes, q - base, -1.0)  # a full group cannot take another sample
    base[np.argsort(-frac, kind="stable")[:rest]] += 1
    return base


class Budget:
    """How many samples a selector keeps and among which rows.

    Attributes
    ----------
    n : int
        Rows passed to ``fit`` (the original train set).
    rows : (a,) int64
        Positions of the rows still kept (the candidates), ascending.
    m : int
        Samples to keep among ``rows`` (``min(target, a)``).
    target : int or None
        ``n_keep`` or ``round(ratio * n)``; None when neither was given.
    short : str
        Non-empty when fewer rows remained than the target (said in the reasons).
    """

    def __init__(self, n: int, keep: Optional[np.ndarray], ratio: Optional[float],
                 n_keep_: Optional[int]):
        if n < 1:
            raise DataError("there are no training samples to select from")
        if keep is None:
            keep = np.ones(n, dtype=bool)
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (n,):
            raise DataError(f"keep has shape {keep.shape}, expected ({n},)")
        self.n, self.keep_in = n, keep
        self.rows = np.flatnonzero(keep)
        if n_keep_ is not None:
            if int(n_keep_) != n_keep_ or not 1 <= n_keep_ <= n:
                raise ConfigError(f"n_keep must be an integer in [1, {n}], got {n_keep_}")
            self.target: Optional[int] = int(n_keep_)
        elif ratio is not None:
            self.target = n_keep(n, ratio)
        else:
            self.target = None
        a = self.rows.size
        want = a if self.target is None else self.target
        self.m = int(min(want, a))
        self.short = (f"only {a} rows remained for the {want} asked; all kept"
                      if want > a else "")


def groups(labels: np.ndarray, rows: np.ndarray, per_class: bool) -> np.ndarray:
    """Group index (0..g-1) of each candidate row: its class when ``per_class``, else 0."""
    if not per_class:
        return np.zeros(rows.size, dtype=np.int64)
    return np.unique(np.asarray(labels)[rows], return_inverse=True)[1].astype(np.int64)


def top_m(priority: np.ndarray, m: int, group: Optional[np.ndarray] = None,
          tiebreak: Optional[np.ndarray] = None) -> np.ndarray:
    """Mask of the ``m`` highest ``priority`` values; with ``group``, proportional quotas per group.

    Parameters
    ----------
    priority : (a,) float
    m : int
    group : (a,) int, optional
        Group of each entry (per-class quotas, largest remainder).
    tiebreak : (a,) float, optional
        Higher wins among equal priorities; default: earlier position wins.

    Returns
    -------
    (a,) bool with exactly ``m`` True.
    """
    a = priority.size
    if group is None:
        group = np.zeros(a, dtype=np.int64)
    sizes = np.bincount(group)
    q = quotas(sizes, m)
    tb = -np.arange(a, dtype=np.float64) if tiebreak is None else tiebreak
    order = np.lexsort((-tb, -priority, group))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(a, dtype=np.int64)
    rank[order] = np.arange(a) - starts[group[order]]
    return rank < q[group]


def signal_column(signals: Optional[pd.DataFrame], name: str, who: str) -> np.ndarray:
    """A finite numeric column of the signals table as float64 (n,); errors name the valid columns."""
    numeric = [c for c in (signals.columns if signals is not None else [])
               if c not in NOT_SCORES and pd.api.types.is_numeric_dtype(signals[c])]
    if name not in numeric:
        raise ConfigError(f"{who}: {name!r} is not a numeric signal; "
                          f"valid: {', '.join(numeric) or '(no signals given)'}")
    s = signals[name].to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise DataError(f"signal {name!r} is missing or not finite at {bad.size} rows "
                        f"(first: row {bad[0]}); {who} needs a score per sample")
    return s


def harder_is_higher(name: str) -> bool:
    """Whether a larger value of signal ``name`` means harder / more likely mislabeled, read from the
    signal catalogue's ``direction`` (``"higher = ..."`` / ``"lower = ..."``); unknown: higher."""
    if name not in SIGNALS:
        return True
    return not str(getattr(SIGNALS.get(name), "direction", "")).startswith("lower")


def finish(sel, budget: Budget, chosen: np.ndarray, score: Optional[np.ndarray],
           kept_why: np.ndarray, dropped_why: np.ndarray, summary: dict) -> None:
    """Set ``keep_``, ``score_``, ``reason_``, ``summary_`` of a selector.

    Parameters
    ----------
    chosen : (a,) bool over ``budget.rows``
    kept_why, dropped_why : (a,) str or str
        Reason text (after ``"<name>: kept, "`` / ``"<name>: dropped, "``) for the candidate rows.
    """
    name = getattr(sel, "registered_name", type(sel).__name__)
    n = budget.n
    keep = np.zeros(n, dtype=bool)
    keep[budget.rows[chosen]] = True
    reason = np.full(n, f"{name}: dropped earlier, not a candidate", dtype=object).astype(str)
    kept_why = np.broadcast_to(np.asarray(kept_why).astype(str), chosen.shape)
    dropped_why = np.broadcast_to(np.asarray(dropped_why).astype(str), chosen.shape)
    if budget.short:
        kept_why = join(kept_why, " (", budget.short, ")")
    reason_c = np.where(chosen, join(f"{name}: kept, ", kept_why),
                        join(f"{name}: dropped, ", dropped_why))
    reason = reason.astype(reason_c.dtype if reason_c.dtype.itemsize > reason.dtype.itemsize
                           else reason.dtype)
    reason[budget.rows] = reason_c
    sel.keep_ = keep
    if score is not None:
        full = np.full(n, np.nan)
        full[budget.rows] = score
        score = full
    sel.score_ = score
    sel.reason_ = reason
    sel.summary_ = {**summary, "counts": counts(keep), "candidates": int(budget.rows.size)}
    if budget.short:
        sel.summary_["note"] = budget.short


__all__ = ["Budget", "counts", "finish", "fmt", "groups", "harder_is_higher", "join", "n_keep",
           "quotas", "signal_column", "top_m"]
