"""Prefect tasks around ``dataopt.stages.run_stage`` (the same code ``dvc repro`` runs).

The tasks never cache: DVC decides which stages are stale (:mod:`tasks.versioning`) and the flow
submits only those.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from dataopt import stages
from dataopt.config import Params
from dataopt.errors import UserError
from dataopt.paths import Paths
from tasks.tracking import log_run


class _ReservedParentThread(logging.Filter):
    """Prefect warns when a task submits children while every worker thread is busy, in case the parent
    blocks on them with none free. The flow's runner reserves a thread for the one parent there is (the
    embed task; ``orchestration.threads`` + 1 workers), so the children only queue: not a deadlock."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from within another task" not in record.getMessage()


logging.getLogger("prefect.task_runner.threadpool").addFilter(_ReservedParentThread())


def map_shards_threads(fn: Callable, specs: list[dict]) -> list:
    """Run the embed shards as Prefect tasks (visible task runs, retried) on a thread pool."""
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
    from distributed import worker_client  # the optional [dask] extra

    with worker_client() as client:
        return client.gather(client.map(fn, specs, pure=False))


def hooks_for(name: str, params: Params) -> dict[str, Any]:
    """Orchestration hooks a stage accepts: embed runs its shards through the task runner."""
    if name != "embed":
        return {}
    dask = params.orchestration.task_runner == "dask"
    return {"map_shards": map_shards_dask if dask else map_shards_threads}


def execute(name: str, params: Params, project: str) -> dict[str, Any]:
    """Run one stage; return its metrics."""
    return stages.run_stage(name, params, Paths.at(project), **hooks_for(name, params))


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


def stage_task(name: str, params: Params) -> Callable:
    """The Prefect task for stage ``name`` (retries from ``params.orchestration``; never cached)."""
    orch = params.orchestration
    return task(
        execute,
        name=name,
        task_run_name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=orch.retries,
        retry_delay_seconds=orch.retry_delay_seconds,
        retry_condition_fn=is_transient,
    )


def track_task() -> Callable:
    """The Prefect task that logs the run to MLflow (never cached: one run per execution)."""
    return task(log_run, name="track", task_run_name="track", cache_policy=NO_CACHE,
                persist_result=False, retries=1, retry_delay_seconds=1.0,
                retry_condition_fn=is_transient)
