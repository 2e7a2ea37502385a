"""Atomic writes (temp file + rename) and small readers shared by every stage."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataopt.errors import UserError


class DiskError(UserError):
    """A write failed for a reason the user can fix: a full disk, a read-only folder, no permission."""


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
MARGIN = 16 << 20  # bytes kept free beyond a write's known size (metadata, other writers)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def check_space(folder: Path, size: int) -> None:
    """DiskError naming ``folder`` when fewer than ``size`` bytes (plus a margin) are free there."""
    free = shutil.disk_usage(folder).free
    if free < size + MARGIN:
        raise DiskError(f"not enough space in {folder}: this write needs {_mb(size)}, {_mb(free)} free")


def reserve(path: Path) -> None:
    """Allocate ``path``'s blocks now, so that a memory map of it cannot die of SIGBUS on a full disk:
    a full disk is an ENOSPC here instead, which :func:`atomic_path` turns into one message."""
    with open(path, "r+b") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", size: Optional[int] = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, else delete it.

    ``size`` (bytes, when known) is checked against the free space first. A full disk, a read-only
    folder or a missing permission is a :class:`DiskError` naming the path; the temp file never stays.
    """
    path = Path(path)
    tmp_path: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None:
            check_space(path.parent, size)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        _remove(tmp_path)
        if err.errno not in _DISK_ERRNOS:
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise DiskError(f"cannot write {path}: {_DISK_ERRNOS[err.errno]} ({_mb(free)} free there)"
                        ) from None
    except BaseException:
        _remove(tmp_path)
        raise


def _remove(tmp: Optional[Path]) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float (Python or numpy, in dicts, lists, arrays) replaced by None.

    A bare ``NaN`` or ``Infinity`` is not JSON (RFC 8259; e.g. JavaScript's JSON.parse refuses it), so a
    value that is not a number is written as ``null``: "no value", as for an empty bin or a class without
    test samples."""
    if isinstance(obj, float):  # np.float64 included
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if isinstance(obj, np.generic):
        return finite_json(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically; non-finite floats become ``null`` (:func:`finite_json`)."""
    text = json.dumps(finite_json(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | os.PathLike, table: pa.Table | Any) -> None:
    """Write a pyarrow Table (or a pandas DataFrame) atomically."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy", size=int(array.nbytes)) as tmp:
        np.save(tmp, array)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz", size=sum(int(a.nbytes) for a in arrays.values())) as tmp:
        np.savez(tmp, **arrays)


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
