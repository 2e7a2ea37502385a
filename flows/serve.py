"""The deployments ``dataopt serve`` runs: ``watch`` on an interval (``schedule.watch_interval``),
``check_drift`` and ``retrain`` on demand (``retrain`` also on ``schedule.full_retrain_cron`` when set),
each limited to one run at a time. ``prefect.serve`` runs them against the Prefect API the environment
names (``dataopt server start`` starts a persistent one on 127.0.0.1)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dataopt.config import Params
from flows.check_drift import check_drift
from flows.retrain import retrain
from flows.watch import watch


def deployments(params: Params, root: Path) -> list[Any]:
    project = {"project": str(root)}
    s = params.schedule
    retrain_schedule = {"cron": s.full_retrain_cron} if s.full_retrain_cron else {}
    return [
        watch.to_deployment(name="watch", interval=s.watch_interval, parameters=project, concurrency_limit=1,
                            description="take complete batches from the landing folder, check each"),
        check_drift.to_deployment(name="check-drift", parameters=project, concurrency_limit=1,
                                  description="check one batch (default: the newest); retrain on a trigger"),
        retrain.to_deployment(name="retrain", parameters=project, concurrency_limit=1, **retrain_schedule,
                              description="re-curate with every batch, train a challenger, promote by rule"),
    ]


def serve_all(params: Params, root: Path) -> None:
    from prefect import serve

    serve(*deployments(params, root), print_starting_message=True)
