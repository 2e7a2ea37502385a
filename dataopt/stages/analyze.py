"""analyze stage: fit a label-noise detector to the perceived signals -> p_clean and label issues,
plus outlier and near-duplicate flags, the noise transition matrix and plots.

Writes ``analysis.parquet`` (``dataopt.schema.ANALYSIS_COLUMNS`` then ``p_clean_mixture`` and the
flag columns of ``FLAG_COLUMNS``; train rows in samples order), ``analysis.json`` (detector and its
fitted state, estimated noise rate and how it was estimated, the confident joint and the noise
transition matrix, flag counts, per-class summary and, when ``label_clean`` is known, detection
quality against it) and ``plots/`` (loss histogram with the fitted mixture, per-class bars, a PCA
projection coloured by flag, the transition-matrix heatmap; the JSON rows behind the DVC plots).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dataopt.analyze import SIGNAL_COLUMNS, analyze, write_plots
from dataopt.analyze.confident import check_probs
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.paths import Paths
from dataopt.schema import TRAIN, check_columns, require

INPUTS = ("ingest/samples.parquet", "embed/embeddings.npy", "embed/knn.npz",
          "perceive/signals.parquet", "perceive/dynamics.npz")
OUTPUTS = ("analyze/analysis.parquet", "analyze/analysis.json", "analyze/plots")
PARAMS = ("seed", "analyze")


# ----------------------------------------------------------------------------- reading the inputs

def load_train(paths: Paths, signal_columns: dict[str, str] = SIGNAL_COLUMNS
               ) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Train rows of samples.parquet and signals.parquet, checked to be aligned row by row.

    Parameters
    ----------
    paths : Paths
    signal_columns : mapping
        Columns signals.parquet must have (a DataError names the missing ones).

    Returns
    -------
    samples : DataFrame (n_train rows): sample_id, label, label_name, label_clean, and ``row``
        (the position in samples.parquet, i.e. the row of embeddings.npy)
    signals : DataFrame (n_train rows), every signal column
    n_samples : int
        Rows of samples.parquet (both splits).
    """
    samples_path = require(paths.artifacts / "ingest" / "samples.parquet", "ingest")
    signals_path = require(paths.artifacts / "perceive" / "signals.parquet", "perceive")
    check_columns(signals_path, signal_columns)
    samples = pq.read_table(
        samples_path, columns=["sample_id", "split", "label", "label_name", "label_clean"]
    ).to_pandas()
    n_samples = len(samples)
    samples["row"] = np.arange(n_samples)
    samples = samples[samples["split"] == TRAIN].reset_index(drop=True)
    signals = pd.read_parquet(signals_path)
    ids, sig_ids = samples["sample_id"].to_numpy(), signals["sample_id"].to_numpy()
    if ids.shape != sig_ids.shape or not np.array_equal(ids, sig_ids):
        n = min(ids.size, sig_ids.size)
        first = np.flatnonzero(ids[:n] != sig_ids[:n])
        where = f"first difference at row {first[0]}" if first.size else "different lengths"
        raise DataError(
            f"{signals_path} does not match the {ids.size} train rows of {samples_path} "
            f"({sig_ids.size} rows, {where}); re-run the perceive stage"
        )
    stale = np.flatnonzero(samples["label"].to_numpy() != signals["label"].to_numpy())
    if stale.size:  # same samples, other labels (e.g. new injected noise): signals are out of date
        raise DataError(
            f"{signals_path}: label differs from {samples_path} for {stale.size} train rows "
            f"(first sample_id {ids[stale[0]]}); re-run the perceive stage"
        )
    return samples, signals, n_samples


def _load_probs(paths: Paths, sample_id: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Final-epoch out-of-fold probabilities ``(n, C)`` from perceive/dynamics.npz, checked."""
    path = require(paths.artifacts / "perceive" / "dynamics.npz", "perceive")
    with np.load(path, allow_pickle=False) as z:
        sid, probs = z["sample_id"], z["probs"]
    if not np.array_equal(sid, sample_id):
        raise DataError(f"{path} does not match the train rows of samples.parquet; re-run the "
                        "perceive stage")
    return check_probs(probs, labels)[0]


def _load_knn(paths: Paths, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """embed/knn.npz (indices, distances over the train rows), checked against the train rows."""
    path = require(paths.artifacts / "embed" / "knn.npz", "embed")
    with np.load(path, allow_pickle=False) as z:
        knn = {k: z[k] for k in ("sample_id", "indices", "distances")}
    if not np.array_equal(knn["sample_id"], sample_id):
        raise DataError(f"{path} does not match the train rows of samples.parquet; re-run the "
                        "embed stage")
    if knn["distances"].ndim != 2 or knn["distances"].shape[1] < 1:
        raise DataError(f"{path}: distances must be (n_train, k >= 1); got "
                        f"{knn['distances'].shape}")
    return knn


def _read(params: Params, paths: Paths) -> dict[str, Any]:
    """The keyword arguments of :func:`dataopt.analyze.analyze` (all but cfg and seed), read and checked."""
    samples, signals, n_samples = load_train(paths)
    labels = signals["label"].to_numpy(np.int64)
    sample_id = signals["sample_id"].to_numpy(np.int64)
    knn = _load_knn(paths, sample_id)
    emb = load_npy(require(paths.artifacts / "embed" / "embeddings.npy", "embed"))
    if len(emb) != n_samples:
        raise DataError(f"embed/embeddings.npy has {len(emb)} rows but samples.parquet has "
                        f"{n_samples}; re-run the embed stage")
    names = samples.drop_duplicates("label").set_index("label")["label_name"].dropna().to_dict()
    return {
        "signals": signals,
        "probs": _load_probs(paths, sample_id, labels),
        "knn_indices": knn["indices"],
        "knn_distances": knn["distances"],
        "label_names": names,
        "label_clean": samples["label_clean"].astype("float64").to_numpy(),
        "embeddings": emb,  # memory-mapped, all rows: analyze reads the plotted train rows only
        "embedding_rows": samples["row"].to_numpy(),
    }


# ----------------------------------------------------------------------------- running

def run(params: Params, paths: Paths) -> dict[str, Any]:
    res = analyze(**_read(params, paths), cfg=params.analyze, seed=params.seed)
    out = paths.stage("analyze")
    write_parquet(out / "analysis.parquet", res.table)
    write_plots(res, out / "plots")
    write_json(out / "analysis.json", res.summary)
    return res.metrics
