"""The data contract between stages: which columns each table has and which keys each JSON carries.

``sample_id`` (int64, stable across stages and versions) keys every per-sample table. ``samples.parquet``
holds every sample of every split; row i of ``images.npy`` and ``embeddings.npy`` is row i of
``samples.parquet``. Per-sample tables of later stages (signals, analysis, plan) cover the ``train``
split, in ``samples.parquet`` order of the train rows.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from dataopt.errors import DataError, MissingArtifactError

# HOLDOUT: the seeded share of each added batch (``ingest.batch_holdout``) kept out of training so the
# retrain flow can score champion and challenger on the new data; TEST stays the reference's held-out
# split alone (the frozen evaluation set, evaluate's headline), so runs with and without batches compare
TRAIN, TEST, HOLDOUT = "train", "test", "holdout"

SAMPLES_COLUMNS = {
    "sample_id": "int64",  # stable hash of (split, source reference)
    "split": "string",  # "train" | "test" (the reference's held-out rows) | "holdout" (a batch's held-out rows)
    "label": "int64",  # the label trained on (params ingest.label_column, after injected noise)
    "label_name": "string",
    "label_clean": "int64",  # ground truth where known (clean column or pre-noise label), else null
    "source": "string",  # file path relative to the dataset root, or "file.parquet#row=12"
    "source_id": "string",  # the source's own id (id column), if any
    "orig_height": "int64",
    "orig_width": "int64",
    "orig_mode": "string",  # PIL mode before conversion to RGB
    "note": "string",  # conversions applied ("converted from CMYK", "resized from 64x64"), or ""
    "content_hash": "string",  # sha1 of the stored uint8 pixels
    "duplicate_of": "int64",  # sample_id of the first exact duplicate, or null
    "batch": "string",  # "reference" (the ingest source), or the name of the batch it came from
}

QUARANTINE_COLUMNS = {
    "source": "string",
    "source_id": "string",
    "split": "string",
    "reason": "string",  # one of QUARANTINE_REASONS
    "detail": "string",  # the readable message
    "batch": "string",  # "reference" or the batch name
}

QUARANTINE_REASONS = (
    "missing_file",
    "empty_file",
    "not_an_image",
    "truncated_image",
    "corrupt_image",
    "decompression_bomb",
    "missing_label",
    "unknown_label",
    "duplicate_id",
    "path_escapes_root",
)

PLAN_COLUMNS = {
    "sample_id": "int64",
    "keep": "bool",
    "weight": "float64",  # loss weight
    "sampling_weight": "float64",  # relative draw probability for a weighted sampler (1 = uniform)
    "augment_magnitude": "float64",  # in [0, 1]; 0 = no augmentation beyond the train default
    "new_label": "int64",  # the label to train on (== label unless relabelled)
    "reason": "string",  # which step decided what, from which signal values
}

ANALYSIS_COLUMNS = {
    "sample_id": "int64",
    "p_clean": "float64",
    "is_label_issue": "bool",
    "label_issue_score": "float64",  # higher = more likely mislabeled
    "suggested_label": "int64",
}

# artifact files per stage (relative to artifacts/<stage>/), checked by the contract tests
ARTIFACTS = {
    "ingest": ("samples.parquet", "images.npy", "quarantine.parquet", "report.json", "metrics.json"),
    "embed": ("embeddings.npy", "knn.npz", "meta.json", "metrics.json"),
    "perceive": ("signals.parquet", "dynamics.npz", "classes.parquet", "corpus.json", "metrics.json"),
    "analyze": ("analysis.parquet", "analysis.json", "metrics.json"),
    "optimize": ("plan.parquet", "plan.json", "metrics.json"),
    "train": ("model/model.safetensors", "model/config.json", "history.json", "metrics.json"),
    "evaluate": ("metrics.json",),
}


def require(path: Path, stage: str) -> Path:
    """Return ``path`` or raise a readable error naming the stage that produces it."""
    if not path.exists():
        raise MissingArtifactError(
            f"{path} is missing: run the {stage!r} stage first (dataopt stage {stage})"
        )
    return path


def check_columns(path: Path, columns: dict[str, str]) -> None:
    """Raise DataError naming the file and the missing columns."""
    names = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
