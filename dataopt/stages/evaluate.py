"""evaluate stage: the trained model on the held-out (test) split, and what its training cost.

Returns the flat metrics (``run_stage`` writes the headline ones to ``metrics.json`` and all to
``stage.json``) and writes ``artifacts/evaluate/report.json``: ``per_class`` (rows ``{class, accuracy,
train_count, shot}``), ``reliability`` (rows per confidence bin) and ``confusion`` (counts, rows =
true class); and ``artifacts/evaluate/plots/``: ``confusion_matrix.png``, ``per_class_accuracy.png``,
``reliability.png`` and ``training_curve.png`` (from ``train/history.json``).

Inputs. An image model is evaluated on ``ingest/images.npy``; a head (model config ``input.kind ==
"embedding"``, :func:`dataopt.train.head.train_head`) on the test rows of ``embed/embeddings.npy``.
An image model never opens the embeddings, so it evaluates without an embed stage; the embeddings are
still a declared input (and DVC dependency), as a head reads them.

Metrics beyond accuracy, calibration and per-class accuracy:

- many/medium/few-shot accuracy (Liu et al. 2019, OLTR): classes banded by training images,
  ``few < t0 <= medium <= t1 < many`` for ``evaluate.shot_thresholds = (t0, t1)``, each band the
  mean of its per-class accuracies (null for an empty band), with ``n_many``/``n_medium``/``n_few``.
  Class sizes come from the model config's ``class_counts`` (what was trained on), else from the
  train-split labels of samples.parquet. When every class has as many images, ``shot_bands:
  "balanced"`` instead.
- cost: ``samples_seen``, ``steps`` (optimizer steps) and ``train_seconds`` of the run;
  ``full_data_samples`` and ``cost_ratio`` (samples seen vs. every training sample for the same epochs);
  ``full_data_steps = ceil(n_train_total / batch_size) * epochs`` and ``steps_ratio`` when the model
  config records ``train.batch_size``.
- against a reference run (``evaluate.reference``: the metrics.json of a full-data run, relative to the
  project root; keys it lacks are read from the ``stage.json`` beside it): ``reference_{samples_seen,steps,train_seconds,accuracy}``, ``samples_seen_ratio``,
  ``steps_ratio_vs_reference``, ``seconds_ratio`` (this run / reference; null when the reference
  value is 0) and ``accuracy_delta`` (this run - reference).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from dataopt import artifacts as art
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.evaluate.metrics import classification_report, reliability, shot_accuracy, shot_bands
from dataopt.evaluate.plots import confusion_png, per_class_png, reliability_png, training_curve_png
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.schema import TEST, TRAIN
from dataopt.train import loop
from dataopt.train.checkpoint import load_model

REFERENCE_KEYS = ("samples_seen", "steps", "train_seconds", "accuracy")


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _reference(ep: Any, paths: Paths) -> dict[str, float] | None:
    """The cost and accuracy of the run ``evaluate.reference`` names (None when it names none)."""
    if ep.reference is None:
        return None
    path = paths.resolve(ep.reference)
    try:
        ref = read_json(path)
    except FileNotFoundError:
        problem = "does not exist"
    except (OSError, ValueError) as exc:
        problem = f"is not a readable JSON file ({exc})"
    else:
        beside = path.parent / "stage.json"  # a headline-only metrics.json: the rest is in stage.json
        if isinstance(ref, dict) and beside.is_file() and not set(REFERENCE_KEYS) <= set(ref):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                ref = {**read_json(beside)["metrics"], **ref}
        try:
            return {k: float(ref[k]) for k in REFERENCE_KEYS}
        except (KeyError, TypeError, ValueError, IndexError):
            problem = f"is not an evaluate metrics.json with numbers {', '.join(REFERENCE_KEYS)}"
    raise DataError(f"evaluate.reference: {path} {problem}; name the metrics.json of a full-data "
                    "run, or set evaluate.reference to null")


def _class_counts(config: dict, samples: pd.DataFrame, n_classes: int, cfg_path) -> np.ndarray:
    """(n_classes,) training images per class: the model config's ``class_counts`` (what was trained
    on), else the train-split labels of samples.parquet."""
    if config.get("class_counts") is None:
        y = samples.loc[samples["split"] == TRAIN, "label"].to_numpy(np.int64)
        return np.bincount(y[(y >= 0) & (y < n_classes)], minlength=n_classes)
    try:
        counts = np.asarray(config["class_counts"], dtype=np.int64)
    except (TypeError, ValueError):
        counts = np.zeros(0)
    if counts.ndim != 1 or len(counts) > n_classes or (counts < 0).any():
        raise DataError(f"{cfg_path}: class_counts must be at most {n_classes} non-negative counts")
    return np.pad(counts, (0, n_classes - len(counts)))


def _inputs(config: dict, paths: Paths, test: np.ndarray, n_rows: int, device: torch.device) -> torch.Tensor:
    """The test rows as model input: uint8 images, or float32 embeddings for a head."""
    if (config.get("input") or {}).get("kind") == "embedding":
        emb = art.load_npy(paths, "embed/embeddings.npy")
        dim = config["input"].get("dim")
        if emb.ndim != 2 or len(emb) != n_rows or (dim is not None and emb.shape[1] != dim):
            raise DataError(f"embed/embeddings.npy: shape {emb.shape} does not fit samples.parquet's "
                            f"{n_rows} rows and the head's input dim {dim}; re-run the 'embed' and "
                            "'train' stages")
        return torch.from_numpy(np.asarray(emb[test], dtype=np.float32)).to(device)
    return loop.images_to_tensor(art.read_images(paths, n_rows)[test], device)


def run(params: Params, paths: Paths) -> dict[str, Any]:
    t0 = time.perf_counter()
    samples_path = art.locate(paths, "ingest/samples.parquet")
    ep = params.evaluate
    device = loop.resolve_device(ep.device, key="evaluate.device")
    reference = _reference(ep, paths)  # a bad reference fails before any work
    model, config = load_model(art.locate(paths, "train/model"), device)
    names = [str(n) for n in (config.get("class_names") or range(config["kwargs"]["n_classes"]))]

    samples = art.read_frame(paths, "ingest/samples.parquet", ["split", "label"])
    split = samples["split"].to_numpy()
    test = np.flatnonzero(split == TEST)
    if len(test) == 0:
        raise DataError(f"{samples_path}: no row with split 'test' to evaluate on")
    y = samples["label"].to_numpy(np.int64)[test]
    bad = y[(y < 0) | (y >= len(names))]
    if len(bad):
        raise DataError(f"{samples_path}: test label {int(bad[0])} is outside the model's {len(names)} classes")

    x = _inputs(config, paths, test, len(samples), device)
    logits = loop.predict_logits(model, x, ep.batch_size)
    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()  # float64: NLL/ECE without rounding noise
    rep = classification_report(probs, y, ep.ece_bins)

    history = art.read_json(paths, "train/history.json")
    if not history:
        raise DataError("train/history.json: empty training history")
    last = history[-1]
    n_train_total = int((split == TRAIN).sum())
    full = n_train_total * len(history)  # the same epochs on every training sample
    flat = {
        "accuracy": rep["accuracy"],
        "balanced_accuracy": rep["balanced_accuracy"],
        "macro_f1": rep["macro_f1"],
        "ece": rep["ece"],
        "nll": rep["nll"],
        "n_test": rep["n"],
        "samples_seen": int(last["samples_seen"]),
        "steps": int(last["steps"]),
        "train_seconds": float(last["seconds"]),
        "full_data_samples": full,
        "cost_ratio": last["samples_seen"] / full if full else float("nan"),
    }
    train_cfg = config.get("train") or {}
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
        flat["accuracy_delta"] = flat["accuracy"] - reference["accuracy"]
    counts = _class_counts(config, samples, len(names), "train/model/config.json")
    flat.update(shot_accuracy(rep["per_class_accuracy"], counts, ep.shot_thresholds))
    flat["device"] = device.type
    per_class = {n: _none_if_nan(a) for n, a in zip(names, rep["per_class_accuracy"])}
    bands = shot_bands(counts, ep.shot_thresholds)

    plots = art.out_dir(paths, "evaluate/plots")
    rel = reliability(probs, y, ep.ece_bins)
    confusion_png(plots / "confusion_matrix.png", rep["confusion"], names)
    per_class_png(plots / "per_class_accuracy.png", names, list(per_class.values()), counts)
    reliability_png(plots / "reliability.png", rel, rep["ece"])
    training_curve_png(plots / "training_curve.png", history)
    art.write_json(paths, "evaluate/report.json", {
        "per_class": [{"class": n, "accuracy": a, "train_count": int(c), "shot": str(b)}
                      for (n, a), c, b in zip(per_class.items(), counts, bands)],
        "reliability": [
            {"bin": int(b), "lower": float(rel["lower"][b]), "upper": float(rel["upper"][b]),
             "count": int(rel["count"][b]), "confidence": _none_if_nan(rel["confidence"][b]),
             "accuracy": _none_if_nan(rel["accuracy"][b])}
            for b in range(ep.ece_bins)],
        "confusion": np.asarray(rep["confusion"]).tolist(),
        "class_names": names,
    })
    flat["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return flat
