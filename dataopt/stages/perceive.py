"""PERCEIVE stage: out-of-fold training dynamics and per-sample / per-class / corpus signals.

Writes ``artifacts/perceive/``: ``dynamics.npz`` (see :class:`dataopt.perceive.Dynamics`),
``signals.parquet`` (train rows in samples order: sample_id, label, one column per signal; the signal
catalogue is in the schema metadata under ``dataopt.signals``), ``classes.parquet`` and ``corpus.json``.
Reads ``embed/text_embeddings.npy`` when the embedder wrote one (semantic consistency by text cosine).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.paths import Paths
from dataopt.perceive import perceive
from dataopt.schema import TRAIN, require
from dataopt.stages.embed import read_images, read_samples

INPUTS = ("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy", "embed/knn.npz")
OUTPUTS = ("perceive/signals.parquet", "perceive/dynamics.npz", "perceive/classes.parquet",
           "perceive/corpus.json")
PARAMS = ("seed", "perceive")

# ----------------------------------------------------------------------------- reading the inputs

def _read(params: Params, paths: Paths) -> dict[str, Any]:
    """The keyword arguments of :func:`dataopt.perceive.perceive` (all but cfg and seed), read and checked."""
    samples = read_samples(paths, ["sample_id", "split", "label", "label_name"])
    n_rows = len(samples["sample_id"])
    train_idx = np.flatnonzero(samples["split"] == TRAIN)
    if len(train_idx) == 0:
        raise DataError("samples.parquet has no train rows: nothing to perceive")
    sample_id = samples["sample_id"].astype(np.int64)[train_idx]
    emb, knn = _read_embed(paths, n_rows, sample_id)
    emb_train = np.asarray(emb[train_idx], dtype=np.float32)
    duplicate_of = _optional_int_column(paths, "duplicate_of", train_idx)
    return {
        "sample_id": sample_id,
        "labels": samples["label"].astype(np.int64)[train_idx],
        "label_names": samples["label_name"][train_idx],
        "n_classes": int(samples["label"].max()) + 1,  # test labels included: probs cover every class
        "embeddings": emb_train,
        "knn_indices": knn["indices"],
        "knn_distances": knn["distances"],
        "images": None if params.perceive.model == "head" else read_images(paths, n_rows)[train_idx],
        "text_embeddings": _read_text_embeddings(paths, emb_train.shape[1]),
        "is_duplicate": None if duplicate_of is None else ~np.isnan(duplicate_of),
        "label_clean": _optional_int_column(paths, "label_clean", train_idx),
    }


def _read_embed(paths: Paths, n_rows: int, train_sid: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """embeddings.npy (memory-mapped, all rows) and knn.npz, checked against samples.parquet."""
    emb_path = require(paths.artifacts / "embed" / "embeddings.npy", "embed")
    knn_path = require(paths.artifacts / "embed" / "knn.npz", "embed")
    emb = load_npy(emb_path)
    if emb.ndim != 2 or len(emb) != n_rows:
        raise DataError(f"{emb_path} has shape {emb.shape} but samples.parquet has {n_rows} rows: "
                        "rerun the 'embed' stage")
    with np.load(knn_path, allow_pickle=False) as z:
        knn = {k: z[k] for k in ("sample_id", "indices", "distances")}
    if not np.array_equal(knn["sample_id"], train_sid):
        raise DataError(
            f"{knn_path} does not match the train rows of samples.parquet: rerun the 'embed' stage"
        )
    return emb, knn


def _read_text_embeddings(paths: Paths, dim: int) -> np.ndarray | None:
    """``(n_classes, d)`` float32 text embeddings of the classes, or None when the embedder has no text."""
    path = paths.artifacts / "embed" / "text_embeddings.npy"
    if not path.exists():
        return None
    text = np.asarray(load_npy(path), np.float32)
    if text.ndim != 2 or text.shape[1] != dim:
        raise DataError(f"{path} has shape {text.shape} but the embeddings have dim {dim}: "
                        "rerun the 'embed' stage")
    return text


def _optional_int_column(paths: Paths, name: str, rows: np.ndarray) -> np.ndarray | None:
    """``(len(rows),)`` float64 values of a nullable int column of samples.parquet (NaN = null), or
    None when the column is absent."""
    path = paths.artifacts / "ingest" / "samples.parquet"
    if name not in pq.read_schema(path).names:
        return None
    col = pq.read_table(path, columns=[name]).column(0).cast(pa.float64())
    return col.to_numpy(zero_copy_only=False)[rows]  # nulls become NaN


# ----------------------------------------------------------------------------- running

def run(params: Params, paths: Paths) -> dict[str, Any]:
    t0 = time.perf_counter()
    inputs = _read(params, paths)
    res = perceive(**inputs, cfg=params.perceive, seed=params.seed)
    res.corpus["seconds"] = round(time.perf_counter() - t0, 3)  # the stage's, reads included

    out = paths.stage("perceive")
    res.dynamics.save(out / "dynamics.npz")
    write_parquet(out / "signals.parquet", res.signals)
    write_parquet(out / "classes.parquet", res.classes)
    write_json(out / "corpus.json", res.corpus)
    dyn = res.dynamics
    return {"oof_accuracy": res.corpus["oof_accuracy"],
            "mean_loss_early": float(dyn.loss[:res.corpus["early_epochs_used"]].mean()),
            "epochs_completed": dyn.epochs_completed, "seconds": res.corpus["seconds"]}
