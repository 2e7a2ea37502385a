"""ingest stage: source -> samples.parquet, images.npy, quarantine.parquet, report.json."""
from __future__ import annotations

import contextlib
from typing import Any

from dataopt import artifacts as art
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.ingest.pipeline import ingest
from dataopt.paths import Paths


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Ingest ``params.ingest`` and write the artifacts under ``artifacts/ingest/``.

    quarantine.parquet and report.json are written first, so they exist even when the stage then
    raises DataError (no valid sample, or too many quarantined).
    """
    result = ingest(params.ingest, params.seed, paths.root)
    art.write_table(paths, "ingest/quarantine.parquet", result.quarantine)
    art.write_json(paths, "ingest/report.json", result.report)
    if result.error:
        for name in ("ingest/samples.parquet", "ingest/images.npy"):  # no stale outputs of an earlier run
            with contextlib.suppress(FileNotFoundError):
                art.locate(paths, name, "w").unlink()
        raise DataError(result.error)
    art.save_npy(paths, "ingest/images.npy", result.images)
    art.write_table(paths, "ingest/samples.parquet", result.samples)
    return result.metrics
