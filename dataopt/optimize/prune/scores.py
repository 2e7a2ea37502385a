"""Score-based static selectors: none, random, moderate (any score), easy/hard/moderate variants of
EL2N / forgetting / GraNd / AUM, coverage-centric (CCS) and the ``p_clean`` noise filter."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from dataopt.errors import ConfigError
from dataopt.optimize.prune.base import (Budget, finish, fmt, groups, harder_is_higher, join, quotas,
                                         signal_column, top_m)
from dataopt.perceive.diversity import class_centre_distance
from dataopt.registry import SELECTORS


@SELECTORS.register("none")
class KeepAll:
    """Keep every incoming sample (the full-data baseline)."""

    requires = ("labels",)

    def __init__(self):
        pass

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "KeepAll":
        """``labels`` (n,) int -> ``keep_`` = the incoming ``keep`` (all True by default)."""
        n = len(labels)
        self.keep_ = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool).copy()
        self.score_ = None
        self.reason_ = np.where(self.keep_, "none: kept, no selection", "none: dropped earlier")
        self.summary_ = {"counts": {"kept": int(self.keep_.sum()),
                                    "dropped": int(n - self.keep_.sum())}}
        return self


@SELECTORS.register("random")
class RandomSubset:
    """A uniform random subset (the baseline every selector must beat); with ``per_class``, each class
    keeps its proportional share.

    Parameters
    ----------
    ratio : float, optional
        Share of the original train set kept, in (0, 1]; None with no ``n_keep``: keep all.
    n_keep : int, optional
        Count kept instead of ``ratio``.
    per_class : bool
    random_state : int or None
    """

    requires = ("labels",)

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state

    def fit(self, labels: np.ndarray, keep: Optional[np.ndarray] = None) -> "RandomSubset":
        """``labels`` (n,) int -> ``keep_`` (n,) bool with exactly the budget True."""
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        rng = np.random.default_rng(self.random_state)
        u = rng.random(b.rows.size)
        chosen = top_m(u, b.m, groups(labels, b.rows, self.per_class))
        why = f"uniform draw (seed {self.random_state})"
        finish(self, b, chosen, None, why, why, {"per_class": bool(self.per_class)})
        return self


def band(s: np.ndarray, m: int, group: np.ndarray, mode: str,
         tiebreak: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep ``m`` of the scores ``s`` per group quota: the lowest (``easy``), the highest (``hard``)
    or the middle band around the median (``moderate``, paper 002 §3.2: sort ascending, drop
    ``(n_g - m_g) // 2`` from the low end and the rest from the top).

    Parameters
    ----------
    s : (a,) float  (higher = harder)
    m : int
    group : (a,) int
    mode : "easy" | "hard" | "moderate"
    tiebreak : (a,) float, optional
        Ascending order among equal scores (default: row order).

    Returns
    -------
    keep (a,) bool, rank (a,) int (ascending rank within the group), lo (g,) int (dropped below).
    """
    a = s.size
    sizes = np.bincount(group)
    m_g = quotas(sizes, m)
    tb = np.arange(a, dtype=np.float64) if tiebreak is None else tiebreak
    order = np.lexsort((tb, s, group))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(a, dtype=np.int64)
    rank[order] = np.arange(a) - starts[group[order]]
    lo = {"easy": np.zeros_like(sizes), "hard": sizes - m_g,
          "moderate": (sizes - m_g) // 2}[mode]
    keep = (rank >= lo[group]) & (rank < (lo + m_g)[group])
    return keep, rank, lo


@SELECTORS.register("moderate")
class ModerateCoreset:
    """Moderate coreset (Xia et al., ICLR 2023; paper 002 §3.2): keep the samples whose score is
    closest to the score median.

    The default score is the distance of a sample's embedding to its class centre,
    ``d_i = ||z_i - c_{y_i}||_2`` with ``c_y`` the mean embedding of class ``y`` over the candidate
    rows; ``score`` names any other signal column instead (e.g. ``el2n``: "EL2N+" in the paper).
    The paper's extractor never saw the labels (a public pre-trained model). When the embeddings come
    from a network trained on the noisy labels (the ``proxy`` embedder), ``score="oof_center_distance"``
    keeps that property: the same distance in the feature space of the perceive fold model that held
    the row out.
    Samples are sorted by score ascending and the ``m`` in the middle are kept: the paper's coreset
    ``{s_(a+1), ..., s_(n-a)}`` with ``a = (n - m) / 2``; when ``n - m`` is odd the extra sample is
    dropped from the top. Ties are broken by row order.

    Parameters
    ----------
    ratio : float, optional
        Share of the original train set kept, in (0, 1]; None with no ``n_keep``: keep all.
    score : str or None
        A numeric column of perceive/signals.parquet; None = class-centre distance of the embeddings.
    per_class : bool
        False (the paper): one band around the global median. True: each class keeps its
        proportional share (largest remainder) around its own median.
    n_keep : int, optional
    random_state : int or None
        Unused (deterministic); accepted so every selector takes the seed.
    """

    requires = ("labels", "embeddings", "signals")

    def __init__(self, ratio: Optional[float] = None, score: Optional[str] = None,
                 per_class: bool = False, n_keep: Optional[int] = None,
                 random_state: Optional[int] = 0):
        self.ratio = ratio
        self.score = score
        self.per_class = per_class
        self.n_keep = n_keep
        self.random_state = random_state

    def _scores(self, labels, rows, embeddings, signals) -> np.ndarray:
        if self.score is None:
            if embeddings is None:
                raise ConfigError("moderate without kwargs.score needs embeddings")
            return class_centre_distance(np.asarray(embeddings)[rows], labels[rows])
        return signal_column(signals, self.score, "optimize.kwargs.score")[rows]

    def fit(self, labels: np.ndarray, embeddings: Optional[np.ndarray] = None,
            signals: Optional[pd.DataFrame] = None,
            keep: Optional[np.ndarray] = None) -> "ModerateCoreset":
        """Select the middle band of the score among the incoming ``keep`` rows.

        Parameters
        ----------
        labels : (n,) int
        embeddings : (n, d) float, optional
            Needed for the default class-centre distance.
        signals : DataFrame with n rows, optional
            Needed when ``score`` names a column.
        keep : (n,) bool, optional
            Rows still kept (candidates); default all.

        Returns
        -------
        self, with ``score_`` (n,) (nan for non-candidates), ``keep_`` (n,) bool, ``reason_`` (n,)
        str, ``summary_``.
        """
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        s = self._scores(labels, b.rows, embeddings, signals)
        group = groups(labels, b.rows, self.per_class)
        chosen, rank, lo = band(s, b.m, group, "moderate")
        m_g = np.bincount(group, weights=chosen).astype(np.int64)
        sizes = np.bincount(group)
        has = m_g > 0
        order = np.lexsort((np.arange(s.size), s, group))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        first = order[np.where(has, starts + lo, 0)]
        last = order[np.where(has, starts + lo + m_g - 1, 0)]
        band_lo = np.where(has, s[first], np.nan)
        band_hi = np.where(has, s[last], np.nan)
        median = pd.Series(s).groupby(group).median().to_numpy()

        name = self.score or "distance"
        scope = "class median" if self.per_class else "median"
        where = join("[", fmt(band_lo[group], "%.4g"), ", ", fmt(band_hi[group], "%.4g"),
                     "] around ", scope, " ", fmt(median[group], "%.4g"))
        value = join(name, " ", fmt(s, "%.4g"))
        side = np.where(rank < lo[group], " below kept band ", " above kept band ")
        dropped = join(value, side, where)
        if not has.all():
            dropped = np.where(has[group], dropped,
                               join(value, ", class keeps 0 of ", sizes[group].astype(str)))
        summary = {"score": name, "per_class": bool(self.per_class)}
        if not self.per_class:
            summary["median"] = float(median[0])
            summary["band"] = [float(band_lo[0]), float(band_hi[0])]
        finish(self, b, chosen, s, join(value, " within ", where), dropped, summary)
        return self


class _DifficultySelector:
    """Keep the easiest, the hardest or the moderate band of one difficulty signal.

    Subclasses set ``signal`` (a signals.parquet column) and ``mode`` (easy | hard | moderate). The
    direction (whether a larger value is harder) is read from the signal catalogue
    (``dataopt.perceive.signals``): higher = harder for el2n, grand, forgetting; lower margin =
    harder for aum. ``hard`` is the classic pruning rule (keep the hardest: Paul et al., NeurIPS 2021
    for EL2N/GraNd; Toneva et al., ICLR 2019 for forgetting; Pleiss et al., NeurIPS 2020 for AUM);
    ``easy`` keeps the lowest difficulty (robust under label noise); ``moderate`` applies paper 002's
    median band to the signal ("EL2N+", "GraNd+", paper 002 §4). Ties are broken by a seeded random
    order (forgetting counts are integers).

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random``.
    """

    requires = ("labels", "signals")
    signal = ""
    mode = ""

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state

    def fit(self, labels: np.ndarray, signals: pd.DataFrame,
            keep: Optional[np.ndarray] = None):
        """``labels`` (n,), ``signals`` (n rows with the signal column) -> ``keep_`` (n,) bool."""
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        raw = signal_column(signals, self.signal, self.registered_name)[b.rows]
        higher = harder_is_higher(self.signal)
        hard = raw if higher else -raw
        tb = np.random.default_rng(self.random_state).random(raw.size)
        chosen, _, _ = band(hard, b.m, groups(labels, b.rows, self.per_class), self.mode, tb)
        value = join(self.signal, " ", fmt(raw, "%.4g"))
        rule = {"easy": "lowest", "hard": "highest", "moderate": "median band of"}[self.mode]
        what = f" ({rule} difficulty kept; {'higher' if higher else 'lower'} = harder)"
        finish(self, b, chosen, hard, join(value, what), join(value, what),
               {"signal": self.signal, "mode": self.mode, "per_class": bool(self.per_class),
                "harder_is_higher": higher})
        return self


for _sig in ("el2n", "forgetting", "grand", "aum"):
    for _mode in ("easy", "hard", "moderate"):
        _name = f"{_sig}_{_mode}"
        SELECTORS.register(_name)(type(_name, (_DifficultySelector,), {
            "signal": _sig, "mode": _mode, "__module__": __name__,
            "__doc__": f"Keep the {_mode} share of signal ``{_sig}`` "
                       "(see ``_DifficultySelector``)."}))


@SELECTORS.register("coverage")
class CoverageCentric:
    """Coverage-centric coreset selection (CCS; Zheng et al., ICLR 2023, Algorithm 1): prune the
    hardest ``beta`` share of the candidates, split the remaining score range into ``strata``
    equal-width bins and spread the budget evenly over them (each bin takes
    ``min(size, budget left / bins left)``, smallest bins first), sampling at random within a bin.

    Parameters
    ----------
    ratio, n_keep, per_class, random_state : see ``random``.
    score : str
        Difficulty signal (default ``aum``); its direction comes from the signal catalogue.
    beta : float in [0, 1)
        Share of the hardest candidates pruned first (lowered when fewer would remain than kept).
    strata : int
        Number of score bins ``k``.
    """

    requires = ("labels", "signals")

    def __init__(self, ratio: Optional[float] = None, n_keep: Optional[int] = None,
                 per_class: bool = False, random_state: Optional[int] = 0, score: str = "aum",
                 beta: float = 0.1, strata: int = 50):
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state
        self.score = score
        self.beta = beta
        self.strata = strata

    def fit(self, labels: np.ndarray, signals: pd.DataFrame,
            keep: Optional[np.ndarray] = None) -> "CoverageCentric":
        """``labels`` (n,), ``signals`` -> ``keep_`` (n,) bool spread across score strata."""
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"coverage: beta must be in [0, 1), got {self.beta}")
        if int(self.strata) < 1:
            raise ConfigError(f"coverage: strata must be >= 1, got {self.strata}")
        labels = np.asarray(labels)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        raw = signal_column(signals, self.score, "coverage")[b.rows]
        hard = raw if harder_is_higher(self.score) else -raw
        group = groups(labels, b.rows, self.per_class)
        m_g = quotas(np.bincount(group), b.m)
        rng = np.random.default_rng(self.random_state)
        u = rng.random(raw.size)
        chosen = np.zeros(raw.size, dtype=bool)
        pruned = np.zeros(raw.size, dtype=bool)
        stratum = np.zeros(raw.size, dtype=np.int64)
        k = int(self.strata)
        for g in range(m_g.size):  # loop over classes (or one group), vectorised inside
            idx = np.flatnonzero(group == g)
            # hardest beta share pruned, but never below the group's quota
            n_cut = min(int(np.floor(self.beta * idx.size)), idx.size - int(m_g[g]))
            order = idx[np.lexsort((u[idx], -hard[idx]))]
            pruned[order[:n_cut]] = True
            pool = order[n_cut:]
            h = hard[pool]
            span = h.max() - h.min()
            st = (np.zeros(pool.size, np.int64) if span <= 0 else
                  np.minimum(((h - h.min()) / span * k).astype(np.int64), k - 1))
            stratum[pool] = st
            size = np.bincount(st, minlength=k)
            take = np.zeros(k, dtype=np.int64)
            left = int(m_g[g])
            nonempty = np.flatnonzero(size)
            # Algorithm 1 of CCS: visit strata from the smallest, give each an even share of the rest.
            for j, s_idx in enumerate(nonempty[np.argsort(size[nonempty], kind="stable")]):
                take[s_idx] = min(size[s_idx], left // (nonempty.size - j))
                left -= take[s_idx]
            # within a stratum: a random subset of take[s] (the lowest random keys)
            o = np.lexsort((u[pool], st))
            starts = np.concatenate([[0], np.cumsum(size)[:-1]])
            r = np.empty(pool.size, dtype=np.int64)
            r[o] = np.arange(pool.size) - starts[st[o]]
            chosen[pool] = r < take[st]
        value = join(self.score, " ", fmt(raw, "%.4g"), ", stratum ", stratum.astype(str), "/",
                     str(k))
        dropped = np.where(pruned, join(value, f" among the hardest {self.beta:g} pruned first"),
                           join(value, " beyond its stratum's even share"))
        finish(self, b, chosen, hard, value, dropped,
               {"score": self.score, "beta": float(self.beta), "strata": k,
                "pruned_hard": int(pruned.sum()), "per_class": bool(self.per_class)})
        return self


@SELECTORS.register("noise_filter")
class NoiseFilter:
    """Drop likely mislabeled samples by the analyze stage's ``p_clean`` (loss-mixture posterior,
    survey 000 §V-B): keep ``p_clean >= threshold``; when ``ratio`` / ``n_keep`` is given, keep exactly
    that many samples with the highest ``p_clean`` instead (ties: seeded random order).

    Parameters
    ----------
    threshold : float in [0, 1]
    ratio, n_keep, per_class, random_state : see ``random``.
    """

    requires = ("labels", "p_clean")

    def __init__(self, threshold: float = 0.5, ratio: Optional[float] = None,
                 n_keep: Optional[int] = None, per_class: bool = False,
                 random_state: Optional[int] = 0):
        self.threshold = threshold
        self.ratio = ratio
        self.n_keep = n_keep
        self.per_class = per_class
        self.random_state = random_state

    def fit(self, labels: np.ndarray, p_clean: np.ndarray,
            keep: Optional[np.ndarray] = None) -> "NoiseFilter":
        """``labels`` (n,), ``p_clean`` (n,) in [0, 1] -> ``keep_`` (n,) bool."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"noise_filter: threshold must be in [0, 1], got {self.threshold}")
        labels = np.asarray(labels)
        p_all = np.asarray(p_clean, dtype=np.float64)
        b = Budget(labels.size, keep, self.ratio, self.n_keep)
        p = p_all[b.rows]
        value = join("p_clean ", fmt(p, "%.3f"))
        if b.target is None:
            chosen = p >= self.threshold
            finish(self, b, chosen, p, join(value, f" >= {self.threshold:g}"),
                   join(value, f" < {self.threshold:g}"),
                   {"threshold": float(self.threshold), "mode": "threshold"})
            return self
        tb = np.random.default_rng(self.random_state).random(p.size)
        chosen = top_m(p, b.m, groups(labels, b.rows, self.per_class), tb)
        cut = float(p[chosen].min()) if chosen.any() else float("nan")
        finish(self, b, chosen, p, join(value, f" among the highest (cut {cut:.3f})"),
               join(value, f" below the kept cut {cut:.3f}"),
               {"mode": "top", "cut": cut, "per_class": bool(self.per_class)})
        return self
