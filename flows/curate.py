"""The ``curate`` flow: the seven stages as Prefect tasks, then one MLflow run (a nested run per stage).

Run it with ``dataopt run`` (or :func:`run`). It needs no Prefect server: with none configured,
Prefect starts its local ephemeral API for the duration of the run.

DVC is the one cache (:class:`tasks.versioning.StagePlan`): a stage runs when ``dvc status`` says it
is stale (or ``--no-cache``, or its params differ from the project's params.yaml), and each stage that
ran with the project's params is recorded in ``dvc.lock`` at once, so a killed run keeps what it
finished and ``dvc repro`` afterwards has nothing to do.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

from prefect import flow, get_run_logger, tags

from dataopt.artifacts import ORDER, SIDE_STAGES
from dataopt.config import Params, load_params
from dataopt.errors import ConfigError
from dataopt.io import read_json
from dataopt.paths import Paths
from tasks import prefect_server
from tasks.stages import stage_task, track_task
from tasks.versioning import StageCache, StagePlan
from dataopt.plugins import check_methods


def task_runner(params: Params) -> Any:
    """``orchestration.task_runner``: a thread pool, or a Dask cluster at ``dask_address``."""
    orch = params.orchestration
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError(
                "orchestration.task_runner is 'dask' but prefect-dask is not installed: "
                "pip install 'dataopt[dask]'"
            ) from None
        return DaskTaskRunner(address=orch.dask_address) if orch.dask_address else DaskTaskRunner()
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=orch.threads + 1)  # + the stage task waiting on its shards


@flow(name="curate", log_prints=True)
def curate(
    params_path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    project: str = ".",
    no_cache: bool = False,
    parent_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Run the stale stages of ingest -> ... -> evaluate, log one MLflow run, keep dvc.lock current.

    Returns ``{"stages": {name: {"status": "ran"|"cached", "why": reason (:class:`StagePlan`),
    "seconds": s, "started_at": t, "ended_at": t, "metrics": {...}}}, "side": {name: "ran"|"cached"|
    "skipped"}, "tracking": {...}, "dvc": message}``; MLflow gets one pipeline run with one nested run
    per stage (:func:`tasks.tracking.log_run`).
    """
    t_start = time.time()
    logger = get_run_logger()
    crashed = prefect_server.crash_dead_runs()
    if crashed:
        logger.info("marked Crashed the flow runs whose process died: %s", ", ".join(crashed))
    paths = Paths.at(project)
    params = check_methods(load_params(params_path or paths.params, overrides))
    project_params = load_params(paths.params) if paths.params.exists() else None
    cache, note = StageCache.open(paths.root)
    force = "--no-cache" if no_cache else None if params.orchestration.cache else "orchestration.cache: false"
    plan = StagePlan(cache, params, project_params, force)
    runs: dict[str, dict[str, Any]] = {}  # every stage's record, the chain's and those beside it
    try:
        # the stages beside the chain (drift) are brought up to date too, when DVC says they are stale,
        # so that `dvc status` is clean after a `dataopt run` as after a `dvc repro`
        for name in ORDER + SIDE_STAGES:
            started = time.time()
            decision = plan.decide(name, beside=name in SIDE_STAGES)
            metrics: dict[str, Any] = {}
            if decision.run:
                logger.info("%s: running (%s)", name, decision.reason)
                metrics = stage_task(name, params).submit(name, params, str(paths.root)).result()
                plan.ran(name)
            elif decision.status == "cached":
                metrics = read_json(paths.artifacts / name / "metrics.json")
            ended = time.time()
            runs[name] = {"status": "ran" if decision.run else decision.status, "why": decision.reason,
                          "seconds": round(ended - started, 2), "metrics": metrics, "started_at": started,
                          "ended_at": ended}
            if name in ORDER:
                logger.info("%s: %s in %.1f s", name, runs[name]["status"], runs[name]["seconds"])
        summary: dict[str, Any] = {"stages": {n: runs[n] for n in ORDER},
                                   "side": {n: runs[n]["status"] for n in SIDE_STAGES}}
        summary["tracking"] = track_task()(params, paths, "prefect", overrides, runs, started_at=t_start,
                                           parent_run_id=parent_run_id)
        if cache is None:
            summary["dvc"] = note
        elif plan.tainted:
            summary["dvc"] = ("params differ from params.yaml (--set or --params): the stages that used "
                              "them are not recorded in dvc.lock")
        else:
            cache.commit("track")
            summary["dvc"] = "dvc.lock up to date: `dvc repro` has nothing to do"
    finally:
        if cache is not None:
            cache.close()
    logger.info(summary["dvc"])
    summary["seconds"] = round(time.time() - t_start, 2)
    return summary


def run(params_path: str | os.PathLike, overrides: Optional[list[str]], project: str | os.PathLike,
        no_cache: bool = False) -> dict[str, Any]:
    """Validate params (fast, before Prefect starts), pick the task runner, run :func:`curate`."""
    params = check_methods(load_params(params_path, overrides))
    prefect_server.install()  # a temporary Prefect API started for this run dies with it
    with tags(prefect_server.process_tag()):  # so that a later run can tell this one died
        return curate.with_options(task_runner=task_runner(params))(
            params_path=str(params_path), overrides=list(overrides or []), project=str(project),
            no_cache=no_cache)
