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

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt import artifacts as art
from dataopt.analyze.run import SIGNAL_COLUMNS, analyze, write_plots
from dataopt.analyze.confident import check_probs
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.paths import Paths



# ----------------------------------------------------------------------------- reading the inputs

def _load_probs(paths: Paths, sample_id: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Final-epoch out-of-fold probabilities ``(n, C)`` from perceive/dynamics.npz, checked."""
    dyn = art.read_aligned(paths, "perceive/dynamics.npz", sample_id)
    return check_probs(dyn["probs"], labels)[0]


def _load_knn(paths: Paths, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """embed/knn.npz (indices, distances over the train rows), checked against the train rows."""
    knn = art.read_aligned(paths, "embed/knn.npz", sample_id)
    if knn["distances"].ndim != 2 or knn["distances"].shape[1] < 1:
        raise DataError(f"embed/knn.npz: distances must be (n_train, k >= 1); got "
                        f"{knn['distances'].shape}")
    return knn


def _read(params: Params, paths: Paths) -> dict[str, Any]:
    """The keyword arguments of :func:`dataopt.analyze.analyze` (all but cfg and seed), read and checked."""
    samples, signals, n_samples = art.read_train_signals(paths, SIGNAL_COLUMNS)
    labels = signals["label"].to_numpy(np.int64)
    sample_id = signals["sample_id"].to_numpy(np.int64)
    knn = _load_knn(paths, sample_id)
    emb = art.load_npy(paths, "embed/embeddings.npy")
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
    art.write_table(paths, "analyze/analysis.parquet", res.table)
    write_plots(res, art.out_dir(paths, "analyze/plots"))
    ids = res.table["sample_id"].to_numpy()  # provenance: flags per batch of origin
    flags = {"label_issue": res.table["is_label_issue"].to_numpy()}
    art.write_json(paths, "analyze/analysis.json", {**res.summary, "by_batch": art.batch_summary(paths, ids, **flags)})
    return res.metrics
