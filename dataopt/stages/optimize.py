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

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt import artifacts as art
from dataopt.analyze.base import LazyInputs
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.optimize.plan import optimize
from dataopt.paths import Paths
from dataopt.schema import TEST

# every input a method may name in ``requires`` (a new one = one loader in _inputs below)
INPUT_NAMES = ("sample_id", "labels", "n_classes", "class_counts", "signals", "embeddings",
               "test_embeddings", "text_embeddings", "analysis", "p_clean", "probs", "knn")


# ----------------------------------------------------------------------------- reading the inputs

def _aligned(path: str, ids_file: np.ndarray, ids: np.ndarray) -> None:
    if ids_file.shape != ids.shape or not np.array_equal(ids_file, ids):
        raise DataError(f"{path} does not cover the train rows of ingest/samples.parquet in order; "
                        f"re-run the {art.ARTIFACTS[path].stage} stage")


def _inputs(paths: Paths) -> tuple[LazyInputs, np.ndarray, np.ndarray]:
    """The inputs a method may require (:data:`INPUT_NAMES`), each loaded on first use.

    Row-aligned inputs cover the train rows in samples order: ``embeddings`` (n, d) float32,
    ``signals`` /
    ``analysis`` DataFrames, ``p_clean`` (n,), ``probs`` (n, C) out-of-fold probabilities, ``knn``
    (indices (n, k) int64 into the train rows, distances (n, k) float32); ``test_embeddings``
    (n_test, d) float32; ``text_embeddings`` (n_classes, d) float32 or None when the embedder has no
    text tower; ``n_classes`` int; ``class_counts`` (n_classes,) int64.
    """
    samples, signals, n_samples = art.read_train_signals(paths, {"sample_id": "int64", "label": "int64"})
    ids = samples["sample_id"].to_numpy(np.int64)
    labels = samples["label"].to_numpy(np.int64)
    rows = samples["row"].to_numpy()

    def all_embeddings() -> np.ndarray:
        emb = art.load_npy(paths, "embed/embeddings.npy")
        if emb.ndim != 2 or emb.shape[0] != n_samples:
            raise DataError(f"embed/embeddings.npy: shape {emb.shape} does not match the {n_samples} "
                            "rows of ingest/samples.parquet; re-run the embed stage")
        return emb

    def test_embeddings() -> np.ndarray:
        split = art.read_samples(paths, ["split"])["split"]
        # the reference's held-out rows only: a batch's held-out rows are the retrain flow's to score
        return np.asarray(all_embeddings()[np.flatnonzero(split == TEST)], dtype=np.float32)

    def analysis() -> pd.DataFrame:
        table = art.read_frame(paths, "analyze/analysis.parquet")
        _aligned("analyze/analysis.parquet", table["sample_id"].to_numpy(), ids)
        return table

    def p_clean() -> np.ndarray:
        table = art.read_table(paths, "analyze/analysis.parquet", ["sample_id", "p_clean"])
        _aligned("analyze/analysis.parquet", table["sample_id"].to_numpy(), ids)
        return table["p_clean"].to_numpy().astype(np.float64)

    def probs() -> np.ndarray:
        return np.asarray(art.read_aligned(paths, "perceive/dynamics.npz", ids)["probs"], np.float64)

    def knn() -> dict[str, np.ndarray]:
        z = art.read_aligned(paths, "embed/knn.npz", ids)
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
        # class-prompt vectors (n_classes, d) of a backend with a text tower, else None
        "text_embeddings": lambda: art.read_text_embeddings(paths),
        "analysis": analysis,
        "p_clean": p_clean,
        "probs": probs,
        "knn": knn,
    }
    assert tuple(loaders) == INPUT_NAMES
    return LazyInputs(loaders, "optimize"), ids, labels


# ----------------------------------------------------------------------------- running

def run(params: Params, paths: Paths) -> dict[str, Any]:
    inputs, ids, labels = _inputs(paths)
    res = optimize(params.optimize, inputs, ids, labels, params.seed)
    art.write_table(paths, "optimize/plan.parquet", res.table)
    t = res.table.to_pandas()  # provenance: what the plan does to each batch of origin (rows: ids)
    by_batch = art.batch_summary(paths, t["sample_id"].to_numpy(), kept=t["keep"].to_numpy(),
                                 weight=t["weight"].to_numpy(), relabelled=(t["new_label"] != labels).to_numpy())
    art.write_json(paths, "optimize/plan.json", {**res.summary, "by_batch": by_batch})
    return res.metrics
