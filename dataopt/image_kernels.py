"""Batched image kernels on ``(B, C, H, W)`` tensors, one draw per sample from an explicit generator:
scaling and standardisation, reflect-pad translation and horizontal flip.

The one home of these operations for the train loop (:func:`dataopt.train.loop.fit`), the plan's
augmentation policies (:class:`dataopt.optimize.augment.batch.BatchAugmenter`) and AdaAugment
(:mod:`dataopt.train.adaaugment`). A leaf: torch only, nothing of dataopt.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.25  # images are scaled to [0, 1] then standardised with these


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Pixel values in [0, 255] (uint8 or float, e.g. after a crop) -> float, scaled and standardised."""
    return (x.float() / 255.0 - MEAN) / STD


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """A uint8 image batch standardised (:func:`standardise`); anything else (embeddings) as float."""
    if batch.dtype == torch.uint8:
        return standardise(batch)
    return batch.float()


def crop_pad(translate: Optional[int], width: int) -> int:
    """Largest crop shift in px: ``train.translate`` when set, else ``width // 8`` (at least 1)."""
    return int(translate or max(1, width // 8))


def random_crop_flip(
    x: torch.Tensor,
    pad: int,
    flip: bool,
    gen: torch.Generator,
    max_shift: Optional[torch.Tensor] = None,
    flip_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batched random translation (reflect padding) and horizontal flip, one draw per sample.

    Parameters
    ----------
    x : (B, C, H, W) tensor
    pad : reflect padding on each side; without ``max_shift`` every sample moves by up to ``pad`` px.
    max_shift : (B,) int64 CPU tensor, optional
        Per-sample largest translation in px (each ``<= pad``; 0 leaves the sample in place).
    flip_mask : (B,) bool CPU tensor, optional
        With ``flip``: which samples are mirrored, instead of a fair coin per sample (e.g. airbench's
        alternating flip); nothing is drawn from ``gen`` for the flips then.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad:
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
        if max_shift is None:
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
        else:
            # offset uniform in [pad - s, pad + s] for a per-sample s, drawn in one vectorised step
            s = max_shift.clamp(0, pad).to(torch.int64)
            span = (2 * s + 1).double()
            dy = ((torch.rand(b, generator=gen, dtype=torch.float64) * span).long() - s + pad).to(dev)
            dx = ((torch.rand(b, generator=gen, dtype=torch.float64) * span).long() - s + pad).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5 if flip_mask is None else flip_mask.bool()
        mask = mask.to(dev)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x
