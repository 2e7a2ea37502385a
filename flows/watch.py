"""The ``watch`` flow: take every complete batch in the landing folder (``schedule.incoming``; the
landing rule is in :mod:`dataopt.loop`), add it as a versioned batch (``dataopt batch add``: copied,
validated, read-only, ``data.dvc``), and run ``check_drift`` on it. A refused batch is moved to
``.refused/`` with its reason; nothing is ever deleted."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from dataopt import loop
from dataopt.config import load_params
from dataopt.errors import UserError
from dataopt.ingest.add import add_batch
from dataopt.lock import WorkspaceLock
from dataopt.paths import Paths
from flows.check_drift import check_drift
from tasks.versioning import track_data


@flow(name="watch", log_prints=True)
def watch(project: str = ".", check: bool = True) -> dict[str, Any]:
    """One look at the landing folder; returns ``{"added": [...], "refused": {name: why}, "checks": [...]}``."""
    logger = get_run_logger()
    paths = Paths.at(project)
    params = load_params(paths.params)
    incoming = paths.resolve(params.schedule.incoming)
    out: dict[str, Any] = {"added": [], "refused": {}, "checks": []}
    for name, item, marker in loop.complete_batches(incoming):
        with WorkspaceLock(paths.root, f"watch: batch add {name}", timeout=params.schedule.lock_timeout):
            try:
                entry = add_batch(paths, item, name, params.ingest, params.seed)
            except UserError as err:  # DataError is a UserError: a bad batch, a used name
                loop.archive(incoming, item, marker, "refused", str(err))
                loop.record(paths, "batch_refused", batch=name, why=str(err))
                out["refused"][name] = str(err)
                logger.warning("batch %s refused: %s", name, err)
                continue
            note = track_data(paths.root)
            loop.archive(incoming, item, marker, "done")
        loop.record(paths, "batch_accepted", batch=name, rows=entry["rows"], n_valid=entry["n_valid"],
                    content_hash=entry["content_hash"])
        logger.info("batch %s added: %d valid of %d rows; %s", name, entry["n_valid"], entry["rows"], note)
        out["added"].append(name)
        if check:
            out["checks"].append(check_drift(batch=name, project=str(paths.root)))
    if not out["added"] and not out["refused"]:
        logger.info("nothing complete in %s (a batch is taken once <name>.ready exists beside it)", incoming)
    return out
