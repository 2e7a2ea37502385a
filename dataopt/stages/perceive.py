"""PERCEIVE stage: out-of-fold training dynamics and per-sample / per-class / corpus signals.

Writes ``artifacts/perceive/``: ``dynamics.npz`` (see :class:`dataopt.perceive.dynamics.Dynamics`),
``signals.parquet`` (train rows in samples order: sample_id, label, one column per signal; the signal
catalogue is in the schema metadata under ``dataopt.signals``), ``classes.parquet`` and ``corpus.json``.
Semantic consistency uses ``embed/text_embeddings.npy`` (text cosine) when the embedder has a text
tower, else the out-of-fold probability.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from dataopt import artifacts as art
from dataopt.artifacts import read_images, read_samples, read_text_embeddings
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.paths import Paths
from dataopt.stages import machine_defaults
from dataopt.perceive.run import perceive
from dataopt.schema import TRAIN

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
    emb = art.load_npy(paths, "embed/embeddings.npy")
    if emb.ndim != 2 or len(emb) != n_rows:
        raise DataError(f"embed/embeddings.npy has shape {emb.shape} but samples.parquet has {n_rows} "
                        "rows: rerun the 'embed' stage")
    return emb, art.read_aligned(paths, "embed/knn.npz", train_sid)


def _read_text_embeddings(paths: Paths, dim: int) -> np.ndarray | None:
    """``(n_classes, d)`` float32 text embeddings of the classes, or None when the embedder has no text."""
    text = read_text_embeddings(paths)
    if text is not None and (text.ndim != 2 or text.shape[1] != dim):
        raise DataError(f"embed/text_embeddings.npy has shape {text.shape} but the embeddings have dim "
                        f"{dim}: rerun the 'embed' stage")
    return text


def _optional_int_column(paths: Paths, name: str, rows: np.ndarray) -> np.ndarray | None:
    """``(len(rows),)`` float64 values of a nullable int column of samples.parquet (NaN = null), or
    None when the column is absent."""
    if name not in art.read_schema(paths, "ingest/samples.parquet").names:
        return None
    col = art.read_table(paths, "ingest/samples.parquet", [name]).column(0)
    # nulls become NaN; unsafe: a sample id (duplicate_of) above 2**53 only needs to stay non-null here
    return col.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)[rows]


# ----------------------------------------------------------------------------- running

def run(params: Params, paths: Paths) -> dict[str, Any]:
    params, _ = machine_defaults(params, paths)  # a direct call (run_stage has filled them)
    t0 = time.perf_counter()
    inputs = _read(params, paths)
    res = perceive(**inputs, cfg=params.perceive, seed=params.seed)
    res.corpus["seconds"] = round(time.perf_counter() - t0, 3)  # the stage's, reads included

    res.dynamics.save(art.locate(paths, "perceive/dynamics.npz", "w"))
    art.write_table(paths, "perceive/signals.parquet", res.signals)
    art.write_table(paths, "perceive/classes.parquet", res.classes)
    art.write_json(paths, "perceive/corpus.json", res.corpus)
    dyn = res.dynamics
    return {"oof_accuracy": res.corpus["oof_accuracy"],
            "mean_loss_early": float(dyn.loss[:res.corpus["early_epochs_used"]].mean()),
            "epochs_completed": dyn.epochs_completed, "seconds": res.corpus["seconds"]}
