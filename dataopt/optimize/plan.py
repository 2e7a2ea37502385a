"""One plan from an ordered list of optimisation steps across the five families.

Start: every sample kept, weight 1, sampling weight 1, augment magnitude 0, label unchanged. Each step
(``optimize.steps``, or the simple keys as ``[prune method ratio, weight weighting]``) is fitted on the
stage inputs plus ``keep`` (the rows still kept) and applied in order:

- prune narrows ``keep`` (``keep &= keep_``); its ``ratio``/``n_keep`` counts the ORIGINAL train set;
- weight multiplies ``weight``; resample multiplies ``sampling_weight``;
- perturb sets ``new_label`` where ``new_label_`` differs from the original label;
- every family's ``train_`` directives (perturbers; weighters applied in the loss such as focal and
  self-paced) are merged into ``train``;
- augment sets ``augment_magnitude`` (``augment_magnitude_``) and its policy (``augment_``) into the
  plan's ``augment`` slot (``image``, ``mix`` or ``features``; a later step replaces the same slot).

The per-sample ``reason`` concatenates the step reasons ("1 noise_filter: kept, ...; 2 moderate: ...")
with numpy string ops; a step speaks only for the rows that were still kept when it ran.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from dataopt import registry
from dataopt.analyze.base import LazyInputs, arrow_table, fmt, join
from dataopt.config import OPTIMIZE_FAMILIES, OptimizeStep
from dataopt.errors import ConfigError, DataError, DataWarning
from dataopt.optimize.augment.batch import slot
from dataopt.schema import PLAN_COLUMNS


@dataclass
class Plan:
    """The composed plan over the n train rows (columns of ``dataopt.schema.PLAN_COLUMNS`` but ids)."""

    keep: np.ndarray
    weight: np.ndarray
    sampling_weight: np.ndarray
    augment_magnitude: np.ndarray
    new_label: np.ndarray
    reason: np.ndarray
    train: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)


def _accepts_keep(method: Any) -> bool:
    return "keep" in inspect.signature(method.fit).parameters


def _vector(method: Any, attr: str, n: int, kind: str) -> Optional[np.ndarray]:
    """``method.<attr>`` as an (n,) array, checked; None when the method left it None/unset."""
    value = getattr(method, attr, None)
    if value is None:
        return None
    arr = np.asarray(value)
    name = getattr(method, "registered_name", type(method).__name__)
    if arr.shape != (n,):
        raise DataError(f"method {name!r}: {attr} has shape {arr.shape}, expected ({n},)")
    if kind == "float":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise DataError(f"method {name!r}: {attr} must be finite and >= 0")
    return arr


def _append(reason: np.ndarray, text: np.ndarray, active: np.ndarray, prefix: str) -> np.ndarray:
    """reason_i += "; " + prefix + text_i where active and text non-empty (vectorised)."""
    text = np.asarray(text).astype(str)
    on = active & (text != "")
    piece = np.strings.add(prefix, text)
    glued = np.where(reason == "", piece, np.strings.add(np.strings.add(reason, "; "), piece))
    return np.where(on, glued, reason)


def _fallback_reason(family: str, name: str, method: Any, before: dict[str, np.ndarray]) -> np.ndarray:
    """A generic reason for a method that sets no ``reason_``: the value it set."""
    n = before["keep"].size
    if family == "prune":
        return np.where(np.asarray(method.keep_, bool), f"{name}: kept", f"{name}: dropped")
    if family == "weight":
        return join(f"{name}: weight ", fmt(method.weight_, "%.3f"))
    if family == "resample":
        return join(f"{name}: sampling weight ", fmt(method.sampling_weight_, "%.3f"))
    if family == "perturb":
        new = getattr(method, "new_label_", None)
        if new is None:
            return np.full(n, f"{name}: training directive")
        changed = np.asarray(new) != before["new_label"]
        return np.where(changed, join(f"{name}: label ", fmt(before["new_label"], "%d"), " -> ",
                                      fmt(np.asarray(new), "%d")), "")
    mag = getattr(method, "augment_magnitude_", None)
    if mag is None:
        return np.full(n, f"{name}: {getattr(method, 'augment_', {}).get('policy', name)}")
    return join(f"{name}: magnitude ", fmt(mag, "%.2f"))


def fit_step(step: OptimizeStep, inputs: LazyInputs, keep: np.ndarray, seed: int,
             extra: Optional[dict[str, Any]] = None) -> Any:
    """Build and fit one step's method on the inputs it ``requires`` (+ ``keep`` when it takes it)."""
    reg = getattr(registry, OPTIMIZE_FAMILIES[step.family])
    trusted: dict[str, Any] = {"random_state": seed, **(extra or {})}
    if step.family == "prune":
        if step.ratio is not None:
            trusted["ratio"] = step.ratio
        if step.n_keep is not None:
            trusted["n_keep"] = step.n_keep
    method = reg.build(step.method, step.kwargs, **trusted)
    who = f"{step.family} method {step.method!r}"
    kwargs = {name: inputs.get(name, who) for name in method.requires}
    if _accepts_keep(method):
        kwargs["keep"] = keep.copy()
    elif step.family == "prune" and not keep.all():
        raise ConfigError(f"optimize.steps: {who} cannot follow another prune step (its fit takes no "
                          "`keep`); put it first")
    return method.fit(**kwargs)


def compose(steps: Sequence[OptimizeStep], inputs: LazyInputs, labels: np.ndarray, seed: int,
            numbered: bool = True) -> Plan:
    """Fit and apply ``steps`` in order; return the plan over the n train rows.

    Parameters
    ----------
    steps : the ordered steps (``OptimizeParams.plan_steps()``)
    inputs : the stage inputs, loaded on demand (``requires`` of each method)
    labels : (n,) int64 train labels in plan order
    seed : the top-level seed, passed as ``random_state``
    numbered : prefix each step's reason with its 1-based number (False keeps the backbone's
        un-numbered reasons for the simple keys)
    """
    n = labels.size
    p = Plan(keep=np.ones(n, bool), weight=np.ones(n), sampling_weight=np.ones(n),
             augment_magnitude=np.zeros(n), new_label=labels.astype(np.int64).copy(),
             reason=np.full(n, "", dtype=object).astype(str))
    for i, step in enumerate(steps, start=1):
        keep_before = p.keep.copy()
        before = {"keep": keep_before, "new_label": p.new_label.copy()}
        m = fit_step(step, inputs, keep_before, seed)
        fam, name = step.family, step.method
        counts: dict[str, int] = {}
        if fam == "prune":
            k = _vector(m, "keep_", n, "bool")
            if k is None:
                raise DataError(f"prune method {name!r} set no keep_")
            p.keep = keep_before & k.astype(bool)
            counts = {"kept": int(p.keep.sum()), "dropped": int((keep_before & ~p.keep).sum())}
        elif fam in ("weight", "resample"):
            attr = "weight_" if fam == "weight" else "sampling_weight_"
            w = _vector(m, attr, n, "float")
            if w is None:
                raise DataError(f"{fam} method {name!r} set no {attr}")
            col = "weight" if fam == "weight" else "sampling_weight"
            new = getattr(p, col) * w
            counts = {"changed": int((keep_before & (new != getattr(p, col))).sum())}
            setattr(p, col, new)
        elif fam == "perturb":
            new = _vector(m, "new_label_", n, "int")
            changed = np.zeros(n, bool)
            if new is not None:
                new = new.astype(np.int64)
                if (new < 0).any():
                    raise DataError(f"perturb method {name!r}: negative new_label_")
                # a perturber sees the ORIGINAL labels; only the rows it relabels change the plan (a
                # later directive-only perturber returning new_label_ == label keeps earlier relabels)
                relabelled = new != labels
                changed = relabelled & (new != p.new_label)
                p.new_label = np.where(relabelled, new, p.new_label)
            counts = {"changed": int((keep_before & changed).sum())}
        else:  # augment
            mag = _vector(m, "augment_magnitude_", n, "float")
            changed = np.zeros(n, bool)
            if mag is not None:
                if (mag > 1).any():
                    raise DataError(f"augment method {name!r}: augment_magnitude_ above 1")
                changed = mag != p.augment_magnitude
                p.augment_magnitude = mag
            policy = getattr(m, "augment_", None)
            if policy:
                p.augment[slot(policy["policy"])] = dict(policy)
            counts = {"changed": int((keep_before & changed).sum())}
        # training directives (perturbers; weighters applied in the loss, e.g. focal, self-paced)
        p.train.update(getattr(m, "train_", None) or {})
        own = getattr(m, "reason_", None)
        text = (np.asarray(own).astype(str) if own is not None
                else _fallback_reason(fam, name, m, before))
        p.reason = _append(p.reason, text, keep_before, f"{i} " if numbered else "")
        summary = dict(getattr(m, "summary_", None) or {})
        method_counts = summary.pop("counts", None)
        entry = {"step": i, "family": fam, "method": name, "params": registry.get_params(m),
                 **summary, "counts": counts}
        if method_counts is not None and method_counts != counts:
            entry["method_counts"] = method_counts
        if getattr(m, "train_", None):
            entry["train"] = dict(m.train_)
        if fam == "augment" and getattr(m, "augment_", None):
            entry["augment"] = dict(m.augment_)
        p.steps.append(entry)
    return p


def step_metrics(steps: list[dict[str, Any]]) -> dict[str, int]:
    """Per-step counts flattened for MLflow: ``step1_noise_filter_kept``, ``step3_p_clean_changed``..."""
    return {f"step{s['step']}_{s['method']}_{k}": v for s in steps for k, v in s["counts"].items()}


def stats(values: np.ndarray) -> dict[str, float]:
    """mean/min/max/std of a (k,) float array (zeros when empty)."""
    if values.size == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "std": 0.0}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "std": float(values.std())}


def _classes(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit].tolist()))
    return shown + (f", ... ({values.size} in all)" if values.size > limit else "")


def plan_warnings(keep: np.ndarray, labels: np.ndarray, new_label: np.ndarray) -> list[str]:
    """What a plan does that a run probably did not mean: keep fewer samples than there are classes,
    or no sample of some class (that class is never trained on)."""
    classes = np.unique(labels)
    missing = np.setdiff1d(classes, np.unique(new_label[keep]))
    n_kept = int(keep.sum())
    if not missing.size:
        return []
    stop = " (the train stage needs two classes)" if classes.size - missing.size < 2 else ""
    if n_kept < classes.size:
        return [f"the plan keeps {n_kept} sample(s) for {classes.size} classes: {missing.size} classes "
                f"get no training sample{stop}; raise optimize.ratio (or the prune step's ratio / n_keep)"]
    return [f"the plan keeps no sample of {missing.size} of {classes.size} classes (label "
            f"{_classes(missing)}); the model cannot learn them{stop}"]


@dataclass
class PlanResult:
    """What :func:`optimize` decided: ``table`` (plan.parquet, ``PLAN_COLUMNS``), ``summary``
    (plan.json), ``metrics`` (the numbers a run tracks) and the composed :class:`Plan`."""

    table: pa.Table
    summary: dict[str, Any]
    metrics: dict[str, Any]
    plan: Plan


def optimize(cfg: Any, inputs: LazyInputs, sample_id: np.ndarray, labels: np.ndarray, seed: int) -> PlanResult:
    """Compose the steps of the ``optimize`` params section ``cfg`` into one plan over the ``n`` train rows.

    Parameters
    ----------
    cfg : the ``optimize`` params section (its simple keys or ``steps``)
    inputs : LazyInputs offering what a method may require (the optimize stage's ``INPUT_NAMES``)
    sample_id, labels : (n,) int64 over the train rows
    seed : int
    """
    simple = cfg.steps is None
    plan = compose(cfg.plan_steps(), inputs, labels, seed, numbered=not simple)
    n = sample_id.size
    table = arrow_table(PLAN_COLUMNS, {
        "sample_id": sample_id,
        "keep": plan.keep,
        "weight": plan.weight,
        "sampling_weight": plan.sampling_weight,
        "augment_magnitude": plan.augment_magnitude,
        "new_label": plan.new_label,
        "reason": plan.reason,
    })

    keep = plan.keep
    classes, inv = np.unique(labels, return_inverse=True)
    share = np.bincount(inv, weights=keep.astype(np.float64)) / np.bincount(inv)
    n_kept = int(keep.sum())
    n_relabelled = int((keep & (plan.new_label != labels)).sum())
    weight = stats(plan.weight[keep])
    notes = plan_warnings(keep, labels, plan.new_label)
    for note in notes:
        warnings.warn(f"optimize: {note}", DataWarning, stacklevel=2)
    summary: dict[str, Any] = {}
    if simple:  # the backbone's keys, kept for the simple form
        summary.update({"method": cfg.method, "kwargs": plan.steps[0]["params"], "ratio": cfg.ratio,
                        "weighting": cfg.weighting, "weighting_kwargs": plan.steps[1]["params"]})
    summary.update({
        "n_train": int(n),
        "n_kept": n_kept,
        "kept_share": n_kept / n,
        "kept_share_per_class": dict(zip(map(str, classes.tolist()), share.tolist())),
        "n_relabelled": n_relabelled,
        "weight": weight,
        "sampling_weight": stats(plan.sampling_weight[keep]),
        "augment_magnitude": stats(plan.augment_magnitude[keep]),
        "train": plan.train,
        "augment": plan.augment,
        "steps": plan.steps,
        "inputs": inputs.loaded(),
        "warnings": notes,
    })
    policies = [v["policy"] for v in plan.augment.values()]
    metrics = {
        "n_kept": n_kept,
        "kept_share": n_kept / n,
        "mean_weight": weight["mean"],
        "mean_sampling_weight": summary["sampling_weight"]["mean"],
        "mean_augment_magnitude": summary["augment_magnitude"]["mean"],
        "n_relabelled": n_relabelled,
        "n_steps": len(plan.steps),
        "steps": " -> ".join(f"{s['family']}:{s['method']}" for s in plan.steps),
        "augment_policy": "+".join(policies) or "none",
        "train_directives": ",".join(sorted(plan.train)) or "none",
        "n_warnings": len(notes),
        **step_metrics(plan.steps),
    }
    return PlanResult(table=table, summary=summary, metrics=metrics, plan=plan)
