"""The seven stages, in pipeline order. Each module exposes ``run(params, paths) -> dict``.

What a stage reads and writes and which params sections it depends on is declared once in
:mod:`dataopt.artifacts`; :func:`run_stage` enforces it while the stage runs.
"""
from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Any

from dataopt.artifacts import ORDER, stage_context
from dataopt.config import Params
from dataopt.errors import ConfigError
from dataopt.io import write_json
from dataopt.paths import Paths

__all__ = ["ORDER", "module", "run_stage"]


def module(name: str) -> ModuleType:
    if name not in ORDER:
        raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(ORDER)}")
    return importlib.import_module(f"dataopt.stages.{name}")


def run_stage(name: str, params: Params, paths: Paths, **hooks: Any) -> dict[str, Any]:
    """Run one stage, write ``artifacts/<name>/metrics.json`` and return its metrics.

    ``hooks`` are passed to the stage's ``run`` (e.g. ``map_shards`` for ``embed``: how an
    orchestrator runs the per-shard work; see ``dataopt.stages.embed``).
    """
    mod = module(name)
    t0 = time.perf_counter()
    with stage_context(name):
        metrics = dict(mod.run(params, paths, **hooks) or {})
    metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
    if name != "evaluate":  # evaluate writes its own, richer metrics.json
        write_json(paths.stage(name) / "metrics.json", metrics)
    return metrics
