"""The ``curate`` flow: the seven stages as Prefect tasks, then one MLflow run, then ``dvc commit``.

Run it with ``dataopt run`` (or :func:`run`). It needs no Prefect server: with none configured,
Prefect starts its local ephemeral API for the duration of the run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger

from dataopt.config import Params, load_params
from dataopt.errors import ConfigError
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.stages import ORDER
from tasks.stages import outputs_match, stage_task, track_task


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

    return ThreadPoolTaskRunner()


def dvc_commit(root: Path) -> str:
    """``dvc commit -f dvc.yaml`` so that a later ``dvc repro`` finds nothing to do. Returns a message."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").exists():
        return f"{root} is not a DVC project (no .dvc/ or dvc.yaml): dvc.lock not updated"
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", "dvc.yaml"],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return "dvc commit failed, dvc.lock not updated: " + " | ".join(tail)
    return "dvc.lock updated (dvc commit): `dvc repro` has nothing to do"


@flow(name="curate", log_prints=True)
def curate(
    params_path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    project: str = ".",
    no_cache: bool = False,
) -> dict[str, Any]:
    """Run ingest -> ... -> evaluate, log one MLflow run, record the outputs in dvc.lock.

    Returns ``{"stages": {name: {"status": "ran"|"cached", "seconds": s, "metrics": {...}}},
    "tracking": {...}, "dvc": message}``.
    """
    logger = get_run_logger()
    paths = Paths.at(project)
    params_path = params_path or str(paths.params)
    params = check_methods(load_params(params_path, overrides))
    summary: dict[str, Any] = {"stages": {}}
    for name in ORDER:
        t0 = time.perf_counter()
        fut = stage_task(name, params, paths.root, refresh=no_cache).submit(
            name, params, str(paths.root))
        result = fut.result()  # raises the stage's own exception (e.g. a UserError)
        cached = fut.state.name == "Cached"
        if cached and not outputs_match(name, paths, result):
            logger.info("%s: cached result found but its outputs changed or are missing: rerunning",
                        name)
            fut = stage_task(name, params, paths.root, refresh=True).submit(
                name, params, str(paths.root))
            result = fut.result()
            cached = False
        summary["stages"][name] = {
            "status": "cached" if cached else "ran",
            "seconds": round(time.perf_counter() - t0, 2),
            "metrics": result["metrics"],
        }
        logger.info("%s: %s in %.1f s", name, summary["stages"][name]["status"],
                    summary["stages"][name]["seconds"])
    status = {n: s["status"] for n, s in summary["stages"].items()}
    summary["tracking"] = track_task()(params, paths, "prefect", overrides, status)
    if overrides:
        summary["dvc"] = "--set overrides in use: artifacts differ from params.yaml, dvc.lock not updated"
    elif Path(params_path).resolve() != paths.params:
        summary["dvc"] = f"params from {params_path}, not {paths.params}: dvc.lock not updated"
    else:
        summary["dvc"] = dvc_commit(paths.root)
    logger.info(summary["dvc"])
    return summary


def run(params_path: str | os.PathLike, overrides: Optional[list[str]], project: str | os.PathLike,
        no_cache: bool = False) -> dict[str, Any]:
    """Validate params (fast, before Prefect starts), pick the task runner, run :func:`curate`."""
    params = check_methods(load_params(params_path, overrides))
    return curate.with_options(task_runner=task_runner(params))(
        params_path=str(params_path), overrides=list(overrides or []), project=str(project),
        no_cache=no_cache)
