"""Shard bookkeeping of the embed stage: fingerprints, the fitted-state cache and the final assembly.

A shard folder ``artifacts/embed/shards/<fingerprint>/`` holds ``state.safetensors`` (the embedder's
fitted state, see :meth:`dataopt.embed.base.Embedder.get_state`) and ``shard_<i>.npy`` (float16 rows
``[i * shard_size, (i + 1) * shard_size)``). Every file is written atomically (temp file + rename), so a
file that exists is complete: a killed run resumes by skipping the shards that exist. The fingerprint
hashes everything the vectors depend on, so a shard is only ever reused for the same inputs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dataopt.errors import DataError
from dataopt.io import atomic_path, reserve, load_npy

STATE_FILE = "state.safetensors"
_META_KEY = "dataopt"


def fingerprint(parts: dict[str, Any]) -> str:
    """A 16-hex-digit digest of ``parts`` (canonical JSON: sorted keys, no whitespace)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in blocks of ``shard_size`` (the last may be short)."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.npy"


def save_state(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` (name -> numpy array) and JSON ``meta`` as one safetensors file, atomically."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(arrays, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def load_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`save_state`."""
    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return arrays, meta


def assemble(shards: Sequence[Path], out: Path, n: int) -> np.ndarray:
    """Concatenate the float16 shard files into ``out`` (``.npy``) without holding them all in memory.

    The rows are copied into an ``np.lib.format.open_memmap`` of a temp file beside ``out``, which is
    renamed over ``out`` once complete.

    Parameters
    ----------
    shards : paths of ``(rows_i, d)`` float16 ``.npy`` files, in row order
    out : destination ``.npy``
    n : expected total rows

    Returns
    -------
    (n, d) float16 read-only memory map of ``out``.
    """
    first = load_npy(shards[0])
    d = first.shape[1]
    rows = 0
    with atomic_path(out, suffix=".npy", size=n * d * 2) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        reserve(tmp)  # blocks allocated now: a full disk is a message, not a SIGBUS in the copy
        for path in shards:
            block = load_npy(path)
            if block.dtype != np.float16 or block.ndim != 2 or block.shape[1] != d or rows + len(block) > n:
                raise DataError(f"{path}: unexpected shard {block.dtype} {block.shape}; delete the folder "
                                f"{Path(path).parent} and rerun the 'embed' stage")
            dst[rows : rows + len(block)] = block
            rows += len(block)
        if rows != n:
            raise DataError(f"shards in {Path(shards[0]).parent} hold {rows} rows, expected {n}")
        dst.flush()
        del dst
    return load_npy(out)
