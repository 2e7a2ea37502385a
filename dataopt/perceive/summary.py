"""Category- and corpus-level perception (survey 000 §V-A granularities) from the per-sample signals."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa


def class_table(labels: np.ndarray, label_names: dict[int, str], correct_last: np.ndarray,
                center_distance: np.ndarray) -> pa.Table:
    """One row per class present among the train rows.

    Parameters
    ----------
    labels : (n,) int64 given labels of the train rows
    label_names : label -> name
    correct_last : (n,) bool out-of-fold correctness at the last epoch
    center_distance : (n,) float class_center_distance signal

    Returns
    -------
    Table: label, label_name, count, share, oof_accuracy, compactness (mean class_center_distance).
    """
    classes, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    acc = np.bincount(inv, weights=correct_last.astype(np.float64)) / counts
    compact = np.bincount(inv, weights=center_distance.astype(np.float64)) / counts
    return pa.table({
        "label": pa.array(classes, pa.int64()),
        "label_name": pa.array([label_names.get(int(c), str(int(c))) for c in classes], pa.string()),
        "count": pa.array(counts, pa.int64()),
        "share": pa.array(counts / counts.sum(), pa.float64()),
        "oof_accuracy": pa.array(acc, pa.float64()),
        "compactness": pa.array(compact, pa.float64()),
    })


def corpus_summary(labels: np.ndarray, duplicate_of_mask: np.ndarray, correct_last: np.ndarray,
                   label_clean: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Corpus-level numbers of the train rows.

    Parameters
    ----------
    labels : (n,) int64
    duplicate_of_mask : (n,) bool, the row is an exact duplicate of an earlier one
    correct_last : (n,) bool
    label_clean : (n,) float with NaN where unknown, or None; gives ``known_noise_rate``.
    """
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    out = {
        "n_train": int(len(labels)),
        "n_classes": int(len(counts)),
        "imbalance_ratio": float(counts.max() / counts.min()),
        "duplicate_rate": float(duplicate_of_mask.mean()),
        "oof_accuracy": float(correct_last.mean()),
    }
    if label_clean is not None:
        known = ~np.isnan(label_clean)
        if known.any():
            # the share of rows whose given label differs from the known clean one (injected noise)
            out["known_noise_rate"] = float((labels[known] != label_clean[known]).mean())
    return out
