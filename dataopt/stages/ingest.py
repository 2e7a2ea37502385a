"""ingest stage: source -> samples.parquet, images.npy, quarantine.parquet, report.json."""
from __future__ import annotations

import contextlib
from typing import Any

from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.ingest.pipeline import ingest
from dataopt.io import save_npy, write_json, write_parquet
from dataopt.paths import Paths

INPUTS: tuple[str, ...] = ()
OUTPUTS = (
    "ingest/samples.parquet",
    "ingest/images.npy",
    "ingest/quarantine.parquet",
    "ingest/report.json",
)
PARAMS = ("seed", "ingest")


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Ingest ``params.ingest`` and write the artifacts under ``artifacts/ingest/``.

    quarantine.parquet and report.json are written first, so they exist even when the stage then
    raises DataError (no valid sample, or too many quarantined).
    """
    out = paths.stage("ingest")
    result = ingest(params.ingest, params.seed, paths.root)
    write_parquet(out / "quarantine.parquet", result.quarantine)
    write_json(out / "report.json", result.report)
    if result.error:
        for name in ("samples.parquet", "images.npy"):  # never leave stale outputs of an earlier run
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        raise DataError(result.error)
    save_npy(out / "images.npy", result.images)
    write_parquet(out / "samples.parquet", result.samples)
    return result.metrics
