"""PERCEIVE stage: out-of-fold training dynamics and per-sample / per-class / corpus signals.

Writes ``artifacts/perceive/``: ``dynamics.npz`` (see :class:`dataopt.perceive.dynamics.Dynamics`),
``signals.parquet`` (train rows in samples order: sample_id, label, one column per signal; the signal
catalogue is in the schema metadata under ``dataopt.signals``), ``classes.parquet`` and ``corpus.json``.
Reads ``embed/text_embeddings.npy`` when the embedder wrote one (semantic consistency by text cosine).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.paths import Paths
from dataopt.perceive.dynamics import OOFDynamics
from dataopt.perceive.signals import SignalInputs, compute_signals
from dataopt.perceive.summary import class_table, corpus_summary
from dataopt.schema import TRAIN, require
from dataopt.stages.embed import read_images, read_samples

INPUTS = ("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy", "embed/knn.npz")
OUTPUTS = ("perceive/signals.parquet", "perceive/dynamics.npz", "perceive/classes.parquet",
           "perceive/corpus.json")
PARAMS = ("seed", "perceive")

CATALOGUE_KEY = b"dataopt.signals"
_ARROW = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}


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


def run(params: Params, paths: Paths) -> dict[str, Any]:
    cfg = params.perceive
    t0 = time.perf_counter()
    samples = read_samples(paths, ["sample_id", "split", "label", "label_name"])
    n_rows = len(samples["sample_id"])
    train_idx = np.flatnonzero(samples["split"] == TRAIN)
    if len(train_idx) == 0:
        raise DataError("samples.parquet has no train rows: nothing to perceive")
    sample_id = samples["sample_id"].astype(np.int64)[train_idx]
    labels = samples["label"].astype(np.int64)[train_idx]
    n_classes = int(samples["label"].max()) + 1  # test labels included: probs cover every class
    emb, knn = _read_embed(paths, n_rows, sample_id)
    emb_train = np.asarray(emb[train_idx], dtype=np.float32)

    features = emb_train if cfg.model == "head" else read_images(paths, n_rows)[train_idx]
    oof = OOFDynamics(
        model=cfg.model, hidden=cfg.hidden, width=cfg.width, folds=cfg.folds, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, augment=cfg.augment,
        label_smoothing=cfg.label_smoothing, max_seconds=cfg.max_seconds, device=cfg.device, random_state=params.seed,
    ).fit(features, labels, n_classes, sample_id=sample_id)
    dyn = oof.dynamics_
    early_used = min(cfg.early_epochs, dyn.epochs_completed)

    text = _read_text_embeddings(paths, emb_train.shape[1])
    inputs = SignalInputs(labels=labels, dynamics=dyn, embeddings=emb_train,
                          knn_indices=knn["indices"], knn_distances=knn["distances"], text_embeddings=text)
    t_sig = time.perf_counter()
    values, catalogue = compute_signals(inputs, cfg.signals, sample_id=sample_id, kwargs=cfg.signal_kwargs,
                                        early_epochs=early_used)
    signal_seconds = round(time.perf_counter() - t_sig, 3)
    # the class and corpus summaries need these two, whatever perceive.signals lists
    needed = ("correct_last", "class_center_distance")
    base, _ = compute_signals(inputs, [k for k in needed if k not in values], sample_id=sample_id)
    base.update({k: values[k] for k in needed if k in values})

    out = paths.stage("perceive")
    dyn.save(out / "dynamics.npz")
    table = pa.table({"sample_id": pa.array(sample_id, pa.int64()), "label": pa.array(labels, pa.int64()),
                      **{k: pa.array(v, _ARROW[v.dtype.name]) for k, v in values.items()}})
    table = table.replace_schema_metadata({CATALOGUE_KEY: json.dumps(catalogue).encode()})
    write_parquet(out / "signals.parquet", table)

    names = samples["label_name"][train_idx]
    label_names = {int(lab): str(nm) for lab, nm in zip(labels[::-1], names[::-1])}  # first row wins
    write_parquet(out / "classes.parquet",
                  class_table(labels, label_names, base["correct_last"], base["class_center_distance"],
                              emb_train))

    duplicate_of = _optional_int_column(paths, "duplicate_of", train_idx)
    is_duplicate = np.zeros(len(labels), bool) if duplicate_of is None else ~np.isnan(duplicate_of)
    corpus = corpus_summary(labels, is_duplicate, base["correct_last"], dyn.probs,
                            _optional_int_column(paths, "label_clean", train_idx))
    seconds = round(time.perf_counter() - t0, 3)
    corpus.update({
        "epochs_completed": dyn.epochs_completed,
        "epochs_requested": cfg.epochs,
        "epochs_per_fold": dyn.epochs_per_fold.tolist(),
        "early_epochs_used": early_used,
        "model": cfg.model,
        "network": oof.model_,
        "augment": cfg.augment,
        "label_smoothing": cfg.label_smoothing,
        "folds": cfg.folds,
        "device": oof.device_,
        "seconds": seconds,
        "signal_seconds": signal_seconds,
        "semantic_consistency_source": "text_cosine" if text is not None else "oof_probability",
        "signals": catalogue,
    })
    write_json(out / "corpus.json", corpus)
    return {"oof_accuracy": corpus["oof_accuracy"],
            "mean_loss_early": float(dyn.loss[:early_used].mean()),
            "epochs_completed": dyn.epochs_completed, "seconds": seconds}
