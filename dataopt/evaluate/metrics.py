"""Classification metrics on predicted probabilities: accuracy, balanced accuracy, macro F1, ECE, NLL,
and many/medium/few-shot accuracy by training-class size.

Pure numpy functions, vectorised through one confusion matrix; ``y`` are int labels in
``[0, n_classes)`` and ``probs`` rows sum to 1.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """``(n_classes,)`` recall of each class; NaN for a class without true samples."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (as ``sklearn.metrics.balanced_accuracy_score``)."""
    return float(np.nanmean(per_class_accuracy(cm)))


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in ``y_true`` or ``y_pred`` (sklearn's ``average="macro"``)."""
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)  # 2TP + FP + FN
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(np.mean(2 * tp[present] / denom[present]))


def reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins of the top-1 prediction (Guo et al. 2017, section 2).

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (bin 0 also holds 0).

    Returns
    -------
    dict of ``(n_bins,)`` arrays: ``count`` (int64), ``confidence`` and ``accuracy`` (bin means,
    NaN for an empty bin), ``lower`` and ``upper`` (bin edges).
    """
    probs = np.asarray(probs, np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, conf, n_bins) / count
        acc = np.bincount(b, correct, n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"count": count, "confidence": mean_conf, "accuracy": acc, "lower": edges[:-1], "upper": edges[1:]}


def ece(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |accuracy_b - confidence_b|`` over equal-width bins.

    Parameters
    ----------
    probs : (N, n_classes) predicted probabilities
    y_true : (N,) int labels
    """
    r = reliability(probs, y_true, n_bins)
    filled = r["count"] > 0
    gap = np.abs(r["accuracy"][filled] - r["confidence"][filled])
    return float(np.sum(r["count"][filled] * gap) / max(1, len(y_true)))


def nll(probs: np.ndarray, y_true: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels, ``-mean(log p[i, y_i])``.

    Pass probabilities from a float64 softmax; ``eps`` only guards ``log(0)``.
    """
    p = np.asarray(probs, np.float64)[np.arange(len(y_true)), np.asarray(y_true, np.int64)]
    return float(-np.mean(np.log(np.maximum(p, eps))))


def classification_report(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict:
    """All of the above at once.

    Returns
    -------
    dict with floats ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``ece``, ``nll``, int ``n``,
    and arrays ``confusion`` (n_classes, n_classes) and ``per_class_accuracy`` (n_classes,).
    """
    probs = np.asarray(probs, np.float64)
    y_true = np.asarray(y_true, np.int64)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), probs.shape[1])
    return {
        "accuracy": float(np.trace(cm) / max(1, len(y_true))),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "ece": ece(probs, y_true, n_bins),
        "nll": nll(probs, y_true),
        "n": int(len(y_true)),
        "confusion": cm,
        "per_class_accuracy": per_class_accuracy(cm),
    }


SHOT_BANDS = ("many", "medium", "few")


def shot_bands(class_counts: np.ndarray, thresholds: tuple[int, int] = (20, 100)) -> np.ndarray:
    """Band of each class by its number of training images (Liu et al. 2019, OLTR, evaluation protocol;
    the many/medium/few-shot columns of paper 001's long-tailed table).

    ``few`` < ``t0`` <= ``medium`` <= ``t1`` < ``many`` for ``thresholds = (t0, t1)``; a class with
    no training image is ``few``.

    Returns
    -------
    (n_classes,) str array of ``"many"``, ``"medium"`` or ``"few"``
    """
    counts = np.asarray(class_counts, np.int64)
    t0, t1 = thresholds
    return np.where(counts > t1, "many", np.where(counts >= t0, "medium", "few"))


def shot_accuracy(per_class_acc: np.ndarray, class_counts: np.ndarray,
                  thresholds: tuple[int, int] = (20, 100)) -> dict:
    """Many/medium/few-shot accuracy: the mean per-class accuracy within each band of :func:`shot_bands`.

    Parameters
    ----------
    per_class_acc : (n_classes,) per-class test accuracy, NaN for a class without test samples
    class_counts : (n_classes,) training images per class
    thresholds : ``(t0, t1)`` with ``t0 <= t1``

    Returns
    -------
    dict
        ``{"shot_bands": "balanced"}`` when every class has as many training images (the bands say
        nothing then); else ``many_shot_accuracy``, ``medium_shot_accuracy``, ``few_shot_accuracy``
        (None for a band without a class that has test samples) and ``n_many``, ``n_medium``,
        ``n_few`` (classes in each band).
    """
    acc = np.asarray(per_class_acc, np.float64)
    counts = np.asarray(class_counts, np.int64)
    if counts.shape != acc.shape:
        raise ValueError(f"class_counts {counts.shape} and per_class_acc {acc.shape} differ")
    if counts.size == 0 or counts.max() == counts.min():
        return {"shot_bands": "balanced"}
    band = shot_bands(counts, thresholds)
    out: dict = {}
    for b in SHOT_BANDS:
        a = acc[(band == b) & ~np.isnan(acc)]
        out[f"{b}_shot_accuracy"] = float(a.mean()) if a.size else None
    out.update({f"n_{b}": int((band == b).sum()) for b in SHOT_BANDS})
    return out
