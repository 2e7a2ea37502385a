"""Ingest sources: each reads raw rows (references, labels, image bytes or paths) without decoding.

A source is a class in the registry ``dataopt.registry.SOURCES``; ``__init__`` stores the keyword
parameters it uses (a subset of ``params.yaml``'s ``ingest`` section plus ``root``, the project folder
that relative ``path`` values are resolved against) and :meth:`read` returns a :class:`RawRows`.
Path problems (missing file, path escaping the dataset root) are recorded per row here, so the
pipeline quarantines them without opening anything.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

from dataopt.errors import DataError
from dataopt.registry import SOURCES

FRAME_COLUMNS = (
    "part",  # 0: ingest.path, 1: ingest.eval_path
    "split",  # "train" / "test" when fixed by the source, else None (stratified split later)
    "source",  # what the user sees: relative path or "file.parquet#row=12"
    "key",  # identity hashed into sample_id: relative path, or "file.parquet#id=7"
    "source_id",
    "label",
    "label_clean",
    "label_name",
    "file",  # absolute path to decode, or None
    "data",  # image bytes to decode, or None
    "reason",  # quarantine reason found by the source, or None
    "detail",
)


@dataclass
class RawRows:
    """Rows read by a source, before validation.

    Attributes
    ----------
    frame : DataFrame with :data:`FRAME_COLUMNS`, one row per input
    pixels : ndarray, shape (len(frame), H, W, 3), uint8, optional
        Already decoded images (built-in data sets); then ``file`` and ``data`` are None.
    meta : dict
        Extra counts for report.json (e.g. ignored hidden files).
    """

    frame: pd.DataFrame
    pixels: Optional[np.ndarray] = None
    meta: dict[str, Any] = field(default_factory=dict)


def make_frame(n: int, **cols: Any) -> pd.DataFrame:
    """A frame of ``n`` rows with every :data:`FRAME_COLUMNS` column (missing ones None)."""
    out = {}
    for c in FRAME_COLUMNS:
        v = cols.get(c)
        out[c] = pd.Series([v] * n if v is None or np.isscalar(v) else list(v), dtype=object)
    frame = pd.DataFrame(out)
    frame["part"] = frame["part"].fillna(0).astype(np.int64)
    return frame


def concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate escapes)
    are written as ``\\xNN``, so names stay readable and storable in Parquet and JSON."""
    if not _SURROGATE.search(name):
        return name
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system byte maps to
        return name.encode("utf-8", "backslashreplace").decode("ascii")


def _user_path(p: Optional[str], root: Path, what: str) -> Path:
    if p is None:
        raise DataError(f"ingest.{what} is required for this source; set it in params.yaml")
    if "\0" in p:
        raise DataError(f"ingest.{what}: {p!r} contains a NUL byte, which no file name can hold")
    q = Path(p).expanduser()
    q = q if q.is_absolute() else root / q
    try:
        exists = q.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise DataError(f"ingest.{what}: {shown(str(q))}: {exc.strerror or exc}") from None
    if not exists:
        raise DataError(f"ingest.{what}: {shown(str(q))} does not exist")
    return q


def check_path(rel: Any, base: Path) -> tuple[Optional[str], Optional[str], str]:
    """Resolve a manifest path against ``base`` (the dataset root).

    Returns
    -------
    tuple
        ``(absolute_file, reason, detail)``: the file to open, or None with a quarantine reason.
    """
    if rel is None or (isinstance(rel, float) and np.isnan(rel)) or str(rel).strip() == "":
        return None, "missing_file", "empty path"
    rel = str(rel)
    if "\0" in rel:
        return None, "missing_file", f"path {shown(rel)!r} contains a NUL byte, which no file name can hold"
    if Path(rel).is_absolute():
        return None, "path_escapes_root", f"absolute path {shown(rel)!r}: paths must be relative to {base}"
    try:
        real = (base / rel).resolve()
        if not real.is_relative_to(base.resolve()):
            return (None, "path_escapes_root",
                    f"{shown(rel)!r} resolves to {shown(str(real))}, outside the dataset root {base}")
        if not real.exists():
            return None, "missing_file", f"file not found: {shown(str(base / rel))}"
        if not real.is_file():
            return None, "not_an_image", f"{shown(str(base / rel))} is not a regular file"
    except (OSError, RuntimeError) as exc:  # name too long, symlink loop (RuntimeError before 3.13), ...
        return None, "missing_file", f"cannot open {shown(rel)!r}: {exc}"
    return str(real), None, ""


class _Source:
    """Shared reader helpers; subclasses implement :meth:`read`."""

    requires = ()

    def read(self) -> RawRows:  # pragma: no cover - abstract
        raise NotImplementedError


@SOURCES.register("sklearn_digits")
class SklearnDigits(_Source):
    """scikit-learn's 1,797 8x8 grey digits (0..16) as 8x8 uint8 RGB (0..255), labels 0..9."""

    def __init__(self, *, limit: Optional[int] = None):
        self.limit = limit

    def read(self) -> RawRows:
        d = load_digits()
        images, target = d.images, d.target
        if self.limit is not None:
            images, target = images[: self.limit], target[: self.limit]
        n = len(target)
        grey = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
        pixels = np.repeat(grey[..., None], 3, axis=3)
        rows = np.arange(n)
        frame = make_frame(
            n,
            source=[f"sklearn_digits#row={i}" for i in rows],
            key=[f"sklearn_digits#row={i}" for i in rows],
            source_id=[str(i) for i in rows],
            label=target.astype(np.int64).tolist(),
        )
        return RawRows(frame, pixels, {"orig_mode": "L", "note": "converted from L (grey 0..16 scaled to 0..255)"})


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]], int]:
    """Files under ``root`` (sorted, relative, posix), directory symlinks escaping it, hidden count.

    Symlinked directories are followed when they stay inside ``root`` (each real directory once, so a
    cycle cannot loop); escaping ones are reported instead of followed.
    """
    base = root.resolve()
    files: list[str] = []
    escaping: list[tuple[str, str]] = []
    hidden = 0
    seen: set[str] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"imagefolder: cannot list {shown(str(d))}: {exc.strerror or exc}") from None
        for e in entries:
            if e.name.startswith("."):
                hidden += 1  # .DS_Store, .ipynb_checkpoints: counted in report.json, not ingested
                continue
            rel = Path(e.path).relative_to(root).as_posix()
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                target = Path(e.path).resolve() if is_dir and e.is_symlink() else None
            except (OSError, RuntimeError):  # a symlink loop: left to check_path, which quarantines it
                is_dir, target = False, None
            if target is not None and not target.is_relative_to(base):
                escaping.append((rel, f"directory symlink {shown(rel)!r} resolves to {shown(str(target))}, "
                                      f"outside {shown(str(root))}"))
            elif is_dir:
                stack.append(Path(e.path))
            else:
                files.append(rel)
    return sorted(files), escaping, hidden


@SOURCES.register("imagefolder")
class ImageFolder(_Source):
    """``root/<class>/<image>``: the label is the first folder below the root.

    Files directly in the root have no label (quarantined as missing_label). ``eval_path`` is a second
    root of the same layout used as the test split.
    """

    def __init__(self, *, path: Optional[str] = None, eval_path: Optional[str] = None,
                 limit: Optional[int] = None, root: str = "."):
        self.path, self.eval_path, self.limit, self.root = path, eval_path, limit, root

    def _part(self, folder: Path, part: int, split: Optional[str]) -> tuple[pd.DataFrame, int]:
        if not folder.is_dir():
            raise DataError(f"imagefolder: {folder} is not a directory (expected root/<class>/<image>)")
        files, escaping, hidden = _walk(folder)
        if self.limit is not None:
            files = files[: self.limit]
        names = [shown(f) for f in files]
        labels = [f.split("/", 1)[0] if "/" in f else None for f in names]
        checked = [check_path(f, folder) for f in files]
        frame = make_frame(
            len(files),
            part=part,
            split=split,
            source=names,
            key=names,
            label=labels,
            file=[c[0] for c in checked],
            reason=[c[1] for c in checked],
            detail=[c[2] for c in checked],
        )
        if escaping:
            frame = concat([frame, make_frame(
                len(escaping), part=part, split=split, source=[shown(e[0]) for e in escaping],
                key=[shown(e[0]) for e in escaping], reason="path_escapes_root", detail=[e[1] for e in escaping],
            )])
        return frame, hidden

    def read(self) -> RawRows:
        root = Path(self.root)
        train, h0 = self._part(_user_path(self.path, root, "path"), 0, "train" if self.eval_path else None)
        if not self.eval_path:
            return RawRows(train, meta={"n_ignored_hidden": h0})
        test, h1 = self._part(_user_path(self.eval_path, root, "eval_path"), 1, "test")
        return RawRows(concat([train, test]), meta={"n_ignored_hidden": h0 + h1})


def _missing_column(path: Path, column: str, what: str, available: list[str]) -> DataError:
    return DataError(f"{path}: no column {column!r} (ingest.{what}); available: {', '.join(available)}")


class _TableSource(_Source):
    """A table file (``path``) and an optional held-out table of the same layout (``eval_path``);
    subclasses implement ``_part(file, part, split, label_column) -> DataFrame``."""

    def read(self) -> RawRows:
        root = Path(self.root)
        parts = [self._part(_user_path(self.path, root, "path"), 0, "train" if self.eval_path else None,
                            self.label_column)]
        if self.eval_path:
            parts.append(self._part(_user_path(self.eval_path, root, "eval_path"), 1, "test",
                                    self.eval_label_column or self.label_column))
        return RawRows(concat(parts))


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _check_label_type(file: Path, column: str, t: pa.DataType) -> None:
    """Labels are integers or strings; a float column is accepted when its values are integer-valued
    (checked once read). Lists, structs, maps, binary, booleans, dates, ... are refused by name."""
    v = _value_type(t)
    if not (pa.types.is_integer(v) or pa.types.is_string(v) or pa.types.is_large_string(v)
            or pa.types.is_floating(v) or pa.types.is_null(v)):
        raise DataError(f"{file}: label column {column!r} has type {t}; labels must be integers or strings")


def _check_integer_valued(file: Path, column: str, t: pa.DataType, values: list) -> None:
    odd = next((v for v in values if v is not None and v == v and not float(v).is_integer()), None)
    if odd is not None:
        raise DataError(f"{file}: label column {column!r} has type {t} with a non-integer value ({odd!r}); "
                        f"labels must be integers or strings")


@SOURCES.register("parquet")
class ParquetSource(_TableSource):
    """A Parquet table: image bytes (``image_column``) or paths (``path_column``, relative to the
    file's folder), labels (``label_column``, int or string) and optional name/id/clean-label columns.

    Only the needed columns are read (column projection), batch by batch up to ``limit`` rows.
    """

    def __init__(self, *, path: Optional[str] = None, eval_path: Optional[str] = None,
                 image_column: str = "image", path_column: Optional[str] = None,
                 label_column: str = "label", eval_label_column: Optional[str] = None,
                 label_name_column: Optional[str] = "label_name", clean_label_column: Optional[str] = None,
                 id_column: Optional[str] = None, limit: Optional[int] = None, root: str = "."):
        self.path, self.eval_path = path, eval_path
        self.image_column, self.path_column = image_column, path_column
        self.label_column, self.eval_label_column = label_column, eval_label_column
        self.label_name_column, self.clean_label_column = label_name_column, clean_label_column
        self.id_column, self.limit, self.root = id_column, limit, root

    def _part(self, file: Path, part: int, split: Optional[str], label_column: str) -> pd.DataFrame:
        try:
            return self._read(file, part, split, label_column)
        except (pa.ArrowException, OSError, ValueError) as exc:  # not Parquet, corrupt pages, unreadable
            raise DataError(f"{shown(str(file))}: not a readable Parquet file ({type(exc).__name__}: "
                            f"{shown(str(exc))})") from None

    def _read(self, file: Path, part: int, split: Optional[str], label_column: str) -> pd.DataFrame:
        pf = pq.ParquetFile(file)
        schema = pf.schema_arrow
        names = schema.names
        payload = self.path_column or self.image_column
        want = {"payload": payload, "label": label_column}
        if payload not in names:
            what = "path_column" if self.path_column else "image_column"
            raise _missing_column(file, payload, what, names)
        if label_column not in names:
            raise _missing_column(file, label_column, "eval_label_column" if part else "label_column", names)
        if self.id_column:
            if self.id_column not in names:
                raise _missing_column(file, self.id_column, "id_column", names)
            want["id"] = self.id_column
        if self.clean_label_column:
            if self.clean_label_column in names:
                want["clean"] = self.clean_label_column
            elif part == 0:  # the held-out file may lack it; the training file must have it
                raise _missing_column(file, self.clean_label_column, "clean_label_column", names)
        if self.label_name_column and self.label_name_column in names:
            want["name"] = self.label_name_column
        for role in ("label", "clean", "name"):
            if role in want:
                _check_label_type(file, want[role], schema.field(want[role]).type)
        if not self.path_column:
            t = schema.field(payload).type
            if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)):
                raise DataError(f"{file}: image column {payload!r} has type {t}; expected binary image bytes "
                                f"(or set ingest.path_column to a column of image paths)")
        columns = list(dict.fromkeys(want.values()))
        batches, n = [], 0
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            if self.limit is not None and n + batch.num_rows > self.limit:
                batch = batch.slice(0, self.limit - n)
            batches.append(batch)
            n += batch.num_rows
            if self.limit is not None and n >= self.limit:
                break
        col = {c: [] for c in columns}
        for b in batches:
            for c in columns:
                col[c].extend(b.column(c).to_pylist())
        for role in ("label", "clean"):
            if role in want and pa.types.is_floating(_value_type(schema.field(want[role]).type)):
                _check_integer_valued(file, want[role], schema.field(want[role]).type, col[want[role]])
        rows = np.arange(n)
        source = [f"{file.name}#row={i}" for i in rows]
        ids = [None if v is None else str(v) for v in col[want["id"]]] if "id" in want else [None] * n
        key = [f"{file.name}#id={v}" if v is not None else s for v, s in zip(ids, source)]
        cols: dict[str, Any] = dict(
            part=part, split=split, source=source, key=key, source_id=ids,
            label=col[want["label"]],
            label_clean=col[want["clean"]] if "clean" in want else None,
            label_name=col[want["name"]] if "name" in want else None,
        )
        if self.path_column:
            checked = [check_path(p, file.parent) for p in col[payload]]
            cols.update(file=[c[0] for c in checked], reason=[c[1] for c in checked], detail=[c[2] for c in checked])
            cols["source"] = [str(p) if p is not None else s for p, s in zip(col[payload], source)]
        else:
            cols["data"] = col[payload]
        return make_frame(n, **cols)


@SOURCES.register("csv")
class CsvSource(_TableSource):
    """A CSV manifest with columns ``path,label[,id]`` (paths relative to the CSV's folder).

    Column names follow ``path_column`` (default ``path``), ``label_column``, ``id_column`` (default
    ``id`` when present), ``clean_label_column`` and ``label_name_column`` when present. Every value is
    read as text; empty cells are missing.
    """

    def __init__(self, *, path: Optional[str] = None, eval_path: Optional[str] = None,
                 path_column: Optional[str] = None, label_column: str = "label",
                 eval_label_column: Optional[str] = None, label_name_column: Optional[str] = "label_name",
                 clean_label_column: Optional[str] = None, id_column: Optional[str] = None,
                 limit: Optional[int] = None, root: str = "."):
        self.path, self.eval_path, self.path_column = path, eval_path, path_column
        self.label_column, self.eval_label_column = label_column, eval_label_column
        self.label_name_column, self.clean_label_column = label_name_column, clean_label_column
        self.id_column, self.limit, self.root = id_column, limit, root

    def _part(self, file: Path, part: int, split: Optional[str], label_column: str) -> pd.DataFrame:
        try:
            # short rows leave NaN even without NA parsing: "" keeps every cell text
            df = pd.read_csv(file, dtype=str, keep_default_na=False, nrows=self.limit).fillna("")
        except (ValueError, OSError, csv.Error) as exc:  # parser errors, not UTF-8, empty, unreadable
            raise DataError(f"{shown(str(file))}: not a readable CSV manifest ({type(exc).__name__}: "
                            f"{shown(str(exc))})") from None
        names = list(df.columns)
        path_col = self.path_column or "path"
        if path_col not in names:
            raise _missing_column(file, path_col, "path_column", names)
        if label_column not in names:
            raise _missing_column(file, label_column, "eval_label_column" if part else "label_column", names)
        id_col = self.id_column or ("id" if "id" in names else None)
        if id_col and id_col not in names:
            raise _missing_column(file, id_col, "id_column", names)
        if self.clean_label_column and self.clean_label_column not in names and part == 0:
            raise _missing_column(file, self.clean_label_column, "clean_label_column", names)

        def text(c: Optional[str]) -> Optional[list]:
            if not c or c not in names:
                return None
            return [v.strip() or None for v in df[c].tolist()]

        n = len(df)
        paths = df[path_col].tolist()
        checked = [check_path(p, file.parent) for p in paths]
        ids = text(id_col) or [None] * n
        source = [p if p.strip() else f"{file.name}#row={i}" for i, p in enumerate(paths)]
        return make_frame(
            n, part=part, split=split, source=source,
            key=[s if v is None else f"{file.name}#id={v}" for s, v in zip(source, ids)],
            source_id=ids, label=text(label_column), label_clean=text(self.clean_label_column),
            label_name=text(self.label_name_column),
            file=[c[0] for c in checked], reason=[c[1] for c in checked], detail=[c[2] for c in checked],
        )
