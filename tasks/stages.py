"""Prefect tasks around ``dataopt.stages.run_stage`` (the same code ``dvc repro`` runs).

Caching: a stage's cache key is the hash of (stage name, the params sections it declares in
``PARAMS``, the sha256 of every file in its ``INPUTS``, the raw source for ``ingest``, and the dataopt
source code). Results are persisted as JSON under ``<project>/.prefect/results`` so that a second
``dataopt run`` in a new process reuses them. The result records the sha256 of each of the stage's
``OUTPUTS``; the flow checks them after a cache hit and reruns the stage when an output was deleted
or changed (:func:`outputs_match`).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import dataopt
from dataopt import stages
from dataopt.config import Params
from dataopt.errors import UserError
from dataopt.io import file_digest, write_json
from dataopt.paths import Paths

_DIGESTS: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def state_dir(root: Path) -> Path:
    """``<project>/.prefect``: Prefect results and the digest cache (git-ignored)."""
    return Path(root) / ".prefect"


def _load_digest_cache(root: Path) -> None:
    f = state_dir(root) / "digests.json"
    if not f.exists():
        return
    try:
        rows = json.loads(f.read_text())
    except ValueError:  # a damaged cache only costs rehashing
        return
    with _LOCK:
        for path, size, mtime, digest in rows:
            _DIGESTS.setdefault((path, size, mtime), digest)


def save_digest_cache(root: Path) -> None:
    """Persist the in-memory digests of files under ``root`` (so a new process need not rehash)."""
    prefix = str(Path(root).resolve()) + os.sep
    with _LOCK:
        rows = [[p, s, m, d] for (p, s, m), d in _DIGESTS.items() if p.startswith(prefix)]
    write_json(state_dir(root) / "digests.json", rows)


def digest(path: Path) -> Optional[str]:
    """sha256 of a file, or of a directory (relative names + file digests), None when missing.

    File digests are cached per (path, size, mtime) so that large artifacts are hashed once.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{digest(f)}\n".encode())
        return "dir:" + h.hexdigest()
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _DIGESTS.get(key)
    if hit is None:
        hit = file_digest(path)
        with _LOCK:
            _DIGESTS[key] = hit
    return hit


def _manifest(path: Path) -> Optional[str]:
    """A cheap fingerprint of a raw source: file sha256, or (name, size, mtime) of a folder's files."""
    if path.is_file():
        return digest(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + h.hexdigest()


_CODE: dict[str, str] = {}


def code_digest() -> str:
    """sha256 over the dataopt package's Python sources (a code change invalidates every stage)."""
    root = Path(dataopt.__file__).parent
    if "v" not in _CODE:
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
        _CODE["v"] = h.hexdigest()
    return _CODE["v"]


def _param_value(params: Params, dotted: str) -> Any:
    node: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def outputs_of(name: str) -> tuple[str, ...]:
    """The stage's OUTPUTS plus its metrics.json, relative to ``artifacts/``."""
    outs = tuple(stages.module(name).OUTPUTS)
    metrics = f"{name}/metrics.json"
    return outs if metrics in outs else outs + (metrics,)


def cache_key(name: str, params: Params, paths: Paths) -> str:
    """The cache key of stage ``name`` for these params and the current input files."""
    mod = stages.module(name)
    doc: dict[str, Any] = {
        "stage": name,
        "params": {p: _param_value(params, p) for p in mod.PARAMS},
        "inputs": {rel: digest(paths.artifacts / rel) for rel in mod.INPUTS},
        "code": code_digest(),
    }
    if name == "ingest":  # the raw source lives outside artifacts/
        for field in ("path", "eval_path"):
            p = paths.resolve(getattr(params.ingest, field))
            doc[f"source.{field}"] = _manifest(p) if p else None
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return f"{name}-{hashlib.sha256(blob).hexdigest()}"


def output_digests(name: str, paths: Paths) -> dict[str, Optional[str]]:
    return {rel: digest(paths.artifacts / rel) for rel in outputs_of(name)}


def outputs_match(name: str, paths: Paths, result: dict[str, Any]) -> bool:
    """True when every output recorded in a (cached) result still exists with the same content."""
    recorded = result.get("outputs") or {}
    if set(recorded) != set(outputs_of(name)):
        return False
    current = output_digests(name, paths)
    return all(v is not None and current[k] == v for k, v in recorded.items())


def map_shards_threads(fn: Callable, specs: list[dict]) -> list:
    """Run the embed shards as Prefect tasks (visible task runs, retried) on a thread pool."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    shard = task(fn, name="embed-shard", task_run_name="embed-shard-{spec[index]}",
                 cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=1.0,
                 retry_condition_fn=is_transient)
    return [f.result() for f in shard.map(specs)]


def map_shards_dask(fn: Callable, specs: list[dict]) -> list:
    """Spread the embed shards over every worker of the flow's Dask cluster.

    The stage itself runs as a task on one worker of the flow's DaskTaskRunner cluster; Prefect tasks
    submitted from inside a task stay on that worker, so the shards go to the whole cluster through
    Dask's ``worker_client``, which also secedes the waiting stage task from its worker's thread pool
    so that its slot computes shards too. ``compute_shard`` skips a shard whose file already exists,
    so a retried shard is safe.
    """
    from distributed import worker_client

    with worker_client() as client:
        return client.gather(client.map(fn, specs, pure=False))


def hooks_for(name: str, params: Params) -> dict[str, Any]:
    """Orchestration hooks a stage accepts: embed runs its shards through the task runner."""
    if name != "embed":
        return {}
    dask = params.orchestration.task_runner == "dask"
    return {"map_shards": map_shards_dask if dask else map_shards_threads}


def execute(name: str, params: Params, project: str) -> dict[str, Any]:
    """Run one stage; return its metrics and the digests of its outputs (the cached result)."""
    paths = Paths.at(project)
    _load_digest_cache(paths.root)
    metrics = stages.run_stage(name, params, paths, **hooks_for(name, params))
    result = {"metrics": metrics, "outputs": output_digests(name, paths)}
    save_digest_cache(paths.root)
    return result


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry everything except a :class:`UserError` (bad params,
    missing artifact, unusable data), which would fail the same way again."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except BaseException as err:  # noqa: BLE001 - reading the state may itself raise it
            exc = err
    return not isinstance(exc, UserError)


def stage_task(name: str, params: Params, project: Path, refresh: bool = False) -> Callable:
    """The Prefect task for stage ``name`` (retries and caching from ``params.orchestration``)."""
    from prefect import task

    orch = params.orchestration
    paths = Paths.at(project)
    _load_digest_cache(paths.root)

    def key_fn(context: Any, arguments: dict[str, Any]) -> str:
        return cache_key(name, arguments["params"], Paths.at(arguments["project"]))

    return task(
        execute,
        name=name,
        task_run_name=name,
        cache_key_fn=key_fn,
        persist_result=True,
        result_storage=state_dir(paths.root) / "results",  # a Path: local storage, no saved block
        result_serializer="json",
        refresh_cache=refresh or not orch.cache,
        retries=orch.retries,
        retry_delay_seconds=orch.retry_delay_seconds,
        retry_condition_fn=is_transient,
    )


def track_task() -> Callable:
    """The Prefect task that logs the run to MLflow (never cached: one run per execution)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from tasks.tracking import log_run

    return task(log_run, name="track", task_run_name="track", cache_policy=NO_CACHE,
                persist_result=False, retries=1, retry_delay_seconds=1.0,
                retry_condition_fn=is_transient)
