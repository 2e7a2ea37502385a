"""Ready-made demo batches for the built-in digits dataset, so the continuous loop can be shown on a
fresh clone without downloads: ``dataopt batch add --demo clean|corrupted|noisy-labels``.

A demo batch is a Parquet file of PNG bytes (``image``), integer ``label`` and ``id``: rows drawn
from scikit-learn's digits (seeded), then, for ``corrupted``, Gaussian noise at CIFAR-10-C
severity 5 (:func:`dataopt.drift.shifts.corrupt`), for ``noisy-labels``, 30 % of the labels flipped
to another class (:func:`dataopt.drift.shifts.raise_label_noise`).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits

from dataopt.drift.shifts import corrupt, raise_label_noise

DEMOS = ("clean", "corrupted", "noisy-labels")
CORRUPTION = ("gaussian_noise", 5)
NOISE = 0.3
# how `batch add` reads a demo file (the batch's columns in data/manifest.json)
DEMO_COLUMNS = {"label_column": "label", "image_column": "image", "id_column": "id", "label_name_column": None,
                "path_column": None, "clean_label_column": None}


def demo_batch(kind: str, out: Path, rows: int = 400, seed: int = 0) -> Path:
    """Write demo batch ``kind`` to the Parquet file ``out``; returns ``out``."""
    if kind not in DEMOS:
        raise ValueError(f"unknown demo {kind!r}; valid: {', '.join(DEMOS)}")
    rng = np.random.default_rng(seed)
    d = load_digits()
    idx = np.sort(rng.choice(len(d.target), size=min(rows, len(d.target)), replace=False))
    grey = np.rint(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)
    images, labels = np.repeat(grey[..., None], 3, axis=3), d.target[idx].astype(np.int64)
    if kind == "corrupted":
        images = corrupt(images, CORRUPTION[0], CORRUPTION[1], rng)
    elif kind == "noisy-labels":
        labels, _ = raise_label_noise(labels, NOISE, 10, rng)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table({"id": [f"digits-{i}" for i in idx], "image": pa.array(pngs, pa.binary()),
                      "label": pa.array(labels, pa.int64())})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out
