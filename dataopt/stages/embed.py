"""EMBED stage: every sample's image -> an L2-normalised float16 embedding, plus a kNN graph of the
train rows.

Writes ``artifacts/embed/``: ``embeddings.npy`` (float16 ``(N, d)``, row i = row i of
``samples.parquet``, both splits), ``knn.npz`` (``sample_id``: train ids in samples order;
``indices``: ``(n_train, k)`` positions into that array, self excluded; ``distances``: float32
Euclidean, ascending) and ``meta.json`` (backend, kwargs, dims, device, timings, throughput).
"""
from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from dataopt.config import Params
from dataopt.embed import check_finite, knn_search
from dataopt.errors import DataError
from dataopt.io import load_npy, save_npy, save_npz, write_json
from dataopt.paths import Paths
from dataopt.registry import EMBEDDERS, get_params
from dataopt.schema import SAMPLES_COLUMNS, TRAIN, check_columns, require

INPUTS = ("ingest/samples.parquet", "ingest/images.npy")
OUTPUTS = ("embed/embeddings.npy", "embed/knn.npz", "embed/meta.json")
PARAMS = ("seed", "embed")


def read_samples(paths: Paths, columns: list[str], stage: str = "ingest") -> dict[str, np.ndarray]:
    """Columns of ``artifacts/ingest/samples.parquet`` as numpy arrays (nulls -> None objects).

    Raises MissingArtifactError when the file is absent, DataError when a column is missing.
    """
    path = require(paths.artifacts / "ingest" / "samples.parquet", stage)
    check_columns(path, {c: SAMPLES_COLUMNS.get(c, "") for c in columns})
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def read_images(paths: Paths, n_rows: int) -> np.ndarray:
    """``artifacts/ingest/images.npy`` memory-mapped, checked against ``samples.parquet``'s row count."""
    path = require(paths.artifacts / "ingest" / "images.npy", "ingest")
    images = load_npy(path)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != n_rows:
        raise DataError(
            f"{path} has {len(images)} rows but samples.parquet has {n_rows}: rerun the 'ingest' stage"
        )
    return images


def run(params: Params, paths: Paths) -> dict[str, Any]:
    cfg = params.embed
    seconds: dict[str, float] = {}
    t0 = tic = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tic
        now = time.perf_counter()
        seconds[name] = round(now - tic, 4)
        tic = now

    samples = read_samples(paths, ["sample_id", "split", "label"])
    sample_id = samples["sample_id"].astype(np.int64)
    labels = samples["label"].astype(np.int64)
    images = read_images(paths, len(sample_id))
    train_idx = np.flatnonzero(samples["split"] == TRAIN)
    if len(train_idx) < 2:
        raise DataError(f"embed needs at least 2 train rows in samples.parquet; found {len(train_idx)}")
    lap("load")

    embedder = EMBEDDERS.build(
        cfg.backend, cfg.kwargs, random_state=params.seed, device=cfg.device,
        transform_batch_size=cfg.batch_size,
    )
    embedder.fit(images[train_idx], labels[train_idx], n_classes=int(labels.max()) + 1)
    lap("fit")
    emb = embedder.transform(images)
    check_finite(emb, sample_id)
    emb16 = emb.astype(np.float16)
    check_finite(emb16, sample_id, what="embeddings (float16)")
    lap("transform")

    # search the stored float16 values so downstream distances agree with embeddings.npy
    train_sid = sample_id[train_idx]
    k = min(cfg.knn_k, len(train_idx) - 1)
    indices, distances = knn_search(emb16[train_idx].astype(np.float32), k)
    lap("knn")

    out = paths.stage("embed")
    save_npy(out / "embeddings.npy", emb16)
    save_npz(out / "knn.npz", sample_id=train_sid, indices=indices, distances=distances)
    lap("write")
    total = round(time.perf_counter() - t0, 4)
    embed_seconds = seconds["fit"] + seconds["transform"]
    images_per_s = round(len(sample_id) / max(embed_seconds, 1e-9), 1)
    write_json(out / "meta.json", {
        "backend": cfg.backend,
        "kwargs": get_params(embedder),
        "dim": int(emb16.shape[1]),
        "n": int(len(sample_id)),
        "n_train": int(len(train_idx)),
        "device": embedder.device_,
        "dtype": "float16",
        "normalised": "l2",
        "features": embedder.info(),
        "knn": {"k": int(k), "k_requested": int(cfg.knn_k), "metric": "euclidean",
                "index": "faiss.IndexFlatL2 (exact)", "rows": "train"},
        "faiss_version": faiss.__version__,
        "seconds": {**seconds, "total": total},
        "images_per_s": images_per_s,
    })
    return {"dim": int(emb16.shape[1]), "n": int(len(sample_id)), "seconds": total,
            "images_per_s": images_per_s}
