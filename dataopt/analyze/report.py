"""Summaries and plots of a label-issue analysis: per class, against ground truth, loss histogram."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from sklearn.metrics import (average_precision_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from dataopt.io import atomic_path


def per_class(labels: np.ndarray, is_issue: np.ndarray,
              names: Optional[dict[int, str]] = None) -> dict[str, dict[str, Any]]:
    """``{label: {n, n_issues, issue_rate[, name]}}`` (keys are str for JSON).

    Parameters
    ----------
    labels : (n,) int
    is_issue : (n,) bool
    names : optional mapping label -> class name
    """
    classes, inverse = np.unique(labels, return_inverse=True)
    n = np.bincount(inverse, minlength=classes.size)
    k = np.bincount(inverse, weights=is_issue.astype(np.float64), minlength=classes.size)
    out: dict[str, dict[str, Any]] = {}
    for c, nc, kc in zip(classes.tolist(), n.tolist(), k.astype(int).tolist()):  # one per class
        out[str(c)] = {"n": nc, "n_issues": kc, "issue_rate": kc / nc}
        if names and c in names:
            out[str(c)]["name"] = names[c]
    return out


def detection_quality(is_noisy: np.ndarray, is_issue: np.ndarray, score: np.ndarray,
                      estimated_noise_rate: float) -> dict[str, float]:
    """Flags and scores against the truth ``is_noisy = label != label_clean``.

    Parameters
    ----------
    is_noisy : (n,) bool
        Ground truth.
    is_issue : (n,) bool
        The detector's flags.
    score : (n,) float
        Higher = more likely mislabeled (for AUROC).
    estimated_noise_rate : float

    Returns
    -------
    dict with true_noise_rate, estimated_noise_rate, n_flagged, precision, recall, f1,
    noise_rate_error, and auroc and average_precision when both clean and noisy samples exist
    (they are undefined otherwise).
    """
    true_rate = float(np.mean(is_noisy))
    out = {
        "true_noise_rate": true_rate,
        "estimated_noise_rate": float(estimated_noise_rate),
        "n_flagged": int(np.sum(is_issue)),
        "precision": float(precision_score(is_noisy, is_issue, zero_division=0)),
        "recall": float(recall_score(is_noisy, is_issue, zero_division=0)),
        "f1": float(f1_score(is_noisy, is_issue, zero_division=0)),
        "noise_rate_error": abs(estimated_noise_rate - true_rate),
    }
    if 0 < is_noisy.sum() < is_noisy.size:
        out["auroc"] = float(roc_auc_score(is_noisy, score))
        out["average_precision"] = float(average_precision_score(is_noisy, score))
    return out


def loss_histogram(x: np.ndarray, is_issue: np.ndarray, mixture: Any = None,
                   bins: int = 40) -> list[dict[str, float]]:
    """Rows for a DVC plot: per bin of normalised loss, counts flagged / not and component densities.

    Parameters
    ----------
    x : (n,) float normalised loss in [0, 1]
    is_issue : (n,) bool flags
    mixture : fitted loss mixture (``component_density``) or None (no density columns)

    Returns
    -------
    list of dict with keys bin (centre), count, count_clean, count_flagged, density (of all samples),
    and with a mixture density_clean, density_noisy (fitted weighted component densities).
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    count = np.histogram(x, edges)[0]
    flagged = np.histogram(x[is_issue], edges)[0]
    density = count / (x.size * (edges[1] - edges[0]))
    cols = {
        "bin": centres, "count": count, "count_clean": count - flagged, "count_flagged": flagged,
        "density": density,
    }
    if mixture is not None:
        comp = mixture.component_density(centres)
        cols.update(density_clean=comp[:, 0], density_noisy=comp[:, 1])
    return [dict(zip(cols, row)) for row in zip(*(np.round(v, 6).tolist() for v in cols.values()))]


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def plot_loss_mixture(rows: list[dict[str, float]], detector: Any, detector_name: str,
                      threshold_loss: float, path: Path,
                      xlabel: str = "normalised early-epoch loss") -> None:
    """Histogram of normalised loss (flagged stacked on clean) with the fitted component densities.

    ``rows`` come from :func:`loss_histogram`; ``detector`` is the fitted mixture (its densities are
    drawn on a fine grid), or None for a detector without one (histogram only).
    """
    # Figure (not pyplot): renders with the Agg canvas without touching global matplotlib state.
    from matplotlib.figure import Figure  # why: matplotlib is slow to import and only plots need it

    centres = np.array([r["bin"] for r in rows])
    width = centres[1] - centres[0] if centres.size > 1 else 1.0
    n = sum(r["count"] for r in rows)
    scale = 1.0 / (n * width)  # counts -> density, so bars and fitted curves share the y axis
    clean = np.array([r["count_clean"] for r in rows]) * scale
    flagged = np.array([r["count_flagged"] for r in rows]) * scale
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.bar(centres, clean, width=width, color="#8fb3d9", label="not flagged")
    ax.bar(centres, flagged, width=width, bottom=clean, color="#e8a07e", label="flagged")
    grid = np.linspace(0.0, 1.0, 400)
    dens = detector.component_density(grid) if detector is not None else np.zeros((1, 2))
    if detector is not None:
        ax.plot(grid, dens[:, 0], color="#1f4e8c", label="clean component")
        ax.plot(grid, dens[:, 1], color="#b2401c", label="noisy component")
    if np.isfinite(threshold_loss):
        ax.axvline(threshold_loss, color="k", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlim(0.0, 1.0)
    # a Beta density can be unbounded at 0 or 1; scale the y axis to the histogram, not the spike
    ax.set_ylim(0.0, 1.2 * max(float((clean + flagged).max()), float(np.quantile(dens, 0.9))))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(f"{detector_name}: loss histogram" + (" and mixture" if detector is not None else ""))
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_class_issues(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Bar chart of the per-class issue rate."""
    from matplotlib.figure import Figure  # why: matplotlib is slow to import and only plots need it

    labels = [v.get("name", k) for k, v in summary.items()]
    rates = [v["issue_rate"] for v in summary.values()]
    fig = Figure(figsize=(max(5, 0.5 * len(labels) + 2), 4))
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), rates, color="#e8a07e")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right")
    ax.set_ylabel("share flagged as label issue")
    ax.set_ylim(0, max(rates + [0.05]) * 1.15)
    ax.set_title("label issues per class")
    _save(fig, path)


FLAG_COLOURS = {"clean": "#8fb3d9", "near duplicate": "#6a9f4b", "outlier": "#9b59b6",
                "label issue": "#d9534f"}


def flag_category(is_issue: np.ndarray, is_outlier: np.ndarray,
                  is_duplicate: np.ndarray) -> np.ndarray:
    """One category per sample for the projection plot ``(n,)`` str; a label issue wins over an
    outlier, an outlier over a near duplicate."""
    return np.select([is_issue, is_outlier, is_duplicate],
                     ["label issue", "outlier", "near duplicate"], "clean")


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted positions ``(min(n, max_points),)`` int64 of a seeded subsample of ``range(n)``."""
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)).astype(np.int64)


def projection(embeddings: np.ndarray) -> np.ndarray:
    """PCA 2-D projection: ``(m, d)`` -> ``(m, 2)`` coordinates on the first two principal axes.

    Exact SVD of the centred rows (the caller subsamples to a few thousand rows first).
    """
    z = np.asarray(embeddings, dtype=np.float64)
    z = z - z.mean(axis=0)
    out = np.zeros((len(z), 2))
    if len(z) < 2 or z.shape[1] < 1:
        return out
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    xy = z @ vt[:2].T
    out[:, : xy.shape[1]] = xy
    # fix the sign of each axis (SVD's is arbitrary across platforms): largest |coordinate| positive
    flip = np.sign(out[np.abs(out).argmax(axis=0), [0, 1]])
    return out * np.where(flip == 0, 1.0, flip)


def plot_projection(xy: np.ndarray, category: np.ndarray, path: Path) -> None:
    """Scatter of the 2-D projection coloured by flag category (label issues drawn last, on top)."""
    from matplotlib.figure import Figure  # why: matplotlib is slow to import and only plots need it

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    for cat, colour in FLAG_COLOURS.items():
        m = category == cat
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=4 if cat == "clean" else 8, c=colour,
                       label=f"{cat} ({int(m.sum())})", alpha=0.6 if cat == "clean" else 0.9,
                       linewidths=0)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"embeddings, PCA 2-D ({len(xy)} points)")
    ax.legend(fontsize=8, markerscale=2)
    _save(fig, path)


def plot_transition_matrix(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Heatmap of ``T[true, given] = P(given label | true label)`` with the values written in."""
    from matplotlib.figure import Figure  # why: matplotlib is slow to import and only plots need it

    C = len(matrix)
    fig = Figure(figsize=(max(4, 0.6 * C + 2), max(3.5, 0.55 * C + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    if C <= 20:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    ax.set_xticks(range(C), names, rotation=45 if C > 6 else 0, ha="right")
    ax.set_yticks(range(C), names)
    ax.set_xlabel("given label")
    ax.set_ylabel("true label (estimated)")
    ax.set_title("noise transition P(given | true)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)
