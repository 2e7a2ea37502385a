"""evaluate stage: the trained model on the held-out (test) split, and what its training cost.

Writes ``artifacts/evaluate/metrics.json`` itself (it nests ``per_class_accuracy``, which the flat
metrics returned to ``run_stage`` cannot) and ``artifacts/evaluate/plots/``: ``confusion_matrix.png``,
``per_class.json`` (rows ``{class, accuracy}``) and ``reliability.json`` (rows per confidence bin).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.evaluate.metrics import classification_report, reliability
from dataopt.evaluate.plots import confusion_png
from dataopt.io import load_npy, read_json, write_json
from dataopt.paths import Paths
from dataopt.schema import TEST, TRAIN, require
from dataopt.train import loop
from dataopt.train.checkpoint import load_model

INPUTS = (
    "ingest/samples.parquet",
    "ingest/images.npy",
    "train/model/model.safetensors",
    "train/model/config.json",
    "train/history.json",
)
OUTPUTS = ("evaluate/plots",)  # metrics.json too, written by this stage (see module docstring)
PARAMS = ("evaluate",)


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def run(params: Params, paths: Paths) -> dict[str, Any]:
    t0 = time.perf_counter()
    art = paths.artifacts
    samples_path = require(art / "ingest" / "samples.parquet", "ingest")
    images_path = require(art / "ingest" / "images.npy", "ingest")
    history_path = require(art / "train" / "history.json", "train")
    ep = params.evaluate
    device = loop.resolve_device(ep.device, key="evaluate.device")
    model, config = load_model(art / "train" / "model", device)
    names = [str(n) for n in (config.get("class_names") or range(config["kwargs"]["n_classes"]))]

    samples = pd.read_parquet(samples_path, columns=["split", "label"])
    images = load_npy(images_path)
    if len(images) != len(samples):
        raise DataError(f"{images_path}: {len(images)} rows but samples.parquet has {len(samples)}")
    split = samples["split"].to_numpy()
    test = np.flatnonzero(split == TEST)
    if len(test) == 0:
        raise DataError(f"{samples_path}: no row with split 'test' to evaluate on")
    y = samples["label"].to_numpy(np.int64)[test]
    bad = y[(y < 0) | (y >= len(names))]
    if len(bad):
        raise DataError(f"{samples_path}: test label {int(bad[0])} is outside the model's {len(names)} classes")

    x = loop.images_to_tensor(images[test], device)
    logits = loop.predict_logits(model, x, ep.batch_size)
    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()  # float64: NLL/ECE without rounding noise
    rep = classification_report(probs, y, ep.ece_bins)

    history = read_json(history_path)
    if not history:
        raise DataError(f"{history_path}: empty training history")
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
        "device": device.type,
    }
    per_class = {n: _none_if_nan(a) for n, a in zip(names, rep["per_class_accuracy"])}

    plots = paths.stage("evaluate") / "plots"
    confusion_png(plots / "confusion_matrix.png", rep["confusion"], names)
    write_json(plots / "per_class.json", [{"class": n, "accuracy": a} for n, a in per_class.items()])
    rel = reliability(probs, y, ep.ece_bins)
    write_json(plots / "reliability.json", [
        {"bin": int(b), "lower": float(rel["lower"][b]), "upper": float(rel["upper"][b]),
         "count": int(rel["count"][b]), "confidence": _none_if_nan(rel["confidence"][b]),
         "accuracy": _none_if_nan(rel["accuracy"][b])}
        for b in range(ep.ece_bins)
    ])
    flat["eval_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(paths.stage("evaluate") / "metrics.json", {**flat, "per_class_accuracy": per_class})
    return flat
