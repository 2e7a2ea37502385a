"""The embed step as one call, its shard workers, and the fitted embedder stored for later batches.

:func:`embed` is what the embed stage runs between reading its inputs and writing its outputs: every
row -> an L2-normalised float16 vector, class-prompt text vectors (backends with a text tower), the
backend's class probabilities (``proxy``), a kNN graph of the train rows and its duplicate groups.
:func:`save_embedder` / :func:`load_embedder` store and rebuild the fitted embedder, and
:func:`embed_new` embeds new images exactly as :func:`embed` embedded the reference rows (drift checks).

Shards, resume and scale-out
----------------------------
The rows are embedded in shards of ``shard_size`` rows. :func:`embed`

1. fingerprints everything the vectors depend on (backend, its resolved hyper-parameters, the
   backend's ``identity()`` such as the checkpoint sha256, the sha256 of ``images.npy`` and
   ``samples.parquet``, N, shard_size, the torch version) -> ``<shard_root>/<fingerprint>/``;
2. fits the embedder on the train rows, or restores the fitted state from
   ``<shard folder>/state.safetensors`` when an earlier (killed) run stored it, and stores it otherwise
   (for ``proxy`` this includes the K fold models and the fold of every train row, so a resumed run
   gives the same class probabilities);
3. calls ``map_shards(compute_shard, specs)`` for the shards whose ``shard_<i>.npy`` does not exist yet;
4. assembles the shard files into the output ``.npy`` through a memory map (temp file + rename) and,
   once everything else is computed, removes the shard folder (``keep_shards`` keeps it).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError

import dataopt.embed.backends  # noqa: F401  (EMBEDDERS: a shard worker process imports only this module)
import dataopt.embed.openclip  # noqa: F401  (EMBEDDERS)
import dataopt.embed.patches  # noqa: F401  (EMBEDDERS)
from dataopt.embed import shards as shardlib
from dataopt.embed.base import Embedder, check_finite
from dataopt.embed.duplicates import duplicate_groups
from dataopt.embed.knn import knn_graph, search_space
from dataopt.errors import DataError
from dataopt.io import file_digest, load_npy, save_npy
from dataopt.registry import EMBEDDERS, get_params
from dataopt.schema import TRAIN

FORMAT_VERSION = 1  # bump when the shard layout or the meaning of a fingerprint part changes
EMBEDDER_FORMAT = 1  # of the file save_embedder writes
MapShards = Callable[[Callable[[dict], dict], Sequence[dict]], Sequence[dict]]


# ---- rows -> stored vectors ----------------------------------------------------------------------
def _float16(x: np.ndarray, sample_ids: Callable[[], np.ndarray]) -> np.ndarray:
    """``x`` (float32, L2-normalised rows) as the stored float16; DataError naming the sample ids
    (``sample_ids()``, read only when needed) of a row that is not finite before or after the cast."""
    x16 = x.astype(np.float16)
    if not (np.isfinite(x).all() and np.isfinite(x16).all()):
        ids = sample_ids()
        check_finite(x, ids)
        check_finite(x16, ids, what="embeddings (float16)")
    return x16


def embed_new(embedder: Embedder, images: np.ndarray, batch_size: Optional[int] = None,
              sample_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Embed new images with a fitted (or :func:`load_embedder`-restored) embedder, as :func:`embed` did.

    Parameters
    ----------
    embedder : fitted
    images : (n, H, W, 3) uint8 (may be memory-mapped), the size the embedder was fitted on
    batch_size : rows embedded per block (bounds memory); default: the embedder's ``transform_batch_size``
    sample_ids : (n,) ids named in an error (default: the row positions)

    Returns
    -------
    (n, d) float16, rows L2-normalised (computed in float32, then cast, as ``embeddings.npy``).
    """
    n = len(images)
    step = max(1, int(batch_size or embedder.transform_batch_size))
    out = np.empty((n, embedder.dim_), np.float16)
    ids = (lambda: np.arange(n)) if sample_ids is None else (lambda: np.asarray(sample_ids))
    for s in range(0, n, step):
        out[s : s + step] = _float16(embedder.transform(images[s : s + step]), lambda: ids()[s : s + step])
    return out


def class_probs_new(embedder: Embedder, images: np.ndarray) -> Optional[np.ndarray]:
    """``(n, C)`` float32 class probabilities of new rows (rows outside the fitted train rows, scored as
    :func:`embed` scored the test rows: the mean of the ``proxy`` fold models), or None when the
    backend gives none."""
    probs = embedder.predict_proba(images)
    if probs is None:
        return None
    probs = np.asarray(probs, np.float32)
    check_finite(probs, np.arange(len(probs)), what="class probabilities of the new rows")
    return probs


# ---- the fitted embedder, stored ---------------------------------------------------------------
def save_embedder(path: Path, embedder: Embedder) -> None:
    """Write the fitted ``embedder`` as one safetensors file, atomically: its ``get_state()`` arrays and,
    in the JSON metadata, what rebuilds it (registered backend name, hyper-parameters, ``identity()``)
    and its state's facts. A backend whose state cannot be stored gets a file with no arrays that
    :func:`load_embedder` refuses; ``open_clip`` stores no arrays (its weights are the checkpoint)."""
    state = embedder.get_state()
    arrays, state_meta = state if state is not None else ({}, None)
    shardlib.save_state(Path(path), arrays, {
        "format": EMBEDDER_FORMAT, "backend": type(embedder).registered_name, "kwargs": get_params(embedder),
        "identity": embedder.identity(), "state": state_meta, "dim": int(embedder.dim_),
        "dtype": "float16", "normalised": "l2", "info": embedder.info(),
    })


def load_embedder(path: Path, device: Optional[str] = None) -> Embedder:
    """The embedder :func:`save_embedder` stored, rebuilt from ``EMBEDDERS`` and restored.

    Parameters
    ----------
    path : an ``embedder.safetensors``
    device : run it here instead of where it was stored (``"auto" | "cpu" | "cuda"``; backends with a
        ``device`` hyper-parameter)

    Raises
    ------
    DataError when the file is not a stored embedder, its backend stored no state, or what the
    backend's ``identity()`` depends on (e.g. the checkpoint) changed since.
    """
    try:
        arrays, meta = shardlib.load_state(Path(path))
    except (OSError, ValueError, SafetensorError) as exc:  # a JSON error in the metadata is a ValueError
        raise DataError(f"{path}: not a readable embedder file ({exc}); rerun the 'embed' stage") from None
    if meta.get("format") != EMBEDDER_FORMAT or "backend" not in meta:
        raise DataError(f"{path}: not an embedder file of this dataopt version; rerun the 'embed' stage")
    if meta["state"] is None:
        raise DataError(f"{path}: the {meta['backend']!r} embedder stores no fitted state; it cannot be "
                        "restored")
    kwargs = dict(meta["kwargs"])
    if device is not None and "device" in kwargs:
        kwargs["device"] = device
    embedder = EMBEDDERS.get(meta["backend"])(**kwargs)
    if embedder.identity() != meta["identity"]:
        raise DataError(f"{path}: the {meta['backend']!r} embedder's inputs changed since it was stored "
                        f"({embedder.identity()} != {meta['identity']}); rerun the 'embed' stage")
    return embedder.set_state(arrays, meta["state"])


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
    save_npy(out, _float16(x, lambda: _sample_ids(spec["samples"])[start:stop]))
    return {**result, "seconds": round(time.perf_counter() - t0, 4), "skipped": False}


def _sample_ids(samples: str) -> np.ndarray:
    return pq.read_table(samples, columns=["sample_id"]).column(0).to_numpy()


def map_local(fn: Callable[[dict], dict], specs: Sequence[dict]) -> list[dict]:
    """The default ``map_shards``: run the shards one after the other in this process."""
    return [fn(s) for s in specs]


# ---- the step ----------------------------------------------------------------------------------
def class_names(labels: np.ndarray, names: np.ndarray) -> list[str]:
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


def _class_probs(embedder: Embedder, images: np.ndarray, train_idx: np.ndarray, sample_id: np.ndarray,
                 labels: np.ndarray) -> tuple[dict[str, np.ndarray], Optional[dict[str, Any]]]:
    """The backend's ``class_probs`` as the arrays of ``proxy_probs.npz`` and its ``meta.json`` entry.

    Empty arrays and None when the backend emits no probabilities, else the entry holds ``folds``,
    ``oof_accuracy`` (argmax of the out-of-fold rows against their given label), ``n_out_of_fold``
    and ``path``.
    """
    extra = embedder.class_probs(images, train_idx)
    if extra is None:
        return {"sample_id": np.zeros(0, np.int64), "probs": np.zeros((0, 0), np.float32),
                "fold": np.zeros(0, np.int64), "out_of_fold": np.zeros(0, bool)}, None
    probs = np.asarray(extra["probs"], dtype=np.float32)
    fold = np.asarray(extra["fold"], dtype=np.int64)
    oof = np.asarray(extra["out_of_fold"], dtype=bool)
    n = len(sample_id)
    if probs.ndim != 2 or len(probs) != n or fold.shape != (n,) or oof.shape != (n,):
        raise DataError(f"embed backend returned class probabilities of shape {probs.shape} "
                        f"(fold {fold.shape}, out_of_fold {oof.shape}) for {n} rows")
    check_finite(probs, sample_id, what="proxy class probabilities")
    hit = probs[oof].argmax(1) == labels[oof]
    return {"sample_id": sample_id, "probs": probs, "fold": fold, "out_of_fold": oof}, {
        "path": "embed/proxy_probs.npz", "folds": int(len(np.unique(fold[fold >= 0]))),
        "oof_accuracy": round(float(hit.mean()), 6) if len(hit) else None,
        "n_out_of_fold": int(oof.sum()),
        "rows": "train: out-of-fold (the fold model that held the row out); test: mean of the fold models"}


@dataclass
class EmbedResult:
    """What :func:`embed` computed over the ``N`` rows (``n_train`` of them train rows).

    Attributes
    ----------
    embedder : the fitted :class:`Embedder` (store it with :func:`save_embedder`)
    embeddings : (N, d) float16 read-only memory map of the assembled output file
    text_embeddings : (n_classes, d) float16; (0, d) when the backend has no text tower
    proxy_probs : ``sample_id, probs, fold, out_of_fold`` (empty arrays when the backend gives none)
    knn : ``sample_id`` (train ids), ``indices`` (n_train, k) positions among them, ``distances``
    duplicates : near- and exact-duplicate groups of the train rows
    meta : backend, kwargs, dims, shards, kNN, timings (``seconds``), throughput
    metrics : flat scalars of the step
    """

    embedder: Embedder
    embeddings: np.ndarray
    text_embeddings: np.ndarray
    proxy_probs: dict[str, np.ndarray]
    knn: dict[str, np.ndarray]
    duplicates: dict[str, Any]
    meta: dict[str, Any]
    metrics: dict[str, Any]


def embed(images: np.ndarray, sample_id: np.ndarray, labels: np.ndarray, label_names: np.ndarray,
          train_idx: np.ndarray, kwargs: dict[str, Any], cfg: Any, seed: int, images_path: Path,
          samples_path: Path, shard_root: Path, out: Path, map_shards: Optional[MapShards] = None
          ) -> EmbedResult:
    """Fit the ``cfg.backend`` embedder on the train rows, embed every row in resumable shards, and
    derive the text vectors, class probabilities, kNN graph and duplicate groups.

    Parameters
    ----------
    images : (N, H, W, 3) uint8 (may be memory-mapped): every row, read from ``images_path``
    sample_id, labels : (N,) int64; label_names : (N,) str (one name per label)
    train_idx : positions of the train rows (at least 2)
    kwargs : the backend's hyper-parameters, project paths already absolute (``resolve_kwargs``)
    cfg : the ``embed`` params section; seed : int
    images_path, samples_path : the files the rows come from (hashed into the fingerprint; the shard
        workers reopen them)
    shard_root : the folder of the shard folders (resume state); out : where the (N, d) float16
        ``.npy`` is assembled (atomically)
    map_shards : how the shards run (module docstring); default :func:`map_local`
    """
    seconds: dict[str, float] = {}
    tic = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tic
        now = time.perf_counter()
        seconds[name] = round(now - tic, 4)
        tic = now

    n = len(sample_id)
    embedder = EMBEDDERS.build(cfg.backend, kwargs, random_state=seed, device=cfg.device,
                               transform_batch_size=cfg.batch_size)
    fp = shardlib.fingerprint({
        "version": FORMAT_VERSION, "backend": cfg.backend, "params": get_params(embedder),
        "identity": embedder.identity(), "images_sha256": file_digest(images_path),
        "samples_sha256": file_digest(samples_path), "n": n, "shard_size": cfg.shard_size,
        "torch": torch.__version__,
    })
    shard_dir = Path(shard_root) / fp
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
    specs = [{**base, "index": i, "start": s, "stop": e, "path": str(shardlib.shard_path(shard_dir, i))}
             for i, (s, e) in enumerate(shardlib.plan(n, cfg.shard_size))]
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

    emb16 = shardlib.assemble([Path(s["path"]) for s in specs], Path(out), n)
    lap("assemble")

    has_text = hasattr(embedder, "encode_classes")
    if has_text:
        text16 = embedder.encode_classes(class_names(labels, label_names)).astype(np.float16)
        check_finite(text16, np.arange(len(text16)), what="text embeddings (rows = class labels)")
    else:  # no text tower: an empty (0, d) table, so the declared output always exists
        text16 = np.zeros((0, emb16.shape[1]), np.float16)
    lap("text")

    proxy_probs, probs_meta = _class_probs(embedder, images, train_idx, sample_id, labels)
    lap("probs")

    train_sid = sample_id[train_idx]
    # search the stored float16 values so downstream distances agree with embeddings.npy
    searched, projection = search_space(np.asarray(emb16[train_idx], dtype=np.float32), cfg.knn_dim, seed)
    indices, distances, knn_info = knn_graph(
        searched, cfg.knn_k, metric="ip",
        exact_max=cfg.knn_exact_max, nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe,
        use_gpu=cfg.knn_device, seed=seed)
    lap("knn")

    duplicates = duplicate_groups(indices, distances, cfg.near_duplicate_threshold, train_sid)
    if not cfg.keep_shards:  # everything is computed: nothing left to resume
        shutil.rmtree(shard_dir, ignore_errors=True)
        if Path(shard_root).is_dir() and not any(Path(shard_root).iterdir()):
            Path(shard_root).rmdir()
    lap("duplicates")

    embed_seconds = (0.0 if fit_reused else seconds["fit"]) + seconds["transform"]
    images_per_s = round(rows_computed / embed_seconds, 1) if rows_computed and embed_seconds > 0 else 0.0
    info = embedder.info()
    meta = {
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
        "knn": {**knn_info, **projection, "distance": "euclidean", "rows": "train"},
        "duplicates": {key: duplicates[key] for key in ("threshold", "n_groups", "n_samples_in_groups")},
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        "seconds": seconds,
        "rows_embedded": int(rows_computed),
        "images_per_s": images_per_s,
    }
    metrics = {"dim": int(emb16.shape[1]), "n": n, "images_per_s": images_per_s,
               "shards": len(specs), "shards_reused": len(specs) - len(pending),
               "knn_seconds": seconds["knn"], "near_duplicate_groups": duplicates["n_groups"],
               "exact_duplicate_groups": duplicates["exact"]["n_groups"]}
    if probs_meta is not None and probs_meta["oof_accuracy"] is not None:
        metrics["proxy_oof_accuracy"] = probs_meta["oof_accuracy"]
    return EmbedResult(embedder=embedder, embeddings=emb16, text_embeddings=text16, proxy_probs=proxy_probs,
                       knn={"sample_id": train_sid, "indices": indices, "distances": distances},
                       duplicates=duplicates, meta=meta, metrics=metrics)
