"""Cheap image-statistics drift: a new camera or pipeline changes brightness, contrast, sharpness or
size before any embedder is needed. Each statistic is compared with a two-sample KS test, Bonferroni
across the statistics."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import ks_2samp

from dataopt.drift.result import DriftResult, bonferroni, need, take
from dataopt.registry import DRIFT_TESTS

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 grey
CHUNK = 4096  # images per block (bounds the float copy)


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: ``brightness`` (mean grey, 0-255), ``contrast`` (std of grey) and ``sharpness``
    (variance of the 4-neighbour Laplacian of grey) of uint8 ``(N, H, W[, 3])`` images."""
    out: dict[str, list] = {"brightness": [], "contrast": [], "sharpness": []}
    for start in range(0, len(images), CHUNK):
        x = images[start:start + CHUNK].astype(np.float32)
        grey = x @ LUMA if x.ndim == 4 else x
        lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
               - 4 * grey[:, 1:-1, 1:-1])
        out["brightness"].append(grey.mean((1, 2)))
        out["contrast"].append(grey.std((1, 2)))
        out["sharpness"].append(lap.var((1, 2)))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def _with_sizes(side: Mapping, idx: np.ndarray) -> dict[str, np.ndarray]:
    stats = image_statistics(np.asarray(side["images"])[idx])
    if side.get("sizes") is not None:
        hw = np.asarray(side["sizes"], float)[idx]
        stats["log_area"] = np.log(hw[:, 0] * hw[:, 1])
        stats["aspect"] = hw[:, 1] / hw[:, 0]
    return stats


@DRIFT_TESTS.register("image_stats")
class ImageStats:
    """KS per image statistic (brightness, contrast, sharpness; log area and aspect ratio when both
    sides give ``sizes``), Bonferroni across them. The reference is subsampled to ``max_reference``.
    Effect size: the largest KS distance. Breakdown per statistic: KS distance, p-value, medians."""

    requires = ("images",)

    def __init__(self, *, alpha: float = 0.05, max_reference: int = 5000, random_state: int = 0):
        self.alpha = alpha
        self.max_reference = max_reference
        self.random_state = random_state

    def fit(self, reference: Mapping, batch: Mapping) -> "ImageStats":
        rng = np.random.default_rng(self.random_state)
        n_ref, n_bat = len(need(reference, "images", "reference")), len(need(batch, "images", "batch"))
        sr = _with_sizes(reference, take(np.empty(n_ref), self.max_reference, rng))
        sb = _with_sizes(batch, np.arange(n_bat))
        names = [k for k in sr if k in sb]
        tests = [ks_2samp(sr[k], sb[k]) for k in names]
        d = np.array([t.statistic for t in tests])
        p_stats = np.array([t.pvalue for t in tests])
        p = bonferroni(p_stats)
        worst = int(np.argmax(d))
        change = np.median(sb[names[worst]]) - np.median(sr[names[worst]])
        decision = p <= self.alpha
        why = (f"largest change in {names[worst]} (KS {d[worst]:.3f}, median {change:+.3g}), Bonferroni "
               f"p={p:.3g} over {len(names)} statistics: "
               + ("the images look different" if decision else "alike image statistics"))
        self.result_ = DriftResult("image_stats", float(d.max()), p, float(d.max()), bool(decision), why,
                                   n_ref, n_bat, self.alpha,
                                   {"statistic": names, "ks": d, "p_value": p_stats,
                                    "reference_median": [float(np.median(sr[k])) for k in names],
                                    "batch_median": [float(np.median(sb[k])) for k in names]})
        return self
