"""optimize stage: select (prune) and weight the training samples -> plan.parquet, plan.json.

The plan covers the train rows in samples order (``dataopt.schema.PLAN_COLUMNS``); ``reason`` says,
per sample, which step decided what from which signal values. Inputs are loaded only when a method
asks for them (analysis p_clean only for a weighting that needs it).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

import dataopt.optimize  # noqa: F401  (fills SELECTORS, WEIGHTERS)
from dataopt.analyze.base import LazyInputs, arrow_table, fit_method, join
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.paths import Paths
from dataopt.registry import SELECTORS, WEIGHTERS, get_params
from dataopt.schema import PLAN_COLUMNS, require
from dataopt.stages.analyze import load_train

INPUTS = ("ingest/samples.parquet", "embed/embeddings.npy", "perceive/signals.parquet",
          "analyze/analysis.parquet")
OUTPUTS = ("optimize/plan.parquet", "optimize/plan.json")
PARAMS = ("seed", "optimize")


def _inputs(paths: Paths) -> tuple[LazyInputs, np.ndarray, np.ndarray]:
    """The inputs a selector or weighter may require, each loaded on first use."""
    samples, signals, n_samples = load_train(paths, {"sample_id": "int64", "label": "int64"})
    ids = samples["sample_id"].to_numpy(np.int64)
    labels = samples["label"].to_numpy(np.int64)

    def embeddings() -> np.ndarray:
        path = require(paths.artifacts / "embed" / "embeddings.npy", "embed")
        emb = load_npy(path)
        if emb.ndim != 2 or emb.shape[0] != n_samples:
            raise DataError(f"{path}: shape {emb.shape} does not match the {n_samples} rows of "
                            "ingest/samples.parquet; re-run the embed stage")
        return np.asarray(emb[samples["row"].to_numpy()], dtype=np.float32)

    def p_clean() -> np.ndarray:
        path = require(paths.artifacts / "analyze" / "analysis.parquet", "analyze")
        table = pq.read_table(path, columns=["sample_id", "p_clean"])
        if not np.array_equal(table["sample_id"].to_numpy(), ids):
            raise DataError(f"{path} does not cover the train rows of ingest/samples.parquet in "
                            "order; re-run the analyze stage")
        return table["p_clean"].to_numpy().astype(np.float64)

    loaders = {"labels": lambda: labels, "signals": lambda: signals,
               "embeddings": embeddings, "p_clean": p_clean}
    return LazyInputs(loaders, "optimize"), ids, labels


def run(params: Params, paths: Paths) -> dict[str, Any]:
    cfg = params.optimize
    inputs, ids, labels = _inputs(paths)
    selector = fit_method(
        SELECTORS.build(cfg.method, cfg.kwargs, ratio=cfg.ratio, random_state=params.seed), inputs
    )
    weighter = fit_method(
        WEIGHTERS.build(cfg.weighting, cfg.weighting_kwargs, random_state=params.seed), inputs
    )
    keep = np.asarray(selector.keep_, dtype=bool)
    weight = np.asarray(weighter.weight_, dtype=np.float64)
    n = ids.size
    # The weighting only matters for kept samples, so only their reasons mention it.
    w_reason = np.asarray(weighter.reason_).astype(str)
    sep = np.where(keep & (w_reason != ""), "; ", "")
    reason = join(selector.reason_, sep, np.where(keep, w_reason, ""))
    write_parquet(paths.stage("optimize") / "plan.parquet", arrow_table(PLAN_COLUMNS, {
        "sample_id": ids,
        "keep": keep,
        "weight": weight,
        "sampling_weight": np.ones(n),
        "augment_magnitude": np.zeros(n),
        "new_label": labels,
        "reason": reason,
    }))

    classes, inv = np.unique(labels, return_inverse=True)
    share = np.bincount(inv, weights=keep.astype(np.float64)) / np.bincount(inv)
    kept_w = weight[keep]
    n_kept = int(keep.sum())
    plan = {
        "method": cfg.method,
        "kwargs": get_params(selector),
        "ratio": cfg.ratio,
        "n_train": int(n),
        "n_kept": n_kept,
        "kept_share": n_kept / n,
        "kept_share_per_class": dict(zip(map(str, classes.tolist()), share.tolist())),
        "weighting": cfg.weighting,
        "weighting_kwargs": get_params(weighter),
        "weight": {"mean": float(kept_w.mean()), "min": float(kept_w.min()),
                   "max": float(kept_w.max())},
        "steps": [
            {"step": "select", "method": cfg.method, **selector.summary_},
            {"step": "weight", "method": cfg.weighting, **weighter.summary_},
        ],
        "inputs": inputs.loaded(),
    }
    write_json(paths.stage("optimize") / "plan.json", plan)
    return {"n_kept": n_kept, "kept_share": n_kept / n, "mean_weight": float(kept_w.mean())}
