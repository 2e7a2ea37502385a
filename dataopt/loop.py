"""The continuous loop's pure parts: which landed batches are complete, the decision log, and the
retrain triggers (drift verdict, amount of new data, time since the last training; the scheduled full
retrain is a cron deployment, see ``flows/serve.py``), and the retrain's scores on the new batches'
held-out rows. The flows in ``flows/`` call these.

Landing rule: a batch dropped into the landing folder (``schedule.incoming``) is ``<name>/`` (an
ImageFolder tree) or ``<name>.parquet`` / ``<name>.csv``; it is taken only once an empty marker file
``<name>.ready`` (for a file, ``<name>.parquet.ready`` also works) exists beside it, written by the
sender after the copy completed. A half-copied batch therefore is never taken, whatever its size or
speed. A taken batch is moved to ``.done/`` (or ``.refused/`` with ``<name>.reason.txt``) inside the
landing folder: nothing is deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from dataopt.paths import Paths
from dataopt.schema import HOLDOUT

MARKER = ".ready"
SUFFIXES = (".parquet", ".csv")
LOG = "decisions.jsonl"


def complete_batches(incoming: Path) -> list[tuple[str, Path, Path]]:
    """``(name, item, marker)`` of every complete batch in ``incoming``, oldest marker first."""
    if not incoming.is_dir():
        return []
    found = []
    for marker in incoming.glob(f"*{MARKER}"):
        stem = marker.name[: -len(MARKER)]
        candidates = [incoming / stem] if Path(stem).suffix in SUFFIXES else \
            [incoming / stem, *(incoming / f"{stem}{s}" for s in SUFFIXES)]
        item = next((c for c in candidates if c.exists()), None)
        if item is not None and not stem.startswith("."):
            found.append((marker.stat().st_mtime, Path(stem).stem if item.is_file() else stem, item, marker))
    return [(name, item, marker) for _, name, item, marker in sorted(found)]


def archive(incoming: Path, item: Path, marker: Path, outcome: str, reason: str = "") -> Path:
    """Move a taken batch and its marker to ``incoming/.done/`` or ``incoming/.refused/``."""
    folder = incoming / (".done" if outcome == "done" else ".refused")
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = folder / f"{stamp}-{item.name}"
    shutil.move(str(item), str(dest))
    marker.unlink(missing_ok=True)
    if reason:
        (folder / f"{stamp}-{item.name}.reason.txt").write_text(reason + "\n")
    return dest


def log_path(paths: Paths) -> Path:
    return paths.root / ".dataopt" / LOG


def record(paths: Paths, event: str, **fields: Any) -> dict[str, Any]:
    """Append one decision (batch accepted or refused, drift verdict, retrain started or skipped,
    promotion or rejection) to ``.dataopt/decisions.jsonl``: one line, written with one ``write`` on an
    ``O_APPEND`` file, so concurrent writers never interleave a line."""
    entry = {"time": time.time(), "event": event, **fields}
    f = log_path(paths)
    f.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(f, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return entry


def decisions(paths: Paths, events: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
    """The decision log, oldest first (a torn last line of a killed writer is skipped)."""
    f = log_path(paths)
    if not f.exists():
        return []
    wanted = set(events) if events else None
    out = []
    for line in f.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if wanted is None or entry.get("event") in wanted:
            out.append(entry)
    return out


def retrain_reason(triggers: Iterable[str], drift: Optional[bool], new_rows: int, hours_since: Optional[float],
                   min_new_rows: int, max_age_hours: Optional[float]) -> Optional[str]:
    """Why a retrain should start now (one line), or None. ``hours_since`` None: never trained."""
    why = []
    triggers = set(triggers)
    if "drift" in triggers and drift:
        why.append("the drift check flagged the batch")
    if "new_data" in triggers and new_rows >= min_new_rows:
        why.append(f"{new_rows} new rows since the last training >= schedule.min_new_rows={min_new_rows}")
    if "age" in triggers and max_age_hours is not None and (hours_since is None or hours_since >= max_age_hours):
        why.append("never trained" if hours_since is None else
                   f"{hours_since:.1f} h since the last training >= schedule.max_age_hours={max_age_hours:g}")
    return "; ".join(why) or None


def holdout_sets(paths: Paths, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{batch: (images, labels)}`` of each named batch's held-out rows (split "holdout"; labels as the
    batch gave them, noisy where its are); a batch with none held out is left out."""
    import pandas as pd  # why: pandas (slow to import), only when a retrain scores its batches

    samples = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet", columns=["split", "label", "batch"])
    held = (samples["split"] == HOLDOUT).to_numpy()
    images = np.load(paths.artifacts / "ingest" / "images.npy", mmap_mode="r")
    rows = {b: np.flatnonzero(held & (samples["batch"] == b).to_numpy()) for b in names}
    return {b: (np.asarray(images[r]), samples["label"].to_numpy()[r]) for b, r in rows.items() if len(r)}


def predict_classes(model: Any, images: np.ndarray) -> np.ndarray:
    """The class a model (anything with ``predict(images) -> (n, n_classes)`` scores) picks per image."""
    return np.asarray(model.predict(images)).argmax(1)


def holdout_scores(models: dict[str, Any], sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """``{batch: {"n", "<model>_accuracy", ...}}``: each of ``models`` (None: no such model, accuracy
    None) on each batch's held-out rows of ``sets`` (:func:`holdout_sets`)."""
    return {b: {"n": len(y), **{f"{m}_accuracy": None if model is None else
                                float((predict_classes(model, images) == y).mean()) for m, model in models.items()}}
            for b, (images, y) in sets.items()}
