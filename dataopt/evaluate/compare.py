"""Champion against challenger on the same frozen evaluation rows: promote only by a stated rule.

The rule (:func:`decide_promotion`) is the champion/challenger practice of MLOps (a new model replaces
the serving one only when it is measurably better on the same data, and the decision is recorded with
its numbers), with the uncertainty of the gain taken from a paired bootstrap (Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993, ch. 13 percentile intervals; pairing as in their two-sample
case on matched rows). The challenger is promoted iff

- its accuracy gain over the champion is at least ``min_gain``,
- the bootstrap interval of that gain lies above 0 (its low end > 0), and
- no class loses more than ``max_class_drop`` of its accuracy.

Pure numpy: the retrain flow (``flows/``) computes the predictions, ``tasks/registry.py`` records the
decision in the MLflow model registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from dataopt.evaluate.metrics import confusion_matrix, per_class_accuracy as _recall


def paired_bootstrap(correct_champion: np.ndarray, correct_challenger: np.ndarray, n_boot: int = 2000,
                     confidence: float = 0.95, random_state: Any = 0) -> tuple[float, float, float]:
    """Accuracy difference challenger - champion on the same rows, with its percentile interval.

    Each draw resamples the rows (with replacement, both models' outcomes of a row together: paired).
    The mean of the resampled per-row differences ``d = challenger - champion`` depends only on how
    many drawn rows have ``d = +1`` and how many ``d = -1``, and those counts of ``n`` uniform draws are
    multinomial with the rows' shares: so each draw is one multinomial sample, the same distribution as
    resampling ``n`` row indices, in O(n_boot) time and memory whatever ``n`` is.

    Returns ``(delta, low, high)``: the observed difference and the ``confidence`` percentile interval.
    """
    a = np.asarray(correct_champion, dtype=bool).ravel()
    b = np.asarray(correct_challenger, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired rows: champion has {a.size}, challenger {b.size}")
    if a.size == 0:
        raise ValueError("no evaluation rows")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = a.size
    wins, losses = int(np.count_nonzero(b & ~a)), int(np.count_nonzero(a & ~b))
    rng = np.random.default_rng(random_state)
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=n_boot)
    boot = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return (wins - losses) / n, float(low), float(high)


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes,)`` accuracy (recall) of each class; NaN for a class without rows."""
    return _recall(confusion_matrix(labels, pred, n_classes))


@dataclass
class Promotion:
    """The decision on one challenger: ``promote``, one readable ``reason`` line with the numbers, and
    the ``numbers`` themselves (recorded as version tags in the model registry)."""

    promote: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def decide_promotion(champion_pred: Optional[np.ndarray], challenger_pred: np.ndarray, labels: np.ndarray,
                     n_classes: int, *, min_gain: float = 0.0, max_class_drop: float = 0.05,
                     n_boot: int = 2000, confidence: float = 0.95, random_state: Any = 0,
                     class_names: Optional[Sequence[str]] = None) -> Promotion:
    """Promote the challenger over the champion, or not, by the rule in the module docstring.

    ``champion_pred`` / ``challenger_pred`` are predicted labels on the same evaluation rows as
    ``labels``; ``champion_pred=None`` (no champion yet) promotes. ``class_names`` name the classes
    in the reason (default: their indices).
    """
    y = np.asarray(labels, np.int64).ravel()
    new = np.asarray(challenger_pred, np.int64).ravel()
    old = None if champion_pred is None else np.asarray(champion_pred, np.int64).ravel()
    for what, a in (("labels", y), ("challenger_pred", new), ("champion_pred", old)):
        if a is not None and a.size != y.size:
            raise ValueError(f"{what} has {a.size} rows, labels {y.size}: predictions on the same rows")
        if a is not None and a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{what} holds values outside [0, {n_classes})")
    names = [str(c) for c in (class_names if class_names is not None else range(n_classes))]
    acc_new = float(np.mean(new == y)) if y.size else float("nan")
    if old is None:
        return Promotion(True, f"promoted: no champion yet (challenger accuracy {acc_new:.4f} on {y.size} rows)",
                         {"accuracy": acc_new, "n_rows": int(y.size)})
    delta, low, high = paired_bootstrap(old == y, new == y, n_boot, confidence, random_state)
    acc_old = float(np.mean(old == y))
    # per class from counts: one division, so that 1 error in 20 rows is a drop of exactly 0.05
    support = np.bincount(y, minlength=n_classes)
    lost = np.bincount(y[old == y], minlength=n_classes) - np.bincount(y[new == y], minlength=n_classes)
    drop = np.where(support > 0, lost / np.maximum(support, 1), np.nan)
    worst = int(np.nanargmax(drop)) if (support > 0).any() else None
    worst_drop = float(drop[worst]) if worst is not None else 0.0
    # the worst class's own paired interval: on ~100 rows a class moves by 5-10 points between two
    # equally good models, so `harm` calls a class drop harm only when this interval is below 0
    worst_high = None
    if worst is not None and worst_drop > 0:
        rows = y == worst
        worst_high = paired_bootstrap(old[rows] == y[rows], new[rows] == y[rows], n_boot, confidence,
                                      random_state)[2]
    numbers = {"accuracy": acc_new, "champion_accuracy": acc_old, "delta": delta, "delta_low": low,
               "delta_high": high, "confidence": confidence, "n_boot": int(n_boot), "n_rows": int(y.size),
               "worst_class": names[worst] if worst is not None else None, "worst_class_drop": worst_drop,
               "worst_class_rows": int(support[worst]) if worst is not None else 0,
               "worst_class_delta_high": worst_high,
               "min_gain": min_gain, "max_class_drop": max_class_drop}
    pct = f"{confidence:.0%}"
    head = (f"accuracy {acc_new:.4f} vs champion {acc_old:.4f} ({delta:+.4f}, {pct} interval "
            f"[{low:+.4f}, {high:+.4f}], {y.size} rows)")
    failed = []
    if delta < min_gain:
        failed.append(f"gain {delta:+.4f} < min_gain {min_gain:g}")
    if not low > 0.0:
        failed.append(f"the {pct} interval's low end {low:+.4f} is not above 0")
    if worst_drop > max_class_drop:
        failed.append(f"class {names[worst]!r} drops by {worst_drop:.4f} ({numbers['worst_class_rows']} rows) "
                      f"> max_class_drop {max_class_drop:g}")
    if failed:
        return Promotion(False, f"rejected: {'; '.join(failed)}: {head}", numbers)
    where = f" (class {names[worst]!r})" if worst is not None and worst_drop > 0 else ""
    return Promotion(True, f"promoted: {head}; worst class drop {max(worst_drop, 0.0):.4f}{where} "
                           f"<= {max_class_drop:g}", numbers)


def harm(promotion: Promotion) -> Optional[str]:
    """Why a rejected challenger made things worse (overall accuracy significantly lower: the whole
    interval below 0; or one class losing more than ``max_class_drop`` with that class's own paired
    interval below 0), or None when it was only not proven better (a class drop within that class's
    noise keeps the challenger from promotion but is no proof of harm). The loop never retries the new data of a harmful challenger; data that was merely
    not enough yet waits for the next retrain, pooled with what arrives meanwhile."""
    n = promotion.numbers
    if promotion.promote:
        return None
    why = []
    if n.get("delta_high") is not None and n["delta_high"] < 0:
        why.append(f"accuracy significantly lower ({n['delta']:+.4f}, interval [{n['delta_low']:+.4f}, "
                   f"{n['delta_high']:+.4f}])")
    high = n.get("worst_class_delta_high")
    if n.get("worst_class_drop", 0.0) > n.get("max_class_drop", 1.0) and high is not None and high < 0:
        why.append(f"class {n['worst_class']!r} drops by {n['worst_class_drop']:.4f} (its interval's high "
                   f"end {high:+.4f} < 0)")
    return "; ".join(why) or None
