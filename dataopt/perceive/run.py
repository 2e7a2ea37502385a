"""The perceive step as one call: out-of-fold dynamics -> per-sample signals -> class and corpus tables.

:func:`perceive` is what the perceive stage runs between reading its inputs and writing its outputs,
and what the benchmarks call; it takes arrays and the ``perceive`` params section, never paths.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from dataopt.perceive.dynamics import Dynamics, OOFDynamics
from dataopt.perceive.signals import SignalInputs, compute_signals
from dataopt.perceive.summary import class_table, corpus_summary

CATALOGUE_KEY = b"dataopt.signals"  # signals.parquet schema metadata: the signal catalogue (JSON)
_ARROW = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}
# the class and corpus summaries need these two, whatever perceive.signals lists
SUMMARY_SIGNALS = ("correct_last", "class_center_distance")


@dataclass
class PerceiveResult:
    """What :func:`perceive` perceived over the ``n`` train rows.

    Attributes
    ----------
    dynamics : :class:`Dynamics` of the out-of-fold run
    signals : Table: sample_id, label, one column per signal; the catalogue (name -> card) in the
        schema metadata under :data:`CATALOGUE_KEY`
    classes : Table, one row per class (:func:`dataopt.perceive.class_table`)
    corpus : dict, the corpus summary plus how the run went (epochs, network, device, seconds, catalogue)
    """

    dynamics: Dynamics
    signals: pa.Table
    classes: pa.Table
    corpus: dict[str, Any]


def perceive(sample_id: np.ndarray, labels: np.ndarray, label_names: np.ndarray, n_classes: int,
             embeddings: np.ndarray, knn_indices: np.ndarray, knn_distances: np.ndarray,
             cfg: Any, seed: int, images: Optional[np.ndarray] = None,
             text_embeddings: Optional[np.ndarray] = None, is_duplicate: Optional[np.ndarray] = None,
             label_clean: Optional[np.ndarray] = None) -> PerceiveResult:
    """Train the out-of-fold proxy, compute the signals ``cfg.signals`` and summarise classes and corpus.

    Parameters
    ----------
    sample_id, labels : (n,) int64 over the train rows
    label_names : (n,) str, the class name of each row (the first row of a class names it)
    n_classes : int, classes the probabilities cover (test labels included)
    embeddings : (n, d) float32 train-row embeddings
    knn_indices, knn_distances : (n, k) kNN graph over the train rows (self excluded)
    cfg : the ``perceive`` params section (:class:`dataopt.config.Params` ``.perceive``)
    seed : int, seeds the folds and every model
    images : (n, H, W, 3) uint8, needed when ``cfg.model`` is an image network
    text_embeddings : (n_classes, d) float32 or None (semantic consistency by text cosine when given)
    is_duplicate : (n,) bool, rows ingest marked as exact duplicates (default none)
    label_clean : (n,) float, known clean labels (NaN = unknown) or None

    Returns
    -------
    :class:`PerceiveResult`
    """
    t0 = time.perf_counter()
    features = embeddings if cfg.model == "head" else images
    oof = OOFDynamics(
        model=cfg.model, hidden=cfg.hidden, width=cfg.width, folds=cfg.folds, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, augment=cfg.augment,
        label_smoothing=cfg.label_smoothing, max_seconds=cfg.max_seconds, device=cfg.device, random_state=seed,
    ).fit(features, labels, n_classes, sample_id=sample_id)
    dyn = oof.dynamics_
    early_used = min(cfg.early_epochs, dyn.epochs_completed)

    inputs = SignalInputs(labels=labels, dynamics=dyn, embeddings=embeddings, knn_indices=knn_indices,
                          knn_distances=knn_distances, text_embeddings=text_embeddings)
    t_sig = time.perf_counter()
    values, catalogue = compute_signals(inputs, cfg.signals, sample_id=sample_id, kwargs=cfg.signal_kwargs,
                                        early_epochs=early_used)
    signal_seconds = round(time.perf_counter() - t_sig, 3)
    base, _ = compute_signals(inputs, [k for k in SUMMARY_SIGNALS if k not in values], sample_id=sample_id)
    base.update({k: values[k] for k in SUMMARY_SIGNALS if k in values})

    table = pa.table({"sample_id": pa.array(sample_id, pa.int64()), "label": pa.array(labels, pa.int64()),
                      **{k: pa.array(v, _ARROW[v.dtype.name]) for k, v in values.items()}})
    table = table.replace_schema_metadata({CATALOGUE_KEY: json.dumps(catalogue).encode()})

    names = {int(lab): str(nm) for lab, nm in zip(labels[::-1], label_names[::-1])}  # first row wins
    classes = class_table(labels, names, base["correct_last"], base["class_center_distance"], embeddings)
    if is_duplicate is None:
        is_duplicate = np.zeros(len(labels), bool)
    corpus = corpus_summary(labels, is_duplicate, base["correct_last"], dyn.probs, label_clean)
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
        "seconds": round(time.perf_counter() - t0, 3),
        "signal_seconds": signal_seconds,
        "semantic_consistency_source": "text_cosine" if text_embeddings is not None else "oof_probability",
        "signals": catalogue,
    })
    return PerceiveResult(dynamics=dyn, signals=table, classes=classes, corpus=corpus)


def signal_catalogue(table: pa.Table) -> dict[str, dict[str, str]]:
    """The catalogue (signal name -> card) a :func:`perceive` signal table carries in its metadata."""
    meta = table.schema.metadata or {}
    return json.loads(meta[CATALOGUE_KEY]) if CATALOGUE_KEY in meta else {}
