"""The evaluate step as one call: a trained model on the held-out rows -> flat metrics and a report.

:func:`evaluate` is what the evaluate stage runs between reading its inputs and writing its outputs;
it takes the model, its input tensor, arrays and plain dicts, never paths. :func:`write_plots` draws
the stage's PNGs from what :func:`evaluate` returned.

Metrics beyond accuracy, calibration and per-class accuracy:

- many/medium/few-shot accuracy (Liu et al. 2019, OLTR): classes banded by training images,
  ``few < t0 <= medium <= t1 < many`` for ``evaluate.shot_thresholds = (t0, t1)``, each band the
  mean of its per-class accuracies (null for an empty band), with ``n_many``/``n_medium``/``n_few``.
  Class sizes come from the model config's ``class_counts`` (what was trained on), else from the
  train-split labels. When every class has as many images, ``shot_bands: "balanced"`` instead.
- cost: ``samples_seen``, ``steps`` (optimizer steps) and ``train_seconds`` of the run;
  ``full_data_samples`` and ``cost_ratio`` (samples seen vs. every training sample for the same epochs);
  ``full_data_steps = ceil(n_train_total / batch_size) * epochs`` and ``steps_ratio`` when the model
  config records ``train.batch_size``.
- against a reference run (its ``samples_seen, steps, train_seconds, accuracy``):
  ``reference_<key>``, ``samples_seen_ratio``, ``steps_ratio_vs_reference``, ``seconds_ratio`` (this
  run / reference; null when the reference value is 0) and ``accuracy_delta`` (this run - reference).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dataopt.errors import DataError
from dataopt.evaluate.metrics import classification_report, reliability, shot_accuracy, shot_bands
from dataopt.evaluate.plots import confusion_png, per_class_png, reliability_png, training_curve_png
from dataopt.train import loop

# what a reference run must report (the metrics.json / stage.json of a full-data evaluate)
REFERENCE_KEYS = ("samples_seen", "steps", "train_seconds", "accuracy")
PLOTS = ("confusion_matrix.png", "per_class_accuracy.png", "reliability.png", "training_curve.png")


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def class_names(config: dict) -> list[str]:
    """The class names a model config records (its ``class_names``, else ``"0".."n_classes-1"``)."""
    return [str(n) for n in (config.get("class_names") or range(config["kwargs"]["n_classes"]))]


def class_counts(config: dict, train_labels: np.ndarray, n_classes: int,
                 where: str = "train/model/config.json") -> np.ndarray:
    """(n_classes,) training images per class: the model config's ``class_counts`` (what was trained
    on), else the counts of ``train_labels``; ``where`` names the config in an error."""
    if config.get("class_counts") is None:
        y = np.asarray(train_labels, np.int64)
        return np.bincount(y[(y >= 0) & (y < n_classes)], minlength=n_classes)
    try:
        counts = np.asarray(config["class_counts"], dtype=np.int64)
    except (TypeError, ValueError):
        counts = np.zeros(0)
    if counts.ndim != 1 or len(counts) > n_classes or (counts < 0).any():
        raise DataError(f"{where}: class_counts must be at most {n_classes} non-negative counts")
    return np.pad(counts, (0, n_classes - len(counts)))


def _cost(history: Sequence[dict], n_train_total: int, train_cfg: dict,
          reference: Optional[dict[str, float]], accuracy: float) -> dict[str, Any]:
    """The cost metrics of the training run (see the module docstring)."""
    last = history[-1]
    full = n_train_total * len(history)  # the same epochs on every training sample
    flat: dict[str, Any] = {
        "samples_seen": int(last["samples_seen"]),
        "steps": int(last["steps"]),
        "train_seconds": float(last["seconds"]),
        "full_data_samples": full,
        "cost_ratio": last["samples_seen"] / full if full else float("nan"),
    }
    if train_cfg.get("batch_size"):
        epochs = int(train_cfg.get("epochs") or len(history))
        full_steps = math.ceil(n_train_total / int(train_cfg["batch_size"])) * epochs
        flat["full_data_steps"] = full_steps
        flat["steps_ratio"] = _ratio(flat["steps"], full_steps)
    if reference is not None:
        flat.update({f"reference_{k}": v for k, v in reference.items()})
        flat["samples_seen_ratio"] = _ratio(flat["samples_seen"], reference["samples_seen"])
        flat["steps_ratio_vs_reference"] = _ratio(flat["steps"], reference["steps"])
        flat["seconds_ratio"] = _ratio(flat["train_seconds"], reference["train_seconds"])
        flat["accuracy_delta"] = accuracy - reference["accuracy"]
    return flat


def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: np.ndarray, config: dict,
             history: Sequence[dict], train_labels: np.ndarray, cfg: Any,
             reference: Optional[dict[str, float]] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score ``model`` on the held-out rows and relate its accuracy to what its training cost.

    Parameters
    ----------
    model : the trained network (:func:`dataopt.train.checkpoint.load_model`), on ``inputs.device``
    inputs : (n, ...) model input of the held-out rows (uint8 images or float32 embeddings)
    labels : (n,) int64 labels of those rows, each in ``0..n_classes-1``
    config : the model config (``class_names`` / ``kwargs.n_classes``, ``class_counts``, ``train``)
    history : train/history.json rows (one per epoch: ``samples_seen``, ``steps``, ``seconds``), non-empty
    train_labels : (n_train,) labels of every training row of the dataset (full-data cost and, without
        ``class_counts`` in the config, the class sizes)
    cfg : the ``evaluate`` params section (``batch_size``, ``ece_bins``, ``shot_thresholds``)
    reference : ``REFERENCE_KEYS`` of a full-data run, or None

    Returns
    -------
    metrics : flat dict (accuracy, balanced_accuracy, macro_f1, ece, nll, n_test, cost, shot bands, device)
    report : ``per_class`` rows ``{class, accuracy, train_count, shot}``, ``reliability`` rows per
        confidence bin, ``confusion`` (counts, rows = true class), ``class_names``
    """
    names = class_names(config)
    y = np.asarray(labels, np.int64)
    logits = loop.predict_logits(model, inputs, cfg.batch_size)
    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()  # float64: NLL/ECE without rounding noise
    rep = classification_report(probs, y, cfg.ece_bins)

    flat: dict[str, Any] = {k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll")}
    flat["n_test"] = rep["n"]
    flat.update(_cost(history, len(train_labels), config.get("train") or {}, reference, rep["accuracy"]))
    counts = class_counts(config, train_labels, len(names))
    flat.update(shot_accuracy(rep["per_class_accuracy"], counts, cfg.shot_thresholds))
    flat["device"] = inputs.device.type

    bands = shot_bands(counts, cfg.shot_thresholds)
    rel = reliability(probs, y, cfg.ece_bins)
    report = {
        "per_class": [{"class": n, "accuracy": _none_if_nan(a), "train_count": int(c), "shot": str(b)}
                      for n, a, c, b in zip(names, rep["per_class_accuracy"], counts, bands)],
        "reliability": [
            {"bin": int(b), "lower": float(rel["lower"][b]), "upper": float(rel["upper"][b]),
             "count": int(rel["count"][b]), "confidence": _none_if_nan(rel["confidence"][b]),
             "accuracy": _none_if_nan(rel["accuracy"][b])}
            for b in range(cfg.ece_bins)],
        "confusion": np.asarray(rep["confusion"]).tolist(),
        "class_names": names,
    }
    return flat, report


def write_plots(folder: Path, report: dict[str, Any], ece: float, history: Sequence[dict]) -> None:
    """Draw :data:`PLOTS` into ``folder`` from an :func:`evaluate` report, its ECE and the training history."""
    folder = Path(folder)
    names = report["class_names"]
    rows = report["per_class"]
    nan = float("nan")
    rel = {k: np.array([nan if r[k] is None else r[k] for r in report["reliability"]], np.float64)
           for k in ("lower", "upper", "confidence", "accuracy")}
    rel["count"] = np.array([r["count"] for r in report["reliability"]], np.int64)
    confusion_png(folder / "confusion_matrix.png", np.asarray(report["confusion"], np.int64), names)
    per_class_png(folder / "per_class_accuracy.png", names, [r["accuracy"] for r in rows],
                  np.array([r["train_count"] for r in rows], np.int64))
    reliability_png(folder / "reliability.png", rel, ece)
    training_curve_png(folder / "training_curve.png", history)
