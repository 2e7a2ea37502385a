"""The ``curate`` flow: the seven stages as Prefect tasks, then one MLflow run.

Run it with ``dataopt run`` (or :func:`run`). It needs no Prefect server: with none configured,
Prefect starts its local ephemeral API for the duration of the run.

DVC is the one cache (:mod:`tasks.versioning`): a stage runs when ``dvc status`` says it is stale (or
``--no-cache``, or its params differ from the project's params.yaml), and each stage that ran with the
project's params is recorded in ``dvc.lock`` at once, so a killed run keeps what it finished and
``dvc repro`` afterwards has nothing to do.
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
from tasks.versioning import StageCache, differs
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

    Returns ``{"stages": {name: {"status": "ran"|"cached", "seconds": s, "metrics": {...},
    "why": reason}}, "tracking": {...}, "dvc": message}``.
    """
    t_start = time.time()
    logger = get_run_logger()
    crashed = prefect_server.crash_dead_runs()
    if crashed:
        logger.info("marked Crashed the flow runs whose process died: %s", ", ".join(crashed))
    paths = Paths.at(project)
    params = check_methods(load_params(params_path or paths.params, overrides))
    project_params = load_params(paths.params) if paths.params.exists() else None
    summary: dict[str, Any] = {"stages": {}}
    cache, note = StageCache.open(paths.root)
    tainted = False  # a stage ran with params that are not the project's: nothing after it is committed
    try:
        for name in ORDER:
            t0 = time.perf_counter()
            own = differs(name, params, project_params)
            tainted = tainted or own
            if no_cache or not params.orchestration.cache:
                why: Optional[str] = "--no-cache" if no_cache else "orchestration.cache: false"
            elif own:
                why = "params differ from params.yaml"
            elif cache is None:
                why = "no DVC project"
            else:
                why = cache.stale(name)
            if why is None:
                metrics = read_json(paths.artifacts / name / "metrics.json")
            else:
                logger.info("%s: running (%s)", name, why)
                metrics = stage_task(name, params).submit(name, params, str(paths.root)).result()
                if cache is not None and not tainted:
                    cache.commit(name)
            summary["stages"][name] = {"status": "ran" if why else "cached", "why": why,
                                       "seconds": round(time.perf_counter() - t0, 2), "metrics": metrics}
            logger.info("%s: %s in %.1f s", name, summary["stages"][name]["status"],
                        summary["stages"][name]["seconds"])
        # the stages beside the chain (drift) are brought up to date too, when DVC says they are stale,
        # so that `dvc status` is clean after a `dataopt run` as after a `dvc repro`
        summary["side"] = {}
        for name in SIDE_STAGES:
            why = None if cache is None or tainted else cache.stale(name)
            if why is not None:
                logger.info("%s: running (%s)", name, why)
                stage_task(name, params).submit(name, params, str(paths.root)).result()
                cache.commit(name)
            summary["side"][name] = "ran" if why is not None else "skipped" if cache is None or tainted \
                else "cached"
        status = {n: s["status"] for n, s in summary["stages"].items()}
        summary["tracking"] = track_task()(params, paths, "prefect", overrides, status, started_at=t_start,
                                           parent_run_id=parent_run_id)
        if cache is None:
            summary["dvc"] = note
        elif tainted:
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
