"""What a drift test returns, multiplicity corrections, and the one overall verdict per batch.

Every drift test is a class registered in :data:`dataopt.registry.DRIFT_TESTS`. The API, the same for
all: ``__init__`` stores keyword hyper-parameters (``alpha``, ``random_state``, ...);
``fit(reference, batch)`` takes two mappings of named inputs and returns ``self`` with the outcome in
``result_`` (a :class:`DriftResult`); ``requires`` names the inputs both sides must carry. Input names:

    embeddings  (n, d) float          probs        (n, C) proxy softmax probabilities
    labels      (n,) int              label_issue  (n,) bool, or p_clean (n,) float in [0, 1]
    images      (n, H, W[, 3]) uint8  sizes        (n, 2) original (height, width), optional

Effect sizes are on a [0, 1]-like scale where 0 means "no shift", so one floor per test reads the same
way: MMD², AUC - 0.5, a KS distance, a total-variation distance, a difference of two rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np


@dataclass
class DriftResult:
    test: str
    statistic: float
    p_value: float
    effect_size: float
    decision: bool  # p_value <= alpha of the test
    why: str  # one readable line
    n_reference: int
    n_batch: int
    alpha: float
    breakdown: Optional[dict[str, Any]] = field(default=None)  # per-sample or per-class columns

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (arrays become lists)."""
        out = {k: v for k, v in vars(self).items() if k != "breakdown"}
        out["breakdown"] = None if self.breakdown is None else {k: _plain(v) for k, v in self.breakdown.items()}
        return {k: _plain(v) for k, v in out.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error, any dependence; Holm 1979)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    m = len(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate; Benjamini & Hochberg 1995)."""
    p = np.asarray(p_values, float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def bonferroni(p_values: np.ndarray) -> float:
    """The smallest p-value times the number of tests, capped at 1: one p-value for the family."""
    p = np.asarray(p_values, float)
    return float(min(1.0, p.min() * len(p))) if len(p) else 1.0


@dataclass
class Verdict:
    drift: bool
    n_batch: int
    why: str  # the overall line
    lines: dict[str, str]  # one line per test: why it decided
    adjusted_p: dict[str, float]  # Holm across the tests
    decided: dict[str, bool]  # per test: significant after Holm and above its effect floor

    def to_dict(self) -> dict[str, Any]:
        return _plain(vars(self))


def verdict(results: Mapping[str, DriftResult], alpha: float = 0.05, min_batch: int = 50,
            effect_floor: float | Mapping[str, float] = 0.0) -> Verdict:
    """One decision per batch from the tests' results.

    Holm across the tests (they share the data, so their p-values are dependent: Holm controls the
    family-wise error under any dependence, BH would need positive dependence). A test counts as
    drift when its Holm-adjusted p-value is <= ``alpha`` **and** its effect size reaches its floor
    (``effect_floor``: one number, or per test name; a name not given has floor 0). A batch smaller than
    ``min_batch`` gets no drift verdict: too few samples to tell.
    """
    names = list(results)
    n_batch = max((results[n].n_batch for n in names), default=0)
    adj = dict(zip(names, holm([results[n].p_value for n in names]))) if names else {}
    floors = {n: (effect_floor.get(n, 0.0) if isinstance(effect_floor, Mapping) else effect_floor)
              for n in names}
    lines, decided = {}, {}
    for n in names:
        r, p, floor = results[n], float(adj[n]), float(floors[n])
        significant, large = p <= alpha, r.effect_size >= floor
        decided[n] = bool(significant and large and n_batch >= min_batch)
        if not significant:
            head = f"no drift: Holm p={p:.3g} > {alpha:g}"
        elif not large:
            head = f"no drift: significant (Holm p={p:.3g}) but effect {r.effect_size:.3g} < floor {floor:g}"
        else:
            head = f"drift: Holm p={p:.3g} <= {alpha:g}, effect {r.effect_size:.3g} >= {floor:g}"
        lines[n] = f"{n}: {head}; {r.why}"
    if n_batch < min_batch:
        why = f"no verdict: the batch has {n_batch} samples, fewer than min_batch={min_batch}"
        return Verdict(False, n_batch, why, lines, {k: float(v) for k, v in adj.items()}, decided)
    flagged = [n for n in names if decided[n]]
    why = (f"drift: {', '.join(flagged)} (Holm over {len(names)} tests at alpha={alpha:g})" if flagged
           else f"no drift: none of {len(names)} tests is significant with a large enough effect "
                f"(Holm at alpha={alpha:g})")
    return Verdict(bool(flagged), n_batch, why, lines, {k: float(v) for k, v in adj.items()}, decided)


def take(x: np.ndarray, limit: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """Indices of a uniform subsample of at most ``limit`` of ``len(x)`` rows (sorted; all when under)."""
    n = len(x)
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def need(side: Mapping[str, Any], key: str, which: str) -> np.ndarray:
    if key not in side or side[key] is None:
        raise ValueError(f"the {which} lacks {key!r}")
    return np.asarray(side[key])
