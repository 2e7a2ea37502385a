"""Shared fixtures: a small ingested project built from scikit-learn digits, written like ingest does."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits

from dataopt.io import save_npy, write_parquet
from dataopt.paths import Paths
from dataopt.schema import SAMPLES_COLUMNS

_ARROW = {"int64": pa.int64(), "string": pa.string()}


def write_digits_ingested(
    root: Path, n: int = 600, test_fraction: float = 0.2, noise_rate: float = 0.0, seed: int = 0
) -> Paths:
    """Write ``artifacts/ingest/{samples.parquet, images.npy}`` for the first ``n`` digits under ``root``.

    Images are the 8x8 grey digits scaled to uint8 and repeated to RGB, ``(n, 8, 8, 3)``.
    ``sample_id`` is ``arange(n)``; the split is a seeded shuffle with ``test_fraction`` test rows.
    With ``noise_rate`` > 0 that share of the train rows get a different random label in ``label``;
    ``label_clean`` keeps the true one (as ingest does for injected noise).
    """
    digits = load_digits()
    grey = np.round(digits.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    clean = digits.target[:n].astype(np.int64)
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    split[rng.permutation(n)[: int(round(test_fraction * n))]] = "test"
    label = clean.copy()
    train_idx = np.flatnonzero(split == "train")
    flip = rng.choice(train_idx, int(round(noise_rate * len(train_idx))), replace=False)
    label[flip] = (clean[flip] + rng.integers(1, 10, len(flip))) % 10  # always a different class
    hashes = [hashlib.sha1(img.tobytes()).hexdigest() for img in images]
    first: dict[str, int] = {}
    duplicate_of = []  # sample_id of the first identical image, as ingest records it
    for i, h in enumerate(hashes):
        duplicate_of.append(first.get(h))
        first.setdefault(h, i)
    data = {
        "sample_id": np.arange(n, dtype=np.int64),
        "split": split.tolist(),
        "label": label,
        "label_name": [str(v) for v in label],
        "label_clean": clean,
        "source": [f"sklearn_digits#row={i}" for i in range(n)],
        "source_id": [str(i) for i in range(n)],
        "orig_height": np.full(n, 8, dtype=np.int64),
        "orig_width": np.full(n, 8, dtype=np.int64),
        "orig_mode": ["L"] * n,
        "note": ["converted from L"] * n,
        "content_hash": hashes,
        "duplicate_of": duplicate_of,
    }
    schema = pa.schema([(c, _ARROW[t]) for c, t in SAMPLES_COLUMNS.items()])
    paths = Paths.at(root)
    write_parquet(paths.stage("ingest") / "samples.parquet", pa.table(data, schema=schema))
    save_npy(paths.stage("ingest") / "images.npy", images)
    return paths


@pytest.fixture
def digits_ingested(tmp_path: Path) -> Paths:
    """A project in ``tmp_path`` with ingest outputs for 600 digits (480 train, 120 test, clean labels)."""
    return write_digits_ingested(tmp_path)


@pytest.fixture(scope="session")
def digits_writer():
    """:func:`write_digits_ingested` itself, for module-scoped fixtures (``digits_writer(root, n=...)``)."""
    return write_digits_ingested
