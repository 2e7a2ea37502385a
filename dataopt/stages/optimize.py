"""optimize stage: compose the optimisation steps into one plan -> plan.parquet, plan.json.

The plan covers the train rows in samples order (``dataopt.schema.PLAN_COLUMNS``): keep, weight,
sampling weight, augment magnitude, new label and ``reason`` (which step decided what, from which
signal values). plan.json has the steps with their counts, the kept share per class, weight
statistics, the training directives (``train``) and the augmentation policy (``augment``) the train
stage honours. Inputs are loaded only when a method asks for them (:data:`INPUT_NAMES`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.analyze.base import LazyInputs, arrow_table
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.optimize.plan import compose, stats, step_metrics
from dataopt.paths import Paths
from dataopt.schema import PLAN_COLUMNS, TRAIN, require
from dataopt.stages.analyze import load_train

INPUTS = ("ingest/samples.parquet", "embed/embeddings.npy", "perceive/signals.parquet",
          "analyze/analysis.parquet")
OUTPUTS = ("optimize/plan.parquet", "optimize/plan.json")
PARAMS = ("seed", "optimize")

# every input a method may name in ``requires`` (a new one = one loader in _inputs below)
INPUT_NAMES = ("sample_id", "labels", "n_classes", "class_counts", "signals", "embeddings",
               "test_embeddings", "text_embeddings", "analysis", "p_clean", "probs", "knn")


def _aligned(path, ids_file: np.ndarray, ids: np.ndarray, stage: str) -> None:
    if ids_file.shape != ids.shape or not np.array_equal(ids_file, ids):
        raise DataError(f"{path} does not cover the train rows of ingest/samples.parquet in order; "
                        f"re-run the {stage} stage")


def _inputs(paths: Paths) -> tuple[LazyInputs, np.ndarray, np.ndarray]:
    """The inputs a method may require (:data:`INPUT_NAMES`), each loaded on first use.

    Row-aligned inputs cover the train rows in samples order: ``embeddings`` (n, d) float32,
    ``text_embeddings`` (n, d_t) float32 or None when the embedder made none, ``signals`` /
    ``analysis`` DataFrames, ``p_clean`` (n,), ``probs`` (n, C) out-of-fold probabilities, ``knn``
    (indices (n, k) int64 into the train rows, distances (n, k) float32); ``test_embeddings``
    (n_test, d) float32; ``n_classes`` int; ``class_counts`` (n_classes,) int64.
    """
    art = paths.artifacts
    samples, signals, n_samples = load_train(paths, {"sample_id": "int64", "label": "int64"})
    ids = samples["sample_id"].to_numpy(np.int64)
    labels = samples["label"].to_numpy(np.int64)
    rows = samples["row"].to_numpy()

    def all_embeddings(name: str = "embeddings.npy") -> np.ndarray:
        path = require(art / "embed" / name, "embed")
        emb = load_npy(path)
        if emb.ndim != 2 or emb.shape[0] != n_samples:
            raise DataError(f"{path}: shape {emb.shape} does not match the {n_samples} rows of "
                            "ingest/samples.parquet; re-run the embed stage")
        return emb

    def test_embeddings() -> np.ndarray:
        split = pq.read_table(art / "ingest" / "samples.parquet", columns=["split"])["split"].to_numpy()
        return np.asarray(all_embeddings()[np.flatnonzero(split != TRAIN)], dtype=np.float32)

    def text_embeddings():
        if not (art / "embed" / "text_embeddings.npy").exists():
            return None  # only the open_clip backend writes them
        return np.asarray(all_embeddings("text_embeddings.npy")[rows], dtype=np.float32)

    def analysis() -> pd.DataFrame:
        path = require(art / "analyze" / "analysis.parquet", "analyze")
        table = pd.read_parquet(path)
        _aligned(path, table["sample_id"].to_numpy(), ids, "analyze")
        return table

    def p_clean() -> np.ndarray:
        path = require(art / "analyze" / "analysis.parquet", "analyze")
        table = pq.read_table(path, columns=["sample_id", "p_clean"])
        _aligned(path, table["sample_id"].to_numpy(), ids, "analyze")
        return table["p_clean"].to_numpy().astype(np.float64)

    def probs() -> np.ndarray:
        path = require(art / "perceive" / "dynamics.npz", "perceive")
        with np.load(path) as z:
            _aligned(path, z["sample_id"], ids, "perceive")
            return np.asarray(z["probs"], dtype=np.float64)

    def knn() -> dict[str, np.ndarray]:
        path = require(art / "embed" / "knn.npz", "embed")
        with np.load(path) as z:
            _aligned(path, z["sample_id"], ids, "embed")
            return {"indices": np.asarray(z["indices"], dtype=np.int64),
                    "distances": np.asarray(z["distances"], dtype=np.float32)}

    n_classes = lambda: int(labels.max()) + 1 if labels.size else 0  # noqa: E731
    loaders: dict[str, Callable[[], Any]] = {
        "sample_id": lambda: ids,
        "labels": lambda: labels,
        "n_classes": n_classes,
        "class_counts": lambda: np.bincount(labels, minlength=n_classes()).astype(np.int64),
        "signals": lambda: signals,
        "embeddings": lambda: np.asarray(all_embeddings()[rows], dtype=np.float32),
        "test_embeddings": test_embeddings,
        "text_embeddings": text_embeddings,
        "analysis": analysis,
        "p_clean": p_clean,
        "probs": probs,
        "knn": knn,
    }
    assert tuple(loaders) == INPUT_NAMES
    return LazyInputs(loaders, "optimize"), ids, labels


def run(params: Params, paths: Paths) -> dict[str, Any]:
    cfg = params.optimize
    inputs, ids, labels = _inputs(paths)
    simple = cfg.steps is None
    plan = compose(cfg.plan_steps(), inputs, labels, params.seed, numbered=not simple)
    n = ids.size
    write_parquet(paths.stage("optimize") / "plan.parquet", arrow_table(PLAN_COLUMNS, {
        "sample_id": ids,
        "keep": plan.keep,
        "weight": plan.weight,
        "sampling_weight": plan.sampling_weight,
        "augment_magnitude": plan.augment_magnitude,
        "new_label": plan.new_label,
        "reason": plan.reason,
    }))

    keep = plan.keep
    classes, inv = np.unique(labels, return_inverse=True)
    share = np.bincount(inv, weights=keep.astype(np.float64)) / np.bincount(inv)
    n_kept = int(keep.sum())
    n_relabelled = int((keep & (plan.new_label != labels)).sum())
    weight = stats(plan.weight[keep])
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
    })
    write_json(paths.stage("optimize") / "plan.json", summary)
    policies = [v["policy"] for v in plan.augment.values()]
    return {
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
        **step_metrics(plan.steps),
    }
