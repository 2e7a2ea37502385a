"""A drift check as users run it (``dataopt drift``): bring the reference up to date, check the batch,
record it. DVC decides what is stale, as in the ``curate`` flow (:class:`tasks.versioning.StagePlan`):
``ingest`` and ``embed`` (what the reference is made of) run only when ``dvc status`` says so, then the
``drift`` stage; each stage that ran with the project's params is committed to ``dvc.lock``, so
``dvc status`` stays clean. One MLflow run per check, tagged with the batch
(:func:`tasks.tracking.log_drift`).
"""
from __future__ import annotations

import time
from typing import Any, Optional

from dataopt import loop
from dataopt.config import Params
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.stages import run_stage
from dataopt.artifacts import ORDER
from tasks.tracking import log_drift, log_run
from tasks.versioning import StageCache, StagePlan

STAGES = ("ingest", "embed", "drift")


def check_batch(params: Params, paths: Paths, project_params: Optional[Params],
                say=print, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Run the stale stages of :data:`STAGES`, log the check; returns ``{"report", "ran", "run_id",
    "dvc"}``."""
    started = time.time()
    cache, note = StageCache.open(paths.root)
    plan, ran = StagePlan(cache, params, project_params), []
    try:
        for name in STAGES:
            decision = plan.decide(name)
            if not decision.run:
                continue
            if name != "drift":
                say(f"dataopt: {name}: running ({decision.reason})")
            run_stage(name, params, paths)
            ran.append(name)
            plan.ran(name)
        # a rerun reference stage (new data/ made ingest stale) is a pipeline execution: when the rest of
        # the chain is current, log it as one (the `track` stage) so that `dvc status` stays clean
        if plan.recorded and set(ran) - {"drift"} and cache.stale("track") \
                and not any(cache.stale(n) for n in ORDER):
            log_run(params, paths, entry="drift", parent_run_id=parent_run_id)
            cache.commit("track")
    finally:
        if cache is not None:
            cache.close()
    dvc = note if cache is None else (
        "params differ from params.yaml: this check is not recorded in dvc.lock" if plan.tainted
        else "dvc.lock up to date")
    run_id = log_drift(params, paths, started, parent_run_id) if "drift" in ran else None  # a cached check is not re-logged
    report = read_json(paths.artifacts / "drift" / "drift.json")
    if report.get("batch") and "drift" in ran:
        loop.record(paths, "drift_checked", batch=report["batch"]["name"], drift=report["verdict"]["drift"],
                    why=report["verdict"]["why"], mlflow_run=run_id)
    return {"report": report, "ran": ran, "run_id": run_id, "dvc": dvc}
