"""Add a batch: copy a source into ``data/batches/<name>/``, validate it like any ingest source, make it
read-only and record it in ``data/manifest.json`` (:mod:`dataopt.batches` holds the layout and the
manifest)."""
from __future__ import annotations

import csv
import os
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from dataopt.batches import (COLUMN_KEYS, ENTRY, MANIFEST, NAME, REFERENCE, batches_dir, content_hash,
                             detect_kind, ensure_data, manifest_path, read_manifest, source_params)
from dataopt.config import IngestParams
from dataopt.errors import DataError, UserError
from dataopt.ingest.pipeline import ingest
from dataopt.io import write_json
from dataopt.paths import Paths


def add_batch(paths: Paths, src: Path, name: Optional[str], base: IngestParams, seed: int,
              columns: Optional[dict[str, Any]] = None, origin: Optional[str] = None) -> dict[str, Any]:
    """Copy ``src`` to ``data/batches/<name>/``, validate it like any source, make it read-only and
    record it in the manifest. Returns the manifest entry. Nothing is left behind when it fails."""
    src = Path(src).expanduser().resolve()
    if not src.exists():
        raise UserError(f"batch source not found: {src}")
    kind = detect_kind(src)
    entries = read_manifest(paths)
    name = name or _default_name(entries)
    if not NAME.fullmatch(name) or name in (REFERENCE, MANIFEST) or name.startswith("."):
        raise UserError(f"batch name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        f"letter or digit (not {REFERENCE!r})")
    target = batches_dir(paths) / name
    if any(e["name"] == name for e in entries) or target.exists():
        raise UserError(f"batch {name!r} already exists ({target}); batches are immutable: choose another "
                        "--name")
    cols = {k: v for k, v in {**{k: getattr(base, k) for k in COLUMN_KEYS}, **(columns or {})}.items()}
    staging = batches_dir(paths) / f".adding-{name}-{os.getpid()}"
    ensure_data(paths)
    staging.parent.mkdir(exist_ok=True)
    try:
        _copy(src, kind, staging / ENTRY[kind], cols)
        entry = {"name": name, "kind": kind, "columns": cols}
        staged = dict(entry, name=staging.name)
        result = ingest(source_params(staged, paths, base), seed, paths.root, min_classes=1)
        if result.error:
            raise DataError(f"batch {name!r} refused: {result.error.removeprefix('ingest: ')}")
        rep = result.report
        entry.update({
            "added_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": origin or str(src), "rows": rep["n_read"], "n_valid": rep["n_valid"],
            "n_quarantined": rep["n_quarantined"],
            "quarantine_reasons": {k: v for k, v in rep["by_reason"].items() if v},
            "classes": rep["classes"], "class_counts": _merged_counts(rep["class_counts"]),
            "content_hash": content_hash(staging)})
        _read_only(staging)
        staging.rename(target)
    except BaseException:
        _remove(staging)
        raise
    write_json(manifest_path(paths), {"batches": [*entries, entry]})
    return entry


def _default_name(entries: list[dict[str, Any]]) -> str:
    used = {e["name"] for e in entries}
    i = len(entries) + 1
    while f"batch-{i:03d}" in used:
        i += 1
    return f"batch-{i:03d}"


def _merged_counts(by_split: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for counts in by_split.values():
        for k, v in counts.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _copy(src: Path, kind: str, dst: Path, cols: dict[str, Any]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind == "imagefolder":
        shutil.copytree(src, dst, symlinks=False)
        return
    shutil.copy2(src, dst)
    if kind == "csv":  # the image files its path column names, at the same relative paths
        for rel in _csv_paths(src, cols.get("path_column") or "path"):
            file = (src.parent / rel).resolve()
            if file.is_file() and file.is_relative_to(src.parent):
                (dst.parent / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dst.parent / rel)


def _csv_paths(src: Path, column: str) -> Iterable[str]:
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            return []
        return [row[column] for row in reader if row.get(column)]


def _read_only(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for p in sorted((d for d in folder.rglob("*") if d.is_dir()), reverse=True) + [folder]:
        p.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _remove(folder: Path) -> None:
    if not folder.exists():
        return
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            p.chmod(stat.S_IRWXU)
    shutil.rmtree(folder, ignore_errors=True)




def remove_batch_files(folder: Path) -> None:
    """Delete a batch folder despite its read-only modes (tests, and clean-ups by hand)."""
    _remove(folder)
