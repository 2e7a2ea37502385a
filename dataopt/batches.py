"""New data as versioned batches: ``data/batches/<name>/``, read-only once added, and a manifest.

``data/`` holds raw inputs only (DESIGN.md); the project's root ``data.dvc`` versions it (the caller
runs ``dvc add data`` after :func:`add_batch`: DVC stays out of the library). A batch is a copy of an
ImageFolder tree, a Parquet file or a CSV file (with the image files its path column names), taken
through the same validation as any ingest source before it is accepted, and recorded in
``data/manifest.json``: name, time, source, kind, columns, rows, valid rows, quarantine reasons and a
content hash. Batches are immutable: :func:`verify` recomputes the hash before a batch is read, so a
batch edited in place is refused instead of silently changing what a recorded run meant.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from dataopt.config import IngestParams
from dataopt.errors import DataError, UserError
from dataopt.io import file_digest
from dataopt.paths import Paths

MANIFEST = "manifest.json"
REFERENCE = "reference"  # the batch value of the reference dataset's rows (not a valid batch name)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KINDS = ("imagefolder", "parquet", "csv")
COLUMN_KEYS = ("label_column", "image_column", "path_column", "label_name_column", "clean_label_column",
               "id_column")
ENTRY = {"imagefolder": "images", "parquet": "batch.parquet", "csv": "batch.csv"}


def batches_dir(paths: Paths) -> Path:
    return paths.data / "batches"


def manifest_path(paths: Paths) -> Path:
    return paths.data / MANIFEST


def ensure_data(paths: Paths) -> bool:
    """Make ``data/`` exist (an empty folder is what ``data.dvc`` records in a fresh clone); True when
    it was created now."""
    if paths.data.is_dir():
        return False
    paths.data.mkdir()
    return True


def read_manifest(paths: Paths) -> list[dict[str, Any]]:
    """The recorded batches, oldest first ([] when none)."""
    f = manifest_path(paths)
    if not f.exists():
        return []
    try:
        return list(json.loads(f.read_text())["batches"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{f}: not a dataopt batch manifest ({err})") from None


def get_batch(paths: Paths, name: Optional[str]) -> dict[str, Any]:
    """The manifest entry of batch ``name`` (None: the newest batch)."""
    entries = read_manifest(paths)
    if not entries:
        raise UserError(f"no batch in {manifest_path(paths)}: add one with `dataopt batch add SRC`")
    if name is None:
        return entries[-1]
    for e in entries:
        if e["name"] == name:
            return e
    raise UserError(f"unknown batch {name!r}; batches: {', '.join(e['name'] for e in entries)}")


def detect_kind(src: Path) -> str:
    if src.is_dir():
        return "imagefolder"
    suffix = src.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise UserError(f"{src}: a batch source is an ImageFolder directory, a .parquet or a .csv file")


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and sha256, in path order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def source_params(entry: dict[str, Any], paths: Paths, base: IngestParams, image_size: Optional[int] = None
                  ) -> IngestParams:
    """The ingest parameters that read batch ``entry`` as a source of its own (no eval split, no
    injected noise; ``image_size``: decode to the reference's size)."""
    cols = entry.get("columns", {})
    return base.model_copy(update={
        "source": entry["kind"], "path": str(batches_dir(paths) / entry["name"] / ENTRY[entry["kind"]]),
        "eval_path": None, "eval_label_column": None, "batches": [], "limit": None,
        "image_size": image_size, "noise": base.noise.model_copy(update={"kind": "none", "rate": 0.0}),
        **{k: cols[k] for k in COLUMN_KEYS if k in cols}})


def verify(paths: Paths, entry: dict[str, Any]) -> None:
    """DataError when batch ``entry``'s files are missing or differ from what was added."""
    folder = batches_dir(paths) / entry["name"]
    if not folder.is_dir():
        raise DataError(f"batch {entry['name']!r}: {folder} is missing (restore it with `dvc checkout data`)")
    if content_hash(folder) != entry["content_hash"]:
        raise DataError(f"batch {entry['name']!r}: {folder} changed since it was added (content hash differs "
                        "from data/manifest.json); batches are immutable: add the new data as a new batch")


__all__ = ["REFERENCE", "batches_dir", "content_hash", "ensure_data", "get_batch", "manifest_path",
           "read_manifest", "source_params", "verify"]
