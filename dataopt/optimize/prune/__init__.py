"""Static pruning: keep a fixed share of the training set (``SELECTORS``).

Every selector is built with ``ratio`` (the share kept, ``optimize.ratio``) and fitted on the train
rows; it keeps exactly :func:`n_keep` samples. Fitted state: ``keep_`` (n,) bool, ``reason_`` (n,) str
(which rule decided, from which values), ``summary_`` (dict for plan.json, with ``counts``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from dataopt.analyze.base import fmt, join
from dataopt.errors import ConfigError, DataError
from dataopt.registry import SELECTORS


_NOT_SCORES = {"sample_id", "label", "pred_label"}  # numeric signal columns that are not scores


def n_keep(n: int, ratio: float) -> int:
    """How many of ``n`` samples a selection at ``ratio`` keeps: ``round(ratio * n)``, in [1, n]."""
    if n < 1:
        raise DataError("there are no training samples to select from")
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"optimize.ratio must be in (0, 1], got {ratio}")
    return int(min(n, max(1, round(ratio * n))))


def _counts(keep: np.ndarray) -> dict[str, int]:
    return {"kept": int(keep.sum()), "dropped": int(keep.size - keep.sum())}


@SELECTORS.register("none")
class KeepAll:
    """Keep every sample (the full-data baseline)."""

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray) -> "KeepAll":
        """``labels`` (n,) int -> ``keep_`` all True."""
        n = len(labels)
        self.keep_ = np.ones(n, dtype=bool)
        self.reason_ = np.full(n, "none: kept, no selection")
        self.summary_ = {"counts": _counts(self.keep_)}
        return self


@SELECTORS.register("random")
class RandomSubset:
    """A uniform random subset of ``round(ratio * n)`` samples (the baseline every selector must beat).

    Parameters
    ----------
    ratio : float
        Share kept, in (0, 1].
    random_state : int or None
    """

    requires = ("labels",)

    def __init__(self, ratio: float = 1.0, random_state: Optional[int] = None):
        self.ratio = ratio
        self.random_state = random_state

    def fit(self, labels: np.ndarray) -> "RandomSubset":
        """``labels`` (n,) int -> ``keep_`` (n,) bool with exactly ``n_keep(n, ratio)`` True."""
        n = len(labels)
        m = n_keep(n, self.ratio)
        rng = np.random.default_rng(self.random_state)
        self.keep_ = np.zeros(n, dtype=bool)
        self.keep_[rng.permutation(n)[:m]] = True
        seed = f"seed {self.random_state}"
        self.reason_ = np.where(self.keep_, f"random: kept, uniform draw ({seed})",
                                f"random: dropped, uniform draw ({seed})")
        self.summary_ = {"counts": _counts(self.keep_)}
        return self


def class_centre_distance(embeddings: np.ndarray, labels: np.ndarray,
                          block: int = 16384) -> np.ndarray:
    """Euclidean distance of each embedding to the mean embedding of its class.

    Parameters
    ----------
    embeddings : (n, d) float
    labels : (n,) int

    Returns
    -------
    (n,) float64
    """
    z = np.asarray(embeddings, dtype=np.float32)
    classes, inv = np.unique(labels, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.searchsorted(inv[order], np.arange(classes.size))
    centres = np.add.reduceat(z[order], starts, axis=0, dtype=np.float64)
    centres = (centres / np.bincount(inv)[:, None]).astype(np.float32)
    out = np.empty(len(z), dtype=np.float64)
    for s in range(0, len(z), block):  # blocks of rows bound the (block, d) temporary
        diff = z[s:s + block] - centres[inv[s:s + block]]
        out[s:s + block] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _quotas(counts: np.ndarray, m: int, ratio: float) -> np.ndarray:
    """Split ``m`` kept samples over classes proportionally (largest remainder), summing to ``m``."""
    q = ratio * counts
    base = np.minimum(np.floor(q).astype(np.int64), counts)
    rest = m - int(base.sum())
    frac = np.where(base < counts, q - base, -1.0)  # a full class cannot take another sample
    base[np.argsort(-frac, kind="stable")[:rest]] += 1
    return base


@SELECTORS.register("moderate")
class ModerateCoreset:
    """Moderate coreset (Xia et al., ICLR 2023; paper 002 §3.2): keep the samples whose score is
    closest to the score median.

    The default score is the distance of a sample's embedding to its class centre,
    ``d_i = ||z_i - c_{y_i}||_2`` with ``c_y`` the mean embedding of class ``y``; ``score`` names any
    other signal column instead (e.g. ``el2n``: "EL2N+" in the paper). Samples are sorted by score
    ascending and the ``m = round(ratio * n)`` in the middle are kept: the paper's coreset
    ``{s_(a+1), ..., s_(n-a)}`` with ``a = (n - m) / 2``; when ``n - m`` is odd the extra sample is
    dropped from the top. Ties are broken by row order.

    Parameters
    ----------
    ratio : float
        Share kept, in (0, 1].
    score : str or None
        A numeric column of perceive/signals.parquet; None = class-centre distance of the embeddings.
    per_class : bool
        False (the paper): one band around the global median. True: each class keeps its
        proportional share (largest remainder) around its own median.
    """

    requires = ("labels", "embeddings", "signals")

    def __init__(self, ratio: float = 1.0, score: Optional[str] = None, per_class: bool = False):
        self.ratio = ratio
        self.score = score
        self.per_class = per_class

    def _scores(self, labels: np.ndarray, embeddings: Optional[np.ndarray],
                signals: Optional[pd.DataFrame]) -> np.ndarray:
        if self.score is None:
            if embeddings is None:
                raise ConfigError("moderate without kwargs.score needs embeddings")
            return class_centre_distance(embeddings, labels)
        numeric = [c for c in (signals.columns if signals is not None else [])
                   if c not in _NOT_SCORES and pd.api.types.is_numeric_dtype(signals[c])]
        if self.score not in numeric:
            raise ConfigError(f"optimize.kwargs.score: {self.score!r} is not a numeric signal; "
                              f"valid: {', '.join(numeric) or '(no signals given)'}")
        s = signals[self.score].to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            raise DataError(f"signal {self.score!r} is missing or not finite at {bad.size} rows "
                            f"(first: row {bad[0]}); moderate selection needs a score per sample")
        return s

    def fit(self, labels: np.ndarray, embeddings: Optional[np.ndarray] = None,
            signals: Optional[pd.DataFrame] = None) -> "ModerateCoreset":
        """Select the middle band of the score.

        Parameters
        ----------
        labels : (n,) int
        embeddings : (n, d) float, optional
            Needed for the default class-centre distance.
        signals : DataFrame with n rows, optional
            Needed when ``score`` names a column.

        Returns
        -------
        self, with ``score_`` (n,), ``keep_`` (n,) bool, ``reason_`` (n,) str, ``summary_``.
        """
        labels = np.asarray(labels)
        n = labels.size
        m = n_keep(n, self.ratio)
        s = self._scores(labels, embeddings, signals)
        if self.per_class:
            group = np.unique(labels, return_inverse=True)[1]
            counts = np.bincount(group)
            m_c = _quotas(counts, m, self.ratio)
        else:
            group = np.zeros(n, dtype=np.int64)
            counts, m_c = np.array([n]), np.array([m])
        # Sort by (group, score); stable, so equal scores keep row order and runs are reproducible.
        order = np.lexsort((np.arange(n), s, group))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[group[order]]  # rank of each sample within its group
        lo = (counts - m_c) // 2  # dropped from the low end of each group; the rest from the top
        keep = (rank >= lo[group]) & (rank < (lo + m_c)[group])
        # Band bounds per group: scores of the first and last kept sample (nan for an empty band).
        has = m_c > 0
        first = order[np.where(has, starts + lo, 0)]
        last = order[np.where(has, starts + lo + m_c - 1, 0)]
        band_lo = np.where(has, s[first], np.nan)
        band_hi = np.where(has, s[last], np.nan)
        median = pd.Series(s).groupby(group).median().to_numpy()

        self.score_, self.keep_ = s, keep
        name = self.score or "distance"
        scope = "class median" if self.per_class else "median"
        band = join("[", fmt(band_lo[group], "%.4g"), ", ", fmt(band_hi[group], "%.4g"),
                    "] around ", scope, " ", fmt(median[group], "%.4g"))
        value = join(name, " ", fmt(s, "%.4g"))
        side = np.where(rank < lo[group], " below kept band ", " above kept band ")
        reason = np.where(keep, join("moderate: kept, ", value, " within ", band),
                          join("moderate: dropped, ", value, side, band))
        if not has.all():
            empty = join("moderate: dropped, ", value, ", class keeps 0 of ",
                         counts[group].astype(str))
            reason = np.where(has[group], reason, empty)
        self.reason_ = reason
        self.summary_ = {
            "score": name,
            "per_class": bool(self.per_class),
            "counts": _counts(keep),
        }
        if not self.per_class:
            self.summary_["median"] = float(median[0])
            self.summary_["band"] = [float(band_lo[0]), float(band_hi[0])]
        return self
