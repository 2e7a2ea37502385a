"""EMBED stage: every sample's image -> an L2-normalised float16 embedding, class-prompt text embeddings
(backends with a text tower), a kNN graph of the train rows, and the fitted embedder.

Writes ``artifacts/embed/``: ``embeddings.npy`` (float16 ``(N, d)``, row i = row i of
``samples.parquet``, both splits), ``text_embeddings.npy`` (float16 ``(n_classes, d)``, row c = class
label c, for backends with ``encode_classes`` such as ``open_clip``; ``(0, d)`` otherwise, so that no
stale file survives a backend change), ``knn.npz`` (``sample_id``: train ids in samples order;
``indices``: ``(n_train, k)`` positions into that array, self excluded; ``distances``: float32
Euclidean, ascending), ``proxy_probs.npz`` (only for backends whose ``class_probs`` returns
probabilities, such as ``proxy`` with ``folds`` >= 2; empty arrays otherwise: ``sample_id`` ``(N,)`` in samples
order, ``probs`` float32 ``(N, C)``, ``fold`` int64 ``(N,)`` (-1 for test rows), ``out_of_fold`` bool
``(N,)``: train rows are scored only by the fold model that held them out, test rows by the mean of the
fold models), ``duplicates.json``, ``embedder.safetensors`` (the fitted embedder and what rebuilds it:
:func:`dataopt.embed.run.load_embedder`, so that a later batch is embedded as these rows were) and
``meta.json`` (backend, kwargs, model, checkpoint hash, dims, device, precision, shards, timings,
throughput, ``proxy_probs``: folds, out-of-fold accuracy of the train rows, path).

The work, its resumable shards under ``artifacts/embed/shards/`` and the ``map_shards`` hook through
which an orchestrator runs them are :func:`dataopt.embed.run.embed`'s (see its module docstring).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from dataopt import artifacts as art
from dataopt.artifacts import read_images, read_samples
from dataopt.config import Params
from dataopt.embed.run import MapShards, embed, save_embedder
from dataopt.errors import DataError
from dataopt.paths import Paths
from dataopt.stages import machine_defaults
from dataopt.registry import EMBEDDERS
from dataopt.schema import TRAIN


def run(params: Params, paths: Paths, map_shards: Optional[MapShards] = None) -> dict[str, Any]:
    """Run the embed stage; ``map_shards`` runs the shard work (see :mod:`dataopt.embed.run`)."""
    params, _ = machine_defaults(params, paths)  # a direct call (run_stage has filled them)
    cfg = params.embed
    t0 = time.perf_counter()
    samples = read_samples(paths, ["sample_id", "split", "label", "label_name"])
    sample_id = samples["sample_id"].astype(np.int64)
    images = read_images(paths, len(sample_id))
    train_idx = np.flatnonzero(samples["split"] == TRAIN)
    if len(train_idx) < 2:
        raise DataError(f"embed needs at least 2 train rows in samples.parquet; found {len(train_idx)}")
    kwargs = EMBEDDERS.get(cfg.backend).resolve_kwargs(cfg.backend_kwargs(), paths.resolve)
    load_seconds = round(time.perf_counter() - t0, 4)

    res = embed(images, sample_id, samples["label"].astype(np.int64), samples["label_name"], train_idx,
                kwargs, cfg, params.seed, images_path=art.locate(paths, "ingest/images.npy"),
                samples_path=art.locate(paths, "ingest/samples.parquet"),
                shard_root=art.scratch(paths, "embed/shards"),
                out=art.locate(paths, "embed/embeddings.npy", "w"), map_shards=map_shards)

    tic = time.perf_counter()
    art.save_npy(paths, "embed/text_embeddings.npy", res.text_embeddings)
    art.save_npz(paths, "embed/proxy_probs.npz", **res.proxy_probs)
    art.save_npz(paths, "embed/knn.npz", **res.knn)
    art.write_json(paths, "embed/duplicates.json", res.duplicates)
    save_embedder(art.locate(paths, "embed/embedder.safetensors", "w"), res.embedder)
    now = time.perf_counter()
    total = round(now - t0, 4)
    res.meta["seconds"] = {"load": load_seconds, **res.meta["seconds"], "write": round(now - tic, 4),
                           "total": total}
    art.write_json(paths, "embed/meta.json", res.meta)
    return {**res.metrics, "seconds": total}
