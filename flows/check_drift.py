"""The ``check_drift`` flow: one batch against the reference (the drift stage, through DVC), then the
retrain triggers of ``params.yaml``'s ``schedule`` section; starts ``retrain`` when one fires. Every
outcome goes to the decision log (``.dataopt/decisions.jsonl``) and the check to MLflow."""
from __future__ import annotations

import time
from typing import Any, Optional

from prefect import flow, get_run_logger

from dataopt import batches, loop
from dataopt.config import load_params
from dataopt.lock import WorkspaceLock
from dataopt.paths import Paths
from flows.retrain import recover, retrain as retrain_flow
from tasks.drift import check_batch
from tasks.tracking import flow_run, tag_run


def new_rows_since_training(paths: Paths) -> tuple[int, Optional[float]]:
    """``(valid rows of the batches no training has used, hours since the last training or None)``."""
    trained = loop.decisions(paths, ["retrain_done"])
    used = set(trained[-1]["batches"]) if trained else set()
    rows = sum(e["n_valid"] for e in batches.read_manifest(paths) if e["name"] not in used)
    hours = (time.time() - trained[-1]["time"]) / 3600 if trained else None
    return rows, hours


@flow(name="check_drift", log_prints=True)
def check_drift(batch: Optional[str] = None, project: str = ".", retrain: bool = True,
                parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Check ``batch`` (default: the newest) and start ``retrain`` when a trigger fires. One MLflow
    parent run: the drift check (and the retrain's pipeline run) are nested under it."""
    logger = get_run_logger()
    paths = Paths.at(project)
    timeout = load_params(paths.params).schedule.lock_timeout
    with WorkspaceLock(paths.root, f"check_drift {batch or 'newest'}", timeout=timeout):
        recover(paths, logger)  # first: a dead retrain's params.yaml must not be the one read below
        entry = batches.get_batch(paths, batch)
        newest = batches.read_manifest(paths)[-1]["name"]
        overrides = [] if entry["name"] == newest else [f"drift.batch={entry['name']}"]
        params = load_params(paths.params, overrides)
    with flow_run(params, paths, "check_drift", parent_run_id, **{"dataopt.batch": entry["name"]}) as run_id:
        with WorkspaceLock(paths.root, f"check_drift {entry['name']}", timeout=params.schedule.lock_timeout):
            out = check_batch(params, paths, load_params(paths.params), say=logger.info, parent_run_id=run_id)
        verdict = out["report"]["verdict"]
        logger.info("batch %s: %s", entry["name"], verdict["why"])
        rows, hours = new_rows_since_training(paths)
        s = params.schedule
        reason = loop.retrain_reason(s.triggers, verdict["drift"], rows, hours, s.min_new_rows, s.max_age_hours)
        result: dict[str, Any] = {"batch": entry["name"], "drift": verdict["drift"], "why": verdict["why"],
                                  "retrain": None}
        if reason is None:
            why = f"no trigger fired (schedule.triggers={s.triggers}; {rows} untrained rows)"
            loop.record(paths, "retrain_skipped", batch=entry["name"], why=why)
            logger.info("no retrain: %s", why)
        elif retrain:
            logger.info("retrain: %s", reason)
            result["retrain"] = retrain_flow(project=str(paths.root), reason=f"batch {entry['name']}: {reason}",
                                             parent_run_id=run_id)
        tag_run(params, paths, run_id, **{"dataopt.drift": verdict["drift"], "dataopt.verdict": verdict["why"],
                                          "dataopt.retrain": reason or "not triggered"})
    return result
