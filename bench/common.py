"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this folder is on
``sys.path``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog is its
    ``Examples`` section, with ``--data`` defaulting to ``../shared/datasets/cifar10``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc[doc.index("Examples"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=CIFAR10,
                    help="CIFAR-10N folder (train.parquet, test.parquet)")
    return ap


def dynamics_file(directory: Path, label_column: str, seed: int) -> Path:
    """Where ``bench/noise.py --save-dynamics`` writes (and ``--from-dynamics`` / ``bench/selection.py
    --dynamics`` read) one run's out-of-fold dynamics."""
    return Path(directory) / f"{label_column}_s{seed}.npz"


DYNAMICS_FORMAT = 1  # of the files bench/noise.py --save-dynamics writes


def read_dynamics(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta (JSON) and the arrays of a ``bench/noise.py --save-dynamics`` file; a missing file or
    one of another format exits with a message naming it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found (write it with bench/noise.py --save-dynamics)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != DYNAMICS_FORMAT:
        raise SystemExit(f"{path}: dynamics format {meta.get('format')} is not {DYNAMICS_FORMAT}; "
                         "re-save it with bench/noise.py --save-dynamics")
    return meta, arrays


def unshuffle16(planes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` from the float16 byte planes ``bench/noise.py`` stores."""
    return np.ascontiguousarray(planes.T).view(np.float16).reshape(shape).astype(np.float32)


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row positions of a class-stratified subset of ``n`` rows (all rows when n = 0)."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    take[: n - take.sum()] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(rows))
