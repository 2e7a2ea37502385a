"""The analyze step as one call: a label-noise detector on the perceived signals -> p_clean, label
issues, outlier and near-duplicate flags, the noise transition matrix, and the data behind the plots.

:func:`analyze` is what the analyze stage runs between reading and writing, and what the benchmarks
call; it takes arrays, DataFrames and the ``analyze`` params section, never paths.
:func:`write_plots` draws an :class:`AnalysisResult`'s plots.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from dataopt.analyze import report
from dataopt.analyze.base import LazyInputs, agreement_gate, arrow_table, fit_method
from dataopt.analyze.confident import ConfidentLearning
from dataopt.analyze.mixture import LossMixture
from dataopt.errors import DataError
from dataopt.io import write_json
from dataopt.registry import DETECTORS, get_params
from dataopt.schema import ANALYSIS_COLUMNS

# extra analysis.parquet columns after ANALYSIS_COLUMNS (the contract optimize reads)
FLAG_COLUMNS = {"p_clean_mixture": "float64", "outlier_score": "float64", "is_outlier": "bool",
                "nearest_distance": "float64", "is_near_duplicate": "bool"}

# what analyze reads of the signal table (every other column is offered to the detector)
SIGNAL_COLUMNS = {"sample_id": "int64", "label": "int64", "loss_early": "float64", "pred_label": "int64"}

NOISE_RATE_DEFINITIONS = {
    "confident_learning": "1 - trace(Q): off-diagonal mass of the calibrated confident "
                          "joint (Northcutt et al. 2021, eq. 3)",
    "cl_mixture": "share of samples flagged (confident-learning pruning AND noisy under "
                  "the loss mixture)",
}


@dataclass
class AnalysisResult:
    """What :func:`analyze` found over the ``n`` train rows.

    Attributes
    ----------
    table : Table, ``ANALYSIS_COLUMNS`` then ``FLAG_COLUMNS`` (analysis.parquet)
    summary : dict (analysis.json)
    metrics : dict, the numbers a run tracks
    plots : dict, what :func:`write_plots` draws
    """

    table: pa.Table
    summary: dict[str, Any]
    metrics: dict[str, Any]
    plots: dict[str, Any]


def outlier_scores(distances: np.ndarray) -> np.ndarray:
    """Robust z-score of the kNN density rho (mean distance to the k neighbours, paper 004).

    ``z = (rho - median) / (1.4826 MAD)`` (the MAD scaled to a Gaussian sigma); large = sparse.

    Parameters
    ----------
    distances : (n, k) float kNN distances

    Returns
    -------
    (n,) float64
    """
    rho = np.asarray(distances, dtype=np.float64).mean(axis=1)
    med = np.median(rho)
    mad = 1.4826 * np.median(np.abs(rho - med))
    if mad <= 0:  # over half the rows share one density: fall back to the standard deviation
        mad = rho.std()
    return (rho - med) / mad if mad > 0 else np.zeros_like(rho)


def detect_label_issues(detector: Any, cfg: Any, signals: pd.DataFrame, labels: np.ndarray
                        ) -> dict[str, Any]:
    """p_clean and the label-issue flags of a fitted ``detector``, after ``cfg.gate``.

    Returns a dict: ``p_mixture`` (the detector's p_clean, clipped), ``p_clean`` (after the gate),
    ``agrees`` (rows the gate called clean), ``suggested`` (the out-of-fold argmax), ``is_issue``,
    ``estimated`` noise rate and ``estimate_how``.
    """
    p_mixture = np.clip(np.asarray(detector.p_clean_, dtype=np.float64), 0.0, 1.0)
    suggested = signals["pred_label"].to_numpy(np.int64)  # argmax of the out-of-fold probabilities
    # the gate's why and its measurement: agreement_gate's docstring; with p_clean weights it took
    # digits test accuracy from 96.2/96.0/95.7 to 98.5/97.2/96.0 at 0/20/40% noise (bench/gate.py)
    if cfg.gate == "agreement":
        p_clean, agrees = agreement_gate(p_mixture, suggested, labels)
    else:
        p_clean, agrees = p_mixture, np.zeros(labels.size, bool)
    if getattr(detector, "flags_own_issues", False):
        # ranking-and-pruning detectors decide the flags themselves; the threshold does not apply
        is_issue = np.asarray(detector.is_label_issue_, bool) & ~agrees
        estimated = float(detector.noise_rate_)
        estimate_how = NOISE_RATE_DEFINITIONS.get(cfg.detector, "the detector's noise_rate_")
    else:
        is_issue = p_clean < cfg.threshold
        estimated = float(np.mean(1.0 - p_clean))
        estimate_how = "mean(1 - p_clean) over train samples, after the gate"
    return {"p_mixture": p_mixture, "p_clean": p_clean, "agrees": agrees, "suggested": suggested,
            "is_issue": is_issue, "estimated": estimated, "estimate_how": estimate_how}


def analyze(signals: pd.DataFrame, probs: np.ndarray, knn_distances: np.ndarray, cfg: Any, seed: int,
            knn_indices: Optional[np.ndarray] = None, label_names: Optional[dict[int, str]] = None,
            label_clean: Optional[np.ndarray] = None, embeddings: Optional[np.ndarray] = None,
            embedding_rows: Optional[np.ndarray] = None) -> AnalysisResult:
    """Fit ``cfg.detector`` and flag label issues, outliers and near duplicates.

    Parameters
    ----------
    signals : DataFrame over the ``n`` train rows: sample_id, label, loss_early, pred_label and any
        other signal a detector reads (a perceive signal table)
    probs : (n, C) float, final-epoch out-of-fold probabilities (checked)
    knn_distances : (n, k >= 1) kNN distances over the train rows; knn_indices : (n, k) or None
    cfg : the ``analyze`` params section; seed : int (the detector's random_state, the plot subsample)
    label_names : label -> class name (default: the label itself)
    label_clean : (n,) float known clean labels (NaN = unknown), or None: detection is scored on the
        known rows
    embeddings : (N, d) embeddings for the projection plot (only the plotted rows are read, so it may
        be memory-mapped), or None (no projection); embedding_rows : (n,) the row of ``embeddings``
        of each train row (default: row i is train row i)

    Returns
    -------
    :class:`AnalysisResult`
    """
    loss = signals["loss_early"].to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        ids = signals["sample_id"].to_numpy()[bad[:5]].tolist()
        raise DataError(f"perceive/signals.parquet: loss_early is missing or not finite for "
                        f"{bad.size} samples (sample_id {ids}...); re-run the perceive stage")
    labels = signals["label"].to_numpy(np.int64)
    sample_id = signals["sample_id"].to_numpy(np.int64)
    knn = {"indices": knn_indices, "distances": knn_distances}
    inputs = LazyInputs({
        "loss": lambda: loss, "labels": lambda: labels, "signals": lambda: signals,
        "probs": lambda: probs, "knn": lambda: knn,
    }, "analyze")
    detector = DETECTORS.build(cfg.detector, cfg.kwargs, random_state=seed)
    fit_method(detector, inputs)
    found = detect_label_issues(detector, cfg, signals, labels)
    p_clean, is_issue, estimated = found["p_clean"], found["is_issue"], found["estimated"]
    score = 1.0 - p_clean

    # outliers: sparse neighbourhoods; near duplicates: a train neighbour (almost) on top
    out_score = outlier_scores(knn_distances)
    is_outlier = out_score > cfg.outlier_z
    nearest = knn_distances[:, 0].astype(np.float64)
    is_dup = nearest <= cfg.duplicate_distance

    table = arrow_table(ANALYSIS_COLUMNS, {
        "sample_id": sample_id, "p_clean": p_clean, "is_label_issue": is_issue,
        "label_issue_score": score, "suggested_label": found["suggested"],
    })
    extra = {"p_clean_mixture": found["p_mixture"], "outlier_score": out_score, "is_outlier": is_outlier,
             "nearest_distance": nearest, "is_near_duplicate": is_dup}
    for name, kind in FLAG_COLUMNS.items():
        table = table.append_column(name, pa.array(extra[name], type=pa.bool_() if kind == "bool"
                                                   else pa.float64()))

    # noise transition matrix from the calibrated confident joint, whatever the detector
    cl = detector if isinstance(detector, ConfidentLearning) else getattr(detector, "cl_", None)
    cl = cl or ConfidentLearning().fit(probs, labels)
    C = probs.shape[1]
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    class_names = [names.get(c, str(c)) for c in range(C)]
    classes = report.per_class(labels, is_issue, names)
    for key, flags in (("n_outliers", is_outlier), ("n_near_duplicates", is_dup)):
        for c, row in report.per_class(labels, flags).items():
            classes[c][key] = row["n_issues"]
    state = detector.summary()
    summary: dict[str, Any] = {
        "detector": cfg.detector,
        "kwargs": get_params(detector),
        "threshold": cfg.threshold if not getattr(detector, "flags_own_issues", False) else None,
        "gate": cfg.gate,
        "n_gated_clean": int(found["agrees"].sum()),
        "n_train": int(labels.size),
        "n_label_issues": int(is_issue.sum()),
        "estimated_noise_rate": estimated,
        "estimated_noise_rate_definition": found["estimate_how"],
        "detector_state": state,
        "confident_joint": {
            "thresholds": cl.thresholds_.round(6).tolist(),
            "counts": cl.confident_joint_.tolist(),
            "index": "[given label, true label]",
            "noise_rate": cl.noise_rate_,
        },
        "transition_matrix": {
            "definition": "T[true, given] = P(given label | true label), from the calibrated "
                          "confident joint of the out-of-fold probabilities; rows sum to 1",
            "classes": class_names,
            "matrix": cl.transition_matrix_.round(6).tolist(),
        },
        "flags": {
            "n_outliers": int(is_outlier.sum()), "outlier_z": cfg.outlier_z,
            "outlier_score": "robust z-score (median, 1.4826 MAD) of the mean distance to the "
                             "k nearest train neighbours (embed/knn.npz)",
            "n_near_duplicates": int(is_dup.sum()), "duplicate_distance": cfg.duplicate_distance,
            "nearest_distance": "embedding distance to the nearest train neighbour",
        },
        "per_class": classes,
        "inputs": inputs.loaded(),
    }
    if isinstance(detector, LossMixture):
        summary["mixture"] = state
    metrics: dict[str, Any] = {"estimated_noise_rate": estimated,
                               "n_label_issues": int(is_issue.sum()),
                               "n_outliers": int(is_outlier.sum()),
                               "n_near_duplicates": int(is_dup.sum())}

    known = np.zeros(labels.size, bool) if label_clean is None else ~np.isnan(label_clean)
    if known.any():
        truth = labels[known] != label_clean[known].astype(np.int64)
        quality = report.detection_quality(truth, is_issue[known], score[known], estimated)
        summary["detection"] = {"n_scored": int(known.sum()), **quality}
        metrics.update({f"detection_{k}": v for k, v in quality.items()})

    mixture = detector if isinstance(detector, LossMixture) else getattr(detector, "mixture_", None)
    if mixture is not None:
        x, loss_name = mixture.normalised_, getattr(detector, "loss", "loss_early")
        threshold_loss = (mixture.threshold_loss(cfg.threshold) if mixture is detector
                          else mixture.threshold_loss(0.5))
    else:  # no mixture: min-max of the early loss clipped at its 99th percentile, histogram only
        lo, hi = loss.min(), np.quantile(loss, 0.99)
        x = (np.clip(loss, lo, hi) - lo) / max(hi - lo, 1e-12)
        loss_name, threshold_loss = "loss_early", float("nan")
    summary["threshold_normalised_loss"] = threshold_loss if np.isfinite(threshold_loss) else None
    plots: dict[str, Any] = {
        "detector": cfg.detector, "mixture": mixture, "loss_name": loss_name, "threshold_loss": threshold_loss,
        "loss_hist": report.loss_histogram(x, is_issue, mixture), "classes": classes,
        "class_names": class_names, "transition_matrix": cl.transition_matrix_,
    }
    if embeddings is not None:
        pick = report.subsample(labels.size, cfg.plot_points, seed)
        rows = pick if embedding_rows is None else np.asarray(embedding_rows)[pick]
        plots.update({"xy": report.projection(np.asarray(embeddings[rows], dtype=np.float64)),
                      "category": report.flag_category(is_issue, is_outlier, is_dup)[pick],
                      "sample_id": sample_id[pick]})
    return AnalysisResult(table=table, summary=summary, metrics=metrics, plots=plots)


def write_plots(result: AnalysisResult, directory: Path) -> None:
    """The PNG plots of an :class:`AnalysisResult` and the JSON rows behind the DVC plots."""
    p = result.plots
    write_json(directory / "loss_hist.json", p["loss_hist"])
    report.plot_loss_mixture(p["loss_hist"], p["mixture"], p["detector"], p["threshold_loss"],
                             directory / "loss_mixture.png", xlabel=f"normalised {p['loss_name']}")
    write_json(directory / "class_issues.json", [
        {"class": v.get("name", k), "issue_rate": round(v["issue_rate"], 6)}
        for k, v in p["classes"].items()])
    report.plot_class_issues(p["classes"], directory / "class_issues.png")
    if "xy" in p:
        xy = p["xy"]
        write_json(directory / "projection.json", [
            {"pc1": a, "pc2": b, "flag": f, "sample_id": int(i)}
            for a, b, f, i in zip(np.round(xy[:, 0], 5).tolist(), np.round(xy[:, 1], 5).tolist(),
                                  p["category"].tolist(), p["sample_id"].tolist())])
        report.plot_projection(xy, p["category"], directory / "projection.png")
    report.plot_transition_matrix(p["transition_matrix"], p["class_names"], directory / "transition_matrix.png")
