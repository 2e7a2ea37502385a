"""EMBED stage: every sample's image -> an L2-normalised float16 embedding, class-prompt text embeddings
(backends with a text tower), and a kNN graph of the train rows.

Writes ``artifacts/embed/``: ``embeddings.npy`` (float16 ``(N, d)``, row i = row i of
``samples.parquet``, both splits), ``text_embeddings.npy`` (float16 ``(n_classes, d)``, row c = class
label c, for backends with ``encode_classes`` such as ``open_clip``; ``(0, d)`` otherwise, so that no
stale file survives a backend change), ``knn.npz`` (``sample_id``: train ids in samples order;
``indices``: ``(n_train, k)`` positions into that array, self excluded; ``distances``: float32
Euclidean, ascending), ``proxy_probs.npz`` (only for backends whose ``class_probs`` returns
probabilities, such as ``proxy`` with ``folds`` >= 2; empty arrays otherwise: ``sample_id`` ``(N,)`` in samples
order, ``probs`` float32 ``(N, C)``, ``fold`` int64 ``(N,)`` (-1 for test rows), ``out_of_fold`` bool
``(N,)``: train rows are scored only by the fold model that held them out, test rows by the mean of the
fold models) and ``meta.json`` (backend, kwargs, model, checkpoint hash, dims, device, precision, shards,
timings, throughput, ``proxy_probs``: folds, out-of-fold accuracy of the train rows, path).

Shards, resume and scale-out
----------------------------
The rows are embedded in shards of ``embed.shard_size`` rows. The stage

1. fingerprints everything the vectors depend on (backend, its resolved hyper-parameters, the
   backend's ``identity()`` such as the checkpoint sha256, the sha256 of ``images.npy`` and
   ``samples.parquet``, N, shard_size, the torch version) -> ``artifacts/embed/shards/<fingerprint>/``;
2. fits the embedder on the train rows, or restores the fitted state from
   ``<shard folder>/state.safetensors`` when an earlier (killed) run stored it, and stores it otherwise
   (for ``proxy`` this includes the K fold models and the fold of every train row, so a resumed run
   writes the same ``proxy_probs.npz``);
3. calls ``map_shards(compute_shard, specs)`` for the shards whose ``shard_<i>.npy`` does not exist yet;
4. assembles the shard files into ``embeddings.npy`` through a memory map (temp file + rename) and
   removes the shard folder (``embed.keep_shards: true`` keeps it).

``map_shards`` contract (what an orchestrator such as a Prefect task runner or a Dask client
provides): a callable ``map_shards(fn, specs) -> list`` that calls ``fn(spec)`` once for every spec, in
any order, anywhere, and returns when all have finished (raising if one raised). ``fn`` is
:func:`compute_shard`, a top-level (picklable) function; a spec is a plain JSON-able dict holding
absolute file paths, the backend name and its hyper-parameters, so a worker needs only this package
and a file system shared with the driver. A worker memory-maps ``images.npy``, restores the fitted
state from the shard folder (cached per process), embeds its rows and writes its shard atomically;
a shard file that already exists is skipped, so retries are idempotent. The default is local and
sequential (:func:`map_local`).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt import artifacts as art
from dataopt.artifacts import read_images, read_samples
from dataopt.config import Params
from dataopt.embed import shards as shardlib
from dataopt.embed.base import Embedder, check_finite
from dataopt.embed.duplicates import duplicate_groups
from dataopt.embed.knn import knn_graph
from dataopt.errors import DataError
from dataopt.io import file_digest, load_npy, save_npy
from dataopt.paths import Paths
from dataopt.registry import EMBEDDERS, get_params
from dataopt.schema import TRAIN

FORMAT_VERSION = 1  # bump when the shard layout or the meaning of a fingerprint part changes
MapShards = Callable[[Callable[[dict], dict], Sequence[dict]], Sequence[dict]]


# ---- shard workers -----------------------------------------------------------------------------
_CACHE: dict[str, Embedder] = {}  # fingerprint -> fitted embedder, one per process (a model may be large)
_CACHE_LOCK = threading.Lock()


def _remember(fp: str, embedder: Embedder) -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _CACHE[fp] = embedder


def forget() -> None:
    """Drop this process's cached fitted embedder (frees a loaded model)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _fitted(spec: dict) -> Embedder:
    """The fitted embedder of ``spec``: this process's cache, else the stored state, else a re-fit."""
    with _CACHE_LOCK:  # threads of one worker share one model instead of loading it concurrently
        emb = _CACHE.get(spec["fingerprint"])
        if emb is not None:
            return emb
        emb = EMBEDDERS.get(spec["backend"])(**spec["params"])
        state = Path(spec["shard_dir"]) / shardlib.STATE_FILE
        if state.exists():
            emb.set_state(*shardlib.load_state(state))
        else:  # a backend without storable state: re-fit, deterministic for the same inputs
            table = pq.read_table(spec["samples"], columns=["split", "label"])
            split = table.column("split").to_numpy(zero_copy_only=False)
            labels = table.column("label").to_numpy().astype(np.int64)
            train = np.flatnonzero(split == TRAIN)
            emb.fit(load_npy(spec["images"])[train], labels[train], n_classes=int(labels.max()) + 1)
        _CACHE.clear()
        _CACHE[spec["fingerprint"]] = emb
        return emb


def compute_shard(spec: dict) -> dict[str, Any]:
    """Embed rows ``[spec["start"], spec["stop"])`` and write ``spec["path"]`` (float16) atomically.

    Parameters
    ----------
    spec : dict
        ``index, start, stop, path`` (the shard), ``images, samples, shard_dir`` (absolute paths),
        ``backend, params`` (the embedder), ``fingerprint``.

    Returns
    -------
    dict with ``index``, ``rows``, ``seconds``, ``skipped`` (the file already existed) and
    ``worker`` (``host:pid`` of the process that ran it).

    Raises
    ------
    DataError naming the sample ids when a vector is NaN or infinite (nothing is written).
    """
    t0 = time.perf_counter()
    out = Path(spec["path"])
    start, stop = int(spec["start"]), int(spec["stop"])
    result = {"index": int(spec["index"]), "rows": stop - start,
              "worker": f"{socket.gethostname()}:{os.getpid()}"}
    if out.exists():
        return {**result, "seconds": 0.0, "skipped": True}
    emb = _fitted(spec)
    x = emb.transform(load_npy(spec["images"])[start:stop])
    x16 = x.astype(np.float16)
    if not (np.isfinite(x).all() and np.isfinite(x16).all()):
        ids = pq.read_table(spec["samples"], columns=["sample_id"]).column(0).to_numpy()[start:stop]
        check_finite(x, ids)
        check_finite(x16, ids, what="embeddings (float16)")
    save_npy(out, x16)
    return {**result, "seconds": round(time.perf_counter() - t0, 4), "skipped": False}


def map_local(fn: Callable[[dict], dict], specs: Sequence[dict]) -> list[dict]:
    """The default ``map_shards``: run the shards one after the other in this process."""
    return [fn(s) for s in specs]


# ---- the stage ---------------------------------------------------------------------------------
def _class_names(labels: np.ndarray, names: np.ndarray) -> list[str]:
    """``names[c]`` for every class label ``c`` in ``0..max(labels)`` (one name per label)."""
    n_classes = int(labels.max()) + 1
    out: list[Optional[str]] = [None] * n_classes
    for c in range(n_classes):  # a loop over classes, not samples
        found = {v for v in names[labels == c] if v is not None}
        if len(found) > 1:
            raise DataError(f"samples.parquet: label {c} has several label_name values {sorted(found)[:5]}")
        out[c] = found.pop() if found else None
    missing = [c for c, v in enumerate(out) if v is None]
    if missing:
        raise DataError(f"samples.parquet: no label_name for class label(s) {missing[:10]}; text embeddings "
                        f"need a name per class 0..{n_classes - 1}")
    return [str(v) for v in out]


def _write_class_probs(embedder: Embedder, images: np.ndarray, train_idx: np.ndarray, sample_id: np.ndarray,
                       labels: np.ndarray, paths: Paths) -> Optional[dict[str, Any]]:
    """Write the backend's ``class_probs`` to ``embed/proxy_probs.npz``; the ``meta.json`` entry.

    Returns None when the backend emits no probabilities (the file then holds empty arrays, so that
    every declared output exists), else ``folds``, ``oof_accuracy`` (argmax of the out-of-fold rows
    against their given label), ``n_out_of_fold`` and ``path``.
    """
    extra = embedder.class_probs(images, train_idx)
    if extra is None:
        art.save_npz(paths, "embed/proxy_probs.npz", sample_id=np.zeros(0, np.int64),
                     probs=np.zeros((0, 0), np.float32), fold=np.zeros(0, np.int64),
                     out_of_fold=np.zeros(0, bool))
        return None
    probs = np.asarray(extra["probs"], dtype=np.float32)
    fold = np.asarray(extra["fold"], dtype=np.int64)
    oof = np.asarray(extra["out_of_fold"], dtype=bool)
    n = len(sample_id)
    if probs.ndim != 2 or len(probs) != n or fold.shape != (n,) or oof.shape != (n,):
        raise DataError(f"embed backend returned class probabilities of shape {probs.shape} "
                        f"(fold {fold.shape}, out_of_fold {oof.shape}) for {n} rows")
    check_finite(probs, sample_id, what="proxy class probabilities")
    art.save_npz(paths, "embed/proxy_probs.npz", sample_id=sample_id, probs=probs, fold=fold,
                 out_of_fold=oof)
    hit = probs[oof].argmax(1) == labels[oof]
    return {"path": "embed/proxy_probs.npz", "folds": int(len(np.unique(fold[fold >= 0]))),
            "oof_accuracy": round(float(hit.mean()), 6) if len(hit) else None,
            "n_out_of_fold": int(oof.sum()),
            "rows": "train: out-of-fold (the fold model that held the row out); test: mean of the fold models"}


def run(params: Params, paths: Paths, map_shards: Optional[MapShards] = None) -> dict[str, Any]:
    """Run the embed stage; ``map_shards`` runs the shard work (see the module docstring)."""
    cfg = params.embed
    seconds: dict[str, float] = {}
    t0 = tic = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tic
        now = time.perf_counter()
        seconds[name] = round(now - tic, 4)
        tic = now

    samples = read_samples(paths, ["sample_id", "split", "label", "label_name"])
    sample_id = samples["sample_id"].astype(np.int64)
    labels = samples["label"].astype(np.int64)
    images = read_images(paths, len(sample_id))
    train_idx = np.flatnonzero(samples["split"] == TRAIN)
    if len(train_idx) < 2:
        raise DataError(f"embed needs at least 2 train rows in samples.parquet; found {len(train_idx)}")
    n = len(sample_id)
    lap("load")

    kwargs = EMBEDDERS.get(cfg.backend).resolve_kwargs(cfg.backend_kwargs(), paths.resolve)
    embedder = EMBEDDERS.build(
        cfg.backend, kwargs, random_state=params.seed, device=cfg.device,
        transform_batch_size=cfg.batch_size,
    )
    images_path = art.locate(paths, "ingest/images.npy")
    samples_path = art.locate(paths, "ingest/samples.parquet")
    fp = shardlib.fingerprint({
        "version": FORMAT_VERSION, "backend": cfg.backend, "params": get_params(embedder),
        "identity": embedder.identity(), "images_sha256": file_digest(images_path),
        "samples_sha256": file_digest(samples_path), "n": n, "shard_size": cfg.shard_size,
        "torch": torch.__version__,
    })
    shard_root = art.scratch(paths, "embed/shards")
    shard_dir = shard_root / fp
    state_file = shard_dir / shardlib.STATE_FILE
    lap("fingerprint")

    fit_reused = state_file.exists()
    if fit_reused:
        embedder.set_state(*shardlib.load_state(state_file))
    else:
        embedder.fit(images[train_idx], labels[train_idx], n_classes=int(labels.max()) + 1)
        state = embedder.get_state()
        if state is not None:
            shardlib.save_state(state_file, *state)
    _remember(fp, embedder)
    lap("fit")

    base = {"fingerprint": fp, "backend": cfg.backend, "params": get_params(embedder),
            "images": str(images_path), "samples": str(samples_path), "shard_dir": str(shard_dir)}
    ranges = shardlib.plan(n, cfg.shard_size)
    specs = [{**base, "index": i, "start": s, "stop": e, "path": str(shardlib.shard_path(shard_dir, i))}
             for i, (s, e) in enumerate(ranges)]
    pending = [s for s in specs if not Path(s["path"]).exists()]
    shard_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = list((map_shards or map_local)(compute_shard, pending))
    finally:
        forget()
    missing = [s["path"] for s in specs if not Path(s["path"]).exists()]
    if missing:
        raise DataError(f"map_shards returned but {len(missing)} shard file(s) are missing, e.g. {missing[0]}")
    rows_computed = sum(r["rows"] for r in results if not r.get("skipped"))
    lap("transform")

    emb16 = shardlib.assemble([Path(s["path"]) for s in specs], art.locate(paths, "embed/embeddings.npy", "w"), n)
    lap("assemble")

    has_text = hasattr(embedder, "encode_classes")
    if has_text:
        text16 = embedder.encode_classes(_class_names(labels, samples["label_name"])).astype(np.float16)
        check_finite(text16, np.arange(len(text16)), what="text embeddings (rows = class labels)")
    else:  # no text tower: an empty (0, d) table, so the declared output always exists
        text16 = np.zeros((0, emb16.shape[1]), np.float16)
    art.save_npy(paths, "embed/text_embeddings.npy", text16)
    lap("text")

    probs_meta = _write_class_probs(embedder, images, train_idx, sample_id, labels, paths)
    lap("probs")

    train_sid = sample_id[train_idx]
    # search the stored float16 values so downstream distances agree with embeddings.npy
    indices, distances, knn_info = knn_graph(
        np.asarray(emb16[train_idx], dtype=np.float32), cfg.knn_k, metric="ip",
        exact_max=cfg.knn_exact_max, nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe,
        use_gpu=cfg.knn_device, seed=params.seed)
    lap("knn")

    art.save_npz(paths, "embed/knn.npz", sample_id=train_sid, indices=indices, distances=distances)
    duplicates = duplicate_groups(indices, distances, cfg.near_duplicate_threshold, train_sid)
    art.write_json(paths, "embed/duplicates.json", duplicates)
    if not cfg.keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if shard_root.is_dir() and not any(shard_root.iterdir()):
            shard_root.rmdir()
    lap("write")
    total = round(time.perf_counter() - t0, 4)
    embed_seconds = (0.0 if fit_reused else seconds["fit"]) + seconds["transform"]
    images_per_s = round(rows_computed / embed_seconds, 1) if rows_computed and embed_seconds > 0 else 0.0
    info = embedder.info()
    art.write_json(paths, "embed/meta.json", {
        "backend": cfg.backend,
        "kwargs": get_params(embedder),
        "model": info.get("model"),
        "pretrained": info.get("pretrained"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "precision": info.get("precision", "fp32"),
        "dim": int(emb16.shape[1]),
        "n": n,
        "n_train": int(len(train_idx)),
        "device": embedder.device_,
        "dtype": "float16",
        "normalised": "l2",
        "features": info,
        "text_embeddings": bool(has_text),
        "proxy_probs": probs_meta,
        "n_classes": int(labels.max()) + 1,
        "shards": {"fingerprint": fp, "size": int(cfg.shard_size), "n": len(specs),
                   "reused": len(specs) - len(pending), "computed": len(pending),
                   "kept": bool(cfg.keep_shards), "fit_reused": bool(fit_reused),
                   "workers": sorted({r["worker"] for r in results if not r.get("skipped")})},
        "knn": {**knn_info, "distance": "euclidean", "rows": "train"},
        "duplicates": {key: duplicates[key] for key in ("threshold", "n_groups", "n_samples_in_groups")},
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        "seconds": {**seconds, "total": total},
        "rows_embedded": int(rows_computed),
        "images_per_s": images_per_s,
    })
    metrics = {"dim": int(emb16.shape[1]), "n": n, "seconds": total, "images_per_s": images_per_s,
               "shards": len(specs), "shards_reused": len(specs) - len(pending),
               "knn_seconds": seconds["knn"], "near_duplicate_groups": duplicates["n_groups"],
               "exact_duplicate_groups": duplicates["exact"]["n_groups"]}
    if probs_meta is not None and probs_meta["oof_accuracy"] is not None:
        metrics["proxy_oof_accuracy"] = probs_meta["oof_accuracy"]
    return metrics
