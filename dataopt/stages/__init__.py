"""The seven stages, in pipeline order. Each module exposes ``run(params, paths) -> dict``.

Each stage module also declares what it reads and which params sections it depends on
(``INPUTS``: paths relative to ``artifacts/``; ``PARAMS``: params.yaml sections/keys), so that
``dvc.yaml``, the Prefect cache key and the tests agree on one definition.
"""
from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Any

from dataopt.config import Params
from dataopt.errors import ConfigError
from dataopt.io import write_json
from dataopt.paths import Paths

ORDER = ("ingest", "embed", "perceive", "analyze", "optimize", "train", "evaluate")


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
    metrics = dict(mod.run(params, paths, **hooks) or {})
    metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
    if name != "evaluate":  # evaluate writes its own, richer metrics.json
        write_json(paths.stage(name) / "metrics.json", metrics)
    return metrics
