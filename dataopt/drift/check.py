"""One drift check: a reference and a batch -> every configured test's result and one verdict.

The caller gives both sides as mappings of raw inputs (``embeddings``, ``labels``, ``images``,
optionally ``sizes``). What the tests need beyond that is derived here, the same way for both sides:

- ``probs``: a multinomial logistic regression (the proxy of black-box shift detection; Rabanser et
  al., *Failing Loudly*, NeurIPS 2019, section 3.2, "BBSDs") fitted on one half of the reference's
  rows. The other half is the reference side of every proxy-based test, so both sides are scored
  out of sample by the same model: in-sample reference probabilities are more confident than any
  batch's and would make the KS tests fire on every batch.
- ``label_issue``: one per-row rule for both sides (:func:`issue_rule`): an analyze detector
  (``analyze.detector``, e.g. ``calibrated_confidence``) fitted on a quarter of the reference (half of
  the held-out half) sets a temperature and a self-confidence cut; the other held-out quarter gives the
  reference's rate. Batch rows whose label the proxy never saw are left out of it (they are label
  shift, reported by ``label_shift``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import dataopt.analyze.confident  # noqa: F401  (the DETECTORS that score probabilities and labels)
import dataopt.drift.black_box  # noqa: F401  (DRIFT_TESTS)
import dataopt.drift.classifier  # noqa: F401
import dataopt.drift.image_stats  # noqa: F401
import dataopt.drift.kernel  # noqa: F401
import dataopt.drift.label_quality  # noqa: F401
from dataopt.drift.result import DriftResult, Verdict, _plain, verdict
from dataopt.analyze.confident import temperature_scale
from dataopt.registry import DETECTORS, DRIFT_TESTS

PROXY_INPUTS = ("probs", "label_issue")


@dataclass
class DriftCheck:
    results: dict[str, DriftResult]
    verdict: Verdict
    proxy: dict[str, Any]  # how the proxy was fitted and how well it predicts held-out reference rows
    class_weights: Optional[np.ndarray]  # BBSE q(y) / p(y) per class (label_shift with probs), else None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.to_dict(), "tests": {n: r.to_dict() for n, r in self.results.items()},
                "proxy": _plain(self.proxy), "class_weights": _plain(self.class_weights)}


def fit_proxy(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, max_rows: int,
              random_state: int = 0) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
    """``(model, fit_rows, held_rows)``: a logistic regression on a random half of the reference
    (at most ``max_rows`` rows) and the other half's row indices (at most ``max_rows``)."""
    rng = np.random.default_rng(random_state)
    order = rng.permutation(len(labels))
    half = len(order) // 2
    fit_rows, held_rows = np.sort(order[:half][:max_rows]), np.sort(order[half:][:max_rows])
    model = LogisticRegression(C=1.0, max_iter=300)
    # one BLAS thread: these small matrix products lose far more to thread hand-offs than they gain on
    # 2 cores, and collapse when the cores are shared (2.4 s vs 0.17 s for 2,000 x 128 on a busy box)
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(np.asarray(embeddings[fit_rows], np.float32), labels[fit_rows])
    return model, fit_rows, held_rows


def proxy_probs(model: LogisticRegression, embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n, n_classes)`` probabilities; a class the proxy never saw gets probability 0."""
    out = np.zeros((len(embeddings), n_classes), np.float64)
    if len(embeddings):
        out[:, model.classes_] = model.predict_proba(np.asarray(embeddings, np.float32))
    return out


def issue_rule(probs: np.ndarray, labels: np.ndarray, detector: str, detector_kwargs: Mapping
               ) -> tuple[float, float]:
    """``(temperature, threshold)``: a per-row label-issue rule learnt from an analyze detector fitted on
    ``probs`` and ``labels`` (reference rows): a row is flagged when its temperature-scaled probability
    of its given label is below the threshold, the cut between the rows the detector flagged and the
    rows it kept. Applying one fixed rule to both sides makes their flags independent per row, so the
    two-proportion test is calibrated (fitting the detector on each side separately made its noise
    estimate vary more than binomially: a 0.11-0.16 false-positive rate at alpha 0.05 on CIFAR-10)."""
    method = DETECTORS.build(detector, dict(detector_kwargs))
    if set(method.requires) - {"probs", "labels"}:
        raise ValueError(f"analyze.detector {detector!r} needs {method.requires}; label-quality drift "
                         "scores probabilities and labels only (use calibrated_confidence or confident_learning)")
    method.fit(probs=probs, labels=labels)
    flagged = np.asarray(method.is_label_issue_, bool) if hasattr(method, "is_label_issue_") else \
        np.asarray(method.p_clean_, float) < 0.5
    temperature = float(getattr(method, "temperature_", 1.0))
    score = self_confidence(probs, labels, temperature)
    if not flagged.any():
        return temperature, float(score.min())  # nothing below the lowest kept row
    if flagged.all():
        return temperature, float(np.nextafter(score.max(), np.inf))
    return temperature, 0.5 * float(score[flagged].max() + score[~flagged].min())


def self_confidence(probs: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    q = temperature_scale(np.asarray(probs, float), temperature) if temperature != 1.0 else np.asarray(probs, float)
    return q[np.arange(len(labels)), labels]


def check_drift(reference: Mapping[str, Any], batch: Mapping[str, Any], *, n_classes: int,
                tests: Sequence[str], alpha: float = 0.05, permutations: int = 500,
                max_reference: int = 2000, min_batch: int = 50,
                effect_floor: float | Mapping[str, float] = 0.0,
                kwargs: Optional[Mapping[str, Mapping]] = None, detector: str = "calibrated_confidence",
                detector_kwargs: Optional[Mapping] = None, random_state: int = 0,
                progress: Optional[Callable[[str], None]] = None) -> DriftCheck:
    """Run ``tests`` (DRIFT_TESTS names) on ``reference`` vs ``batch`` and decide one verdict.

    ``kwargs``: per test, hyper-parameters that override the shared ones (``alpha``,
    ``permutations``, ``max_reference``, ``random_state``)."""
    kwargs = kwargs or {}
    built = {n: DRIFT_TESTS.build(n, dict(kwargs.get(n, {})), alpha=alpha, permutations=permutations,
                                  max_reference=max_reference, random_state=random_state) for n in tests}
    ref, bat = dict(reference), dict(batch)
    needs = {k for m in built.values() for k in m.requires}
    proxy: dict[str, Any] = {}
    proxied = [n for n, m in built.items() if set(m.requires) & set(PROXY_INPUTS)]
    if needs & set(PROXY_INPUTS) or "label_shift" in built:
        ref, bat, proxy = _with_proxy(ref, bat, n_classes, max_reference, "label_issue" in needs,
                                      detector, detector_kwargs or {}, random_state)
    results: dict[str, DriftResult] = {}
    class_weights = None
    for name, method in built.items():
        if progress:
            progress(name)
        side_r, side_b = (ref, bat) if name in proxied or name == "label_shift" else (reference, batch)
        if name == "label_quality":
            side_r, side_b = _rows(side_r, "_label_quality_rows"), _rows(side_b, "_label_quality_rows")
        results[name] = method.fit(side_r, side_b).result_
        if name == "label_shift":
            class_weights = getattr(method, "class_weights_", None)
    return DriftCheck(results, verdict(results, alpha, min_batch, effect_floor), proxy, class_weights)


def _with_proxy(ref: dict, bat: dict, n_classes: int, max_rows: int, want_issues: bool, detector: str,
                detector_kwargs: Mapping, random_state: int) -> tuple[dict, dict, dict]:
    """Both sides with ``probs`` (and ``label_issue``); the reference side is its held-out half."""
    emb, labels = np.asarray(ref["embeddings"]), np.asarray(ref["labels"]).astype(int)
    model, fit_rows, held = fit_proxy(emb, labels, n_classes, max_rows, random_state)
    ref_side = {k: (np.asarray(v)[held] if _rowwise(v, len(labels)) else v) for k, v in ref.items()}
    ref_side["probs"] = proxy_probs(model, emb[held], n_classes)
    bat_side = dict(bat)
    bat_side["probs"] = proxy_probs(model, np.asarray(bat["embeddings"]), n_classes)
    accuracy = float(np.mean(ref_side["probs"].argmax(1) == labels[held])) if len(held) else float("nan")
    info = {"model": "logistic_regression", "fit_rows": int(len(fit_rows)), "held_rows": int(len(held)),
            "held_accuracy": accuracy}
    if want_issues:  # the rule from one half of the held rows, the reference rate from the other half
        seen = np.unique(labels[fit_rows])  # classes the proxy knows
        rng = np.random.default_rng(random_state + 1)
        rule_part = np.zeros(len(held), bool)
        rule_part[rng.permutation(len(held))[: len(held) // 2]] = True
        y_ref = labels[held]
        known_ref = np.isin(y_ref, seen)
        t, cut = issue_rule(ref_side["probs"][rule_part & known_ref], y_ref[rule_part & known_ref], detector,
                            detector_kwargs)
        for side in (ref_side, bat_side):
            y = np.asarray(side["labels"]).astype(int)
            known = np.isin(y, seen)
            flags = np.zeros(len(y), bool)
            flags[known] = self_confidence(side["probs"][known], y[known], t) < cut
            side["label_issue"], side["_label_quality_rows"] = flags, known
        ref_side["_label_quality_rows"] = known_ref & ~rule_part
        info.update(detector=detector, temperature=t, issue_threshold=cut, rule_rows=int(rule_part.sum()))
    return ref_side, bat_side, info


def _rows(side: Mapping, mask_key: str) -> dict:
    """``side`` restricted to the rows of its boolean ``mask_key`` (label-quality: rows whose class the
    proxy knows, and on the reference only those the issue rule was not fitted on)."""
    keep = np.asarray(side[mask_key], bool)
    return {k: (np.asarray(v)[keep] if _rowwise(v, len(keep)) else v) for k, v in side.items() if k != mask_key}


def _rowwise(v: Any, n: int) -> bool:
    return v is not None and hasattr(v, "__len__") and not isinstance(v, (str, dict)) and len(v) == n


__all__ = ["DriftCheck", "check_drift", "fit_proxy", "issue_rule", "proxy_probs", "self_confidence"]
