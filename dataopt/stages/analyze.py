"""analyze stage: fit a label-noise detector to the perceived signals -> p_clean and label issues,
plus outlier and near-duplicate flags, the noise transition matrix and plots.

Writes ``analysis.parquet`` (``dataopt.schema.ANALYSIS_COLUMNS`` then ``p_clean_mixture`` and the
flag columns of ``FLAG_COLUMNS``; train rows in samples order), ``analysis.json`` (detector and its
fitted state, estimated noise rate and how it was estimated, the confident joint and the noise
transition matrix, flag counts, per-class summary and, when ``label_clean`` is known, detection
quality against it) and ``plots/`` (loss histogram with the fitted mixture, per-class bars, a PCA
projection coloured by flag, the transition-matrix heatmap; the JSON rows behind the DVC plots).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.analyze import report
from dataopt.analyze.base import LazyInputs, agreement_gate, arrow_table, fit_method
from dataopt.analyze.confident import ConfidentLearning, check_probs
from dataopt.analyze.mixture import LossMixture
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import load_npy, write_json, write_parquet
from dataopt.paths import Paths
from dataopt.registry import DETECTORS, get_params
from dataopt.schema import ANALYSIS_COLUMNS, TRAIN, check_columns, require

INPUTS = ("ingest/samples.parquet", "embed/embeddings.npy", "embed/knn.npz",
          "perceive/signals.parquet", "perceive/dynamics.npz")
OUTPUTS = ("analyze/analysis.parquet", "analyze/analysis.json", "analyze/plots")
PARAMS = ("seed", "analyze")

# extra analysis.parquet columns after ANALYSIS_COLUMNS (the contract optimize reads)
FLAG_COLUMNS = {"p_clean_mixture": "float64", "outlier_score": "float64", "is_outlier": "bool",
                "nearest_distance": "float64", "is_near_duplicate": "bool"}

SIGNAL_COLUMNS = {"sample_id": "int64", "label": "int64", "loss_early": "float64",
                  "pred_label": "int64"}


def load_train(paths: Paths, signal_columns: dict[str, str] = SIGNAL_COLUMNS
               ) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Train rows of samples.parquet and signals.parquet, checked to be aligned row by row.

    Parameters
    ----------
    paths : Paths
    signal_columns : mapping
        Columns signals.parquet must have (a DataError names the missing ones).

    Returns
    -------
    samples : DataFrame (n_train rows): sample_id, label, label_name, label_clean, and ``row``
        (the position in samples.parquet, i.e. the row of embeddings.npy)
    signals : DataFrame (n_train rows), every signal column
    n_samples : int
        Rows of samples.parquet (both splits).
    """
    samples_path = require(paths.artifacts / "ingest" / "samples.parquet", "ingest")
    signals_path = require(paths.artifacts / "perceive" / "signals.parquet", "perceive")
    check_columns(signals_path, signal_columns)
    samples = pq.read_table(
        samples_path, columns=["sample_id", "split", "label", "label_name", "label_clean"]
    ).to_pandas()
    n_samples = len(samples)
    samples["row"] = np.arange(n_samples)
    samples = samples[samples["split"] == TRAIN].reset_index(drop=True)
    signals = pd.read_parquet(signals_path)
    ids, sig_ids = samples["sample_id"].to_numpy(), signals["sample_id"].to_numpy()
    if ids.shape != sig_ids.shape or not np.array_equal(ids, sig_ids):
        n = min(ids.size, sig_ids.size)
        first = np.flatnonzero(ids[:n] != sig_ids[:n])
        where = f"first difference at row {first[0]}" if first.size else "different lengths"
        raise DataError(
            f"{signals_path} does not match the {ids.size} train rows of {samples_path} "
            f"({sig_ids.size} rows, {where}); re-run the perceive stage"
        )
    stale = np.flatnonzero(samples["label"].to_numpy() != signals["label"].to_numpy())
    if stale.size:  # same samples, other labels (e.g. new injected noise): signals are out of date
        raise DataError(
            f"{signals_path}: label differs from {samples_path} for {stale.size} train rows "
            f"(first sample_id {ids[stale[0]]}); re-run the perceive stage"
        )
    return samples, signals, n_samples


def _load_probs(paths: Paths, sample_id: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Final-epoch out-of-fold probabilities ``(n, C)`` from perceive/dynamics.npz, checked."""
    path = require(paths.artifacts / "perceive" / "dynamics.npz", "perceive")
    with np.load(path, allow_pickle=False) as z:
        sid, probs = z["sample_id"], z["probs"]
    if not np.array_equal(sid, sample_id):
        raise DataError(f"{path} does not match the train rows of samples.parquet; re-run the "
                        "perceive stage")
    return check_probs(probs, labels)[0]


def _load_knn(paths: Paths, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """embed/knn.npz (indices, distances over the train rows), checked against the train rows."""
    path = require(paths.artifacts / "embed" / "knn.npz", "embed")
    with np.load(path, allow_pickle=False) as z:
        knn = {k: z[k] for k in ("sample_id", "indices", "distances")}
    if not np.array_equal(knn["sample_id"], sample_id):
        raise DataError(f"{path} does not match the train rows of samples.parquet; re-run the "
                        "embed stage")
    if knn["distances"].ndim != 2 or knn["distances"].shape[1] < 1:
        raise DataError(f"{path}: distances must be (n_train, k >= 1); got "
                        f"{knn['distances'].shape}")
    return knn


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


def run(params: Params, paths: Paths) -> dict[str, Any]:
    cfg = params.analyze
    samples, signals, n_samples = load_train(paths)
    loss = signals["loss_early"].to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        ids = signals["sample_id"].to_numpy()[bad[:5]].tolist()
        raise DataError(f"perceive/signals.parquet: loss_early is missing or not finite for "
                        f"{bad.size} samples (sample_id {ids}...); re-run the perceive stage")
    labels = signals["label"].to_numpy(np.int64)
    sample_id = signals["sample_id"].to_numpy(np.int64)
    probs = _load_probs(paths, sample_id, labels)
    knn = _load_knn(paths, sample_id)
    inputs = LazyInputs({
        "loss": lambda: loss, "labels": lambda: labels, "signals": lambda: signals,
        "probs": lambda: probs, "knn": lambda: knn,
    }, "analyze")
    detector = DETECTORS.build(cfg.detector, cfg.kwargs, random_state=params.seed)
    fit_method(detector, inputs)

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
        estimate_how = {
            "confident_learning": "1 - trace(Q): off-diagonal mass of the calibrated confident "
                                  "joint (Northcutt et al. 2021, eq. 3)",
            "cl_mixture": "share of samples flagged (confident-learning pruning AND noisy under "
                          "the loss mixture)",
        }.get(cfg.detector, "the detector's noise_rate_")
    else:
        is_issue = p_clean < cfg.threshold
        estimated = float(np.mean(1.0 - p_clean))
        estimate_how = "mean(1 - p_clean) over train samples, after the gate"
    score = 1.0 - p_clean

    # outliers: sparse neighbourhoods; near duplicates: a train neighbour (almost) on top
    out_score = outlier_scores(knn["distances"])
    is_outlier = out_score > cfg.outlier_z
    nearest = knn["distances"][:, 0].astype(np.float64)
    is_dup = nearest <= cfg.duplicate_distance

    table = arrow_table(ANALYSIS_COLUMNS, {
        "sample_id": sample_id, "p_clean": p_clean, "is_label_issue": is_issue,
        "label_issue_score": score, "suggested_label": suggested,
    })
    extra = {"p_clean_mixture": p_mixture, "outlier_score": out_score, "is_outlier": is_outlier,
             "nearest_distance": nearest, "is_near_duplicate": is_dup}
    for name, kind in FLAG_COLUMNS.items():
        table = table.append_column(name, pa.array(extra[name], type=pa.bool_() if kind == "bool"
                                                   else pa.float64()))
    write_parquet(paths.stage("analyze") / "analysis.parquet", table)

    # noise transition matrix from the calibrated confident joint, whatever the detector
    cl = detector if isinstance(detector, ConfidentLearning) else getattr(detector, "cl_", None)
    cl = cl or ConfidentLearning().fit(probs, labels)
    C = probs.shape[1]
    names = samples.drop_duplicates("label").set_index("label")["label_name"].dropna().to_dict()
    names = {int(k): str(v) for k, v in names.items()}
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
        "n_gated_clean": int(agrees.sum()),
        "n_train": int(labels.size),
        "n_label_issues": int(is_issue.sum()),
        "estimated_noise_rate": estimated,
        "estimated_noise_rate_definition": estimate_how,
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

    known = samples["label_clean"].notna().to_numpy()
    if known.any():
        truth = labels[known] != samples["label_clean"].to_numpy()[known].astype(np.int64)
        quality = report.detection_quality(truth, is_issue[known], score[known], estimated)
        summary["detection"] = {"n_scored": int(known.sum()), **quality}
        metrics.update({f"detection_{k}": v for k, v in quality.items()})

    plots = paths.stage("analyze") / "plots"
    mixture = detector if isinstance(detector, LossMixture) else getattr(detector, "mixture_", None)
    if mixture is not None:
        x, loss_name = mixture.normalised_, getattr(detector, "loss", "loss_early")
        threshold_loss = (mixture.threshold_loss(cfg.threshold) if mixture is detector
                          else mixture.threshold_loss(0.5))
    else:  # no mixture: min-max of the early loss clipped at its 99th percentile, histogram only
        lo, hi = loss.min(), np.quantile(loss, 0.99)
        x = (np.clip(loss, lo, hi) - lo) / max(hi - lo, 1e-12)
        loss_name, threshold_loss = "loss_early", float("nan")
    rows = report.loss_histogram(x, is_issue, mixture)
    write_json(plots / "loss_hist.json", rows)
    report.plot_loss_mixture(rows, mixture, cfg.detector, threshold_loss,
                             plots / "loss_mixture.png", xlabel=f"normalised {loss_name}")
    write_json(plots / "class_issues.json", [
        {"class": v.get("name", k), "issue_rate": round(v["issue_rate"], 6)}
        for k, v in classes.items()])
    report.plot_class_issues(classes, plots / "class_issues.png")

    emb = load_npy(require(paths.artifacts / "embed" / "embeddings.npy", "embed"))
    if len(emb) != n_samples:
        raise DataError(f"embed/embeddings.npy has {len(emb)} rows but samples.parquet has "
                        f"{n_samples}; re-run the embed stage")
    train_rows = samples["row"].to_numpy()
    pick = report.subsample(len(train_rows), cfg.plot_points, params.seed)
    xy = report.projection(np.asarray(emb[train_rows[pick]], dtype=np.float64))
    category = report.flag_category(is_issue, is_outlier, is_dup)[pick]
    write_json(plots / "projection.json", [
        {"pc1": a, "pc2": b, "flag": f, "sample_id": int(i)}
        for a, b, f, i in zip(np.round(xy[:, 0], 5).tolist(), np.round(xy[:, 1], 5).tolist(),
                              category.tolist(), sample_id[pick].tolist())])
    report.plot_projection(xy, category, plots / "projection.png")
    report.plot_transition_matrix(cl.transition_matrix_, class_names,
                                  plots / "transition_matrix.png")
    summary["threshold_normalised_loss"] = threshold_loss if np.isfinite(threshold_loss) else None
    write_json(paths.stage("analyze") / "analysis.json", summary)
    return metrics

