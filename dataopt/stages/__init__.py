"""The seven stages, in pipeline order. Each module exposes ``run(params, paths) -> dict``.

What a stage reads and writes and which params sections it depends on is declared once in
:mod:`dataopt.artifacts`; :func:`run_stage` enforces it while the stage runs, and writes two files per
stage besides the stage's own outputs:

- ``<stage>/metrics.json``: the stage's ``HEADLINE`` metrics only (a handful of scalars), so that
  ``dvc exp show`` / ``dvc metrics show`` stay readable; the DVC metric of the stage.
- ``<stage>/stage.json``: every metric the stage returned, when it started and ended (unix seconds)
  and which process launched it (``launcher``); a plain output. The ``track`` stage takes the MLflow
  run's start from these (see :func:`launcher`) and logs every metric from them.
"""
from __future__ import annotations

import importlib
import os
import time
from types import ModuleType
from typing import Any, Optional

from dataopt import artifacts as art
from dataopt import profiles
from dataopt.artifacts import ORDER, SIDE_STAGES, read_samples, stage_context
from dataopt.config import Params
from dataopt.errors import ConfigError
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.schema import TRAIN

__all__ = ["ALL", "ORDER", "module", "run_stage"]
ALL = ORDER + SIDE_STAGES  # every stage `dataopt stage` runs

# the columns `dvc exp show` gets per stage; everything else a stage returns is in stage.json
HEADLINE = {
    "ingest": ("n_train", "n_test", "n_quarantined", "n_classes", "noise_rate", "seconds"),
    "embed": ("dim", "proxy_oof_accuracy", "seconds"),
    "perceive": ("oof_accuracy", "mean_loss_early", "seconds"),
    "analyze": ("estimated_noise_rate", "n_label_issues", "detection_f1", "seconds"),
    "optimize": ("n_kept", "kept_share", "mean_weight", "seconds"),
    "train": ("epochs", "samples_seen", "final_loss", "train_seconds", "seconds"),
    "evaluate": ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll", "cost_ratio",
                 "samples_seen", "seconds"),
    "drift": ("drift", "n_batch", "n_flagged_tests", "seconds"),
}
METRICS_FILE = "metrics.json"
STAGE_FILE = "stage.json"

_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish", "busybox"})


def module(name: str) -> ModuleType:
    if name not in ALL:
        raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(ALL)}")
    return importlib.import_module(f"dataopt.stages.{name}")


def _proc_stat(pid: int) -> Optional[tuple[str, int, str]]:
    """``(command name, parent pid, start time in clock ticks)`` from Linux's /proc, else None."""
    try:
        raw = open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return comm, int(rest[1]), rest[19]  # fields 4 (ppid) and 22 (starttime) of proc(5)


def launcher() -> str:
    """The process that launched this one, past any shell, as ``"<pid>@<start ticks>"``.

    Every stage of one ``dvc repro`` / ``dvc exp run`` is a child (through ``$SHELL -c``) of the same
    DVC process, so equal launchers mean one pipeline execution; the start time makes a reused pid
    differ. Outside Linux it is the parent pid alone.
    """
    pid = os.getppid()
    for _ in range(8):  # a few nested shells at most
        stat = _proc_stat(pid)
        if stat is None:
            return str(pid)
        comm, ppid, start = stat
        if comm not in _SHELLS or ppid <= 1:
            return f"{pid}@{start}"
        pid = ppid
    return str(pid)


def headline(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``HEADLINE`` entries of a stage's metrics that it returned (missing ones left out)."""
    return {k: metrics[k] for k in HEADLINE[name] if k in metrics}


def machine_defaults(params: Params, paths: Paths) -> tuple[Params, dict[str, Any]]:
    """``params`` with its ``auto`` keys filled for this machine and the ingested train split (see
    :mod:`dataopt.profiles`), and the record of what was filled and why."""
    if not any(profiles.value_of(params, k) == profiles.AUTO for k in profiles.AUTO_KEYS):
        return params, {}
    if not (paths.artifacts / "ingest" / "samples.parquet").exists():  # the stage names what is missing
        return params, {}
    import torch  # why: the device decides the profile; torch is heavy and only needed when a key is auto

    split = read_samples(paths, ["split"])["split"]
    return profiles.resolve(params, int((split == TRAIN).sum()), torch.cuda.is_available())


def defaults_applied(paths: Paths) -> dict[str, Any]:
    """The ``auto`` keys the chain's stages filled and why (their ``stage.json``; {} when none)."""
    record: dict[str, Any] = {}
    for name in ORDER:
        f = paths.artifacts / name / STAGE_FILE
        rec = (read_json(f).get("defaults") or {}) if f.exists() else {}
        if rec:
            record = {**rec, "applied": {**record.get("applied", {}), **rec["applied"]}}
    return record


def run_stage(name: str, params: Params, paths: Paths, **hooks: Any) -> dict[str, Any]:
    """Run one stage, write ``artifacts/<name>/{metrics,stage}.json`` and return all its metrics.

    Every stage after ``ingest`` sees ``params`` with its ``auto`` keys filled (:func:`machine_defaults`);
    ``stage.json`` records which and why. ``hooks`` are passed to the stage's ``run`` (e.g.
    ``map_shards`` for ``embed``: how an orchestrator runs the per-shard work; see ``dataopt.embed.run``).
    """
    mod = module(name)
    defaults: dict[str, Any] = {}
    if name != "ingest":  # ingest reads no auto key, and the train split it writes chooses the profile
        with stage_context(name):
            params, defaults = machine_defaults(params, paths)
    art.remove_stale_temps(paths, name)  # of a killed earlier run: every artifact is old or new
    started = time.time()
    t0 = time.perf_counter()
    with stage_context(name):
        metrics = dict(mod.run(params, paths, **hooks) or {})
    metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
    with stage_context(name):
        art.write_json(paths, f"{name}/{STAGE_FILE}", {
            "stage": name, "started_at": started, "ended_at": time.time(), "launcher": launcher(),
            "metrics": metrics, **({"defaults": defaults} if defaults.get("applied") else {})})
        art.write_json(paths, f"{name}/{METRICS_FILE}", headline(name, metrics))
    return metrics
