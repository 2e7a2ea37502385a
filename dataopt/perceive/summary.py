"""Category- and corpus-level perception (survey 000 §V-A granularities) from the per-sample signals."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from dataopt.perceive.diversity import vendi_score

NOISE_RATE_METHOD = (
    "confident joint (Northcutt et al. 2021) on the final out-of-fold probabilities: threshold t_c = mean "
    "p(c) over the rows labelled c; a row counts under (label, argmax of the classes whose p(c) >= t_c) "
    "when any class passes; rows rescaled to the label counts; rate = 1 - trace / n"
)


def class_table(labels: np.ndarray, label_names: dict[int, str], correct_last: np.ndarray,
                center_distance: np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """One row per class present among the train rows.

    Parameters
    ----------
    labels : (n,) int64 given labels of the train rows
    label_names : label -> name
    correct_last : (n,) bool out-of-fold correctness at the last epoch
    center_distance : (n,) float class_center_distance signal
    embeddings : (n, d) float train-row embeddings

    Returns
    -------
    Table: label, label_name, count, share, oof_accuracy, compactness (mean class_center_distance),
    diversity (Vendi score of the class's embeddings, cosine kernel: effective number of distinct samples).
    """
    classes, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    acc = np.bincount(inv, weights=correct_last.astype(np.float64)) / counts
    compact = np.bincount(inv, weights=center_distance.astype(np.float64)) / counts
    order = np.argsort(inv, kind="stable")  # rows grouped by class, one slice each
    bounds = np.concatenate([[0], np.cumsum(counts)])
    diversity = [vendi_score(embeddings[order[bounds[c]:bounds[c + 1]]]) for c in range(len(classes))]
    return pa.table({
        "label": pa.array(classes, pa.int64()),
        "label_name": pa.array([label_names.get(int(c), str(int(c))) for c in classes], pa.string()),
        "count": pa.array(counts, pa.int64()),
        "share": pa.array(counts / counts.sum(), pa.float64()),
        "oof_accuracy": pa.array(acc, pa.float64()),
        "compactness": pa.array(compact, pa.float64()),
        "diversity": pa.array(diversity, pa.float64()),
    })


def confident_joint_noise_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    """Estimated share of mislabeled rows from out-of-fold probabilities (see ``NOISE_RATE_METHOD``).

    Parameters
    ----------
    probs : (n, C) float out-of-fold class probabilities
    labels : (n,) int64 given labels in ``[0, C)``

    Returns
    -------
    float in [0, 1]
    """
    p = np.asarray(probs, np.float64)
    n, n_classes = p.shape
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    # per-class threshold: the mean self-confidence of the rows labelled c (inf: nobody labelled c)
    thr = np.full(n_classes, np.inf)
    present = counts > 0
    thr[present] = (np.bincount(labels, weights=p[np.arange(n), labels], minlength=n_classes)[present]
                    / counts[present])
    above = p >= thr[None, :]
    guess = np.where(above, p, -1.0).argmax(1)
    has = above.any(1)
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (labels[has], guess[has]), 1.0)
    rows = joint.sum(1)
    # calibrate each label's row to its count (a row with no confident sample counts as clean)
    calibrated = np.where(rows[:, None] > 0, joint / np.maximum(rows, 1)[:, None] * counts[:, None],
                          np.diag(counts))
    return float(1.0 - np.trace(calibrated) / n)


def corpus_summary(labels: np.ndarray, duplicate_of_mask: np.ndarray, correct_last: np.ndarray,
                   probs: np.ndarray, label_clean: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Corpus-level numbers of the train rows.

    Parameters
    ----------
    labels : (n,) int64
    duplicate_of_mask : (n,) bool, the row is an exact duplicate of an earlier one
    correct_last : (n,) bool
    probs : (n, C) float final out-of-fold probabilities (for ``estimated_noise_rate``)
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
        "estimated_noise_rate": confident_joint_noise_rate(probs, labels),
        "estimated_noise_rate_method": NOISE_RATE_METHOD,
    }
    if label_clean is not None:
        known = ~np.isnan(label_clean)
        if known.any():
            # the share of rows whose given label differs from the known clean one (injected noise)
            out["known_noise_rate"] = float((labels[known] != label_clean[known]).mean())
    return out
