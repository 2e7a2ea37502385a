"""Shift generators for tests and benchmarks: pure functions that return new arrays (the input is
never modified), every random draw from the ``np.random.Generator`` they are given.

Corruptions follow CIFAR-10-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR 2019): the same six kinds at five severities with the
CIFAR parameters of its reference code, on uint8 ``(N, H, W, 3)`` images, through torchvision's v2
functional ops. The sampling generators return row indices of a pool (take them from any aligned
array: images, embeddings, labels).
"""
from __future__ import annotations

import numpy as np
import torch

# severity 1..5 -> parameter (CIFAR-10-C's values)
SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std on [0, 1]
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in px
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
}
CORRUPTIONS = tuple(SEVERITIES)


def corrupt(images: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of uint8 ``(N, H, W, 3)`` ``images``: ``kind`` in :data:`CORRUPTIONS`,
    ``severity`` 1..5 (0: an unchanged copy)."""
    if kind not in SEVERITIES:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be 0..5, got {severity}")
    if severity == 0 or len(images) == 0:
        return images.copy()
    import torchvision.transforms.v2.functional as F  # why: torchvision loads torch._dynamo (1.5 s a start)

    c = SEVERITIES[kind][severity - 1]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) copy
    h, w = x.shape[-2:]
    if kind == "gaussian_noise":
        noise = torch.from_numpy(rng.normal(0.0, c * 255.0, x.shape).astype(np.float32))
        out = (x.float() + noise).round_().clamp_(0, 255).to(torch.uint8)
    elif kind == "gaussian_blur":
        size = 2 * int(np.ceil(3 * c)) + 1
        out = F.gaussian_blur(x.float(), [size, size], [c, c]).round_().clamp_(0, 255).to(torch.uint8)
    elif kind == "contrast":
        out = F.adjust_contrast(x, c)
    elif kind == "brightness":
        # adding c to HSV value, hue and saturation kept, is scaling RGB by min(V + c, 1) / V
        v = x.float().amax(1, keepdim=True) / 255.0
        scale = torch.where(v > 0, (v + c).clamp(max=1.0) / v.clamp(min=1e-6), torch.zeros_like(v))
        out = (x.float() * scale).round_().clamp_(0, 255)
        out = torch.where(v > 0, out, torch.full_like(out, round(c * 255))).to(torch.uint8)  # black -> grey
    elif kind == "jpeg":
        out = F.jpeg(x, quality=int(c))
    else:  # pixelate: downscale and back (antialiased bilinear both ways: at CIFAR's factors near 1,
        # nearest or box upscaling mostly shifts pixels, and the damage stops growing with severity)
        small = F.resize(x, [max(1, int(h * c)), max(1, int(w * c))], antialias=True)
        out = F.resize(small, [h, w], antialias=True)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def no_shift(pool_size: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` rows drawn uniformly without replacement from a pool of ``pool_size``."""
    return rng.choice(pool_size, size=size, replace=False)


def class_prior_shift(labels: np.ndarray, classes, share: float, size: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Indices of a batch of ``size`` rows in which each class in ``classes`` has ``share`` times its
    proportion in ``labels`` (e.g. three classes at a third of their share); the other classes fill
    the rest in their own relative proportions. Rows are drawn without replacement within each class."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    prior = counts / counts.sum()
    dropped = np.isin(values, list(classes))
    rest = prior[~dropped].sum()
    target = np.where(dropped, prior * share, prior * (1 - share * prior[dropped].sum()) / max(rest, 1e-12))
    return _draw(labels, values, _quota(target, size), rng)


def with_new_class(labels: np.ndarray, new_class: int, fraction: float, size: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Indices of a batch of ``size`` rows of which ``round(fraction * size)`` are rows of
    ``new_class`` (a class held out of the reference) and the rest uniform over the other rows."""
    labels = np.asarray(labels)
    is_new = labels == new_class
    k = int(round(fraction * size))
    if k > is_new.sum() or size - k > (~is_new).sum():
        raise ValueError(f"the pool has {is_new.sum()} rows of class {new_class} and {(~is_new).sum()} "
                         f"others; asked for {k} and {size - k}")
    picked = np.concatenate([rng.choice(np.flatnonzero(is_new), k, replace=False),
                             rng.choice(np.flatnonzero(~is_new), size - k, replace=False)])
    return rng.permutation(picked)


def raise_label_noise(labels: np.ndarray, amount: float, n_classes: int, rng: np.random.Generator,
                      kind: str = "symmetric") -> tuple[np.ndarray, np.ndarray]:
    """``(new labels, flipped mask)``: ``round(amount * n)`` rows get a wrong label, raising the noise
    rate by ``amount``. ``symmetric``: a uniformly drawn other class; ``pair``: class-dependent, c ->
    (c + 1) mod n_classes (the pair-flip noise of Han et al., Co-teaching, NeurIPS 2018)."""
    if kind not in ("symmetric", "pair"):
        raise ValueError(f"unknown noise kind {kind!r}; valid: symmetric, pair")
    labels = np.asarray(labels)
    new = labels.copy()
    flipped = np.zeros(len(labels), bool)
    flipped[rng.choice(len(labels), int(round(amount * len(labels))), replace=False)] = True
    if kind == "pair":
        new[flipped] = (labels[flipped] + 1) % n_classes
    else:  # an offset in 1..C-1 never lands on the true class
        new[flipped] = (labels[flipped] + rng.integers(1, n_classes, flipped.sum())) % n_classes
    return new, flipped


def _quota(prior: np.ndarray, size: int) -> np.ndarray:
    """Integer counts summing to ``size`` closest to ``prior * size`` (largest remainders)."""
    raw = prior * size
    quota = np.floor(raw).astype(int)
    quota[np.argsort(raw - quota)[::-1][: size - quota.sum()]] += 1
    return quota


def _draw(labels: np.ndarray, values: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for v, q in zip(values, quota):
        rows = np.flatnonzero(labels == v)
        if q > len(rows):
            raise ValueError(f"class {v} has {len(rows)} rows, the batch needs {q}")
        parts.append(rng.choice(rows, q, replace=False))
    return rng.permutation(np.concatenate(parts))
