"""Batched, device-side image preprocessing for CLIP-style encoders (no per-image PIL in the hot path).

The uint8 ``(B, H, W, 3)`` block travels to the device as uint8 (4x less host-to-device traffic than
float), and the decode-to-float, resize, crop/pad and mean/std normalisation run there as tensor ops.
The steps mirror OpenCLIP's eval transform (``open_clip.transform.image_transform`` with the model's
``preprocess_cfg``): resize mode ``shortest`` (resize the short side, centre crop), ``squash`` (resize
to the target size) or ``longest`` (resize the long side, centre pad with ``fill_color``), then
``ToTensor`` (``/ 255``) and ``Normalize``. Resizing uses ``torch.nn.functional.interpolate`` with
``antialias=True`` in the model's interpolation mode; PIL's bicubic output is uint8, so the resized
values are clamped to [0, 1] like PIL's would be. When no resize is needed the result equals OpenCLIP's
own PIL transform bit for bit (same ``/ 255``, ``- mean``, ``/ std`` float32 operations).

The code is device-agnostic: the same functions run on the CPU in the tests and on a GPU in production.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Size = Union[int, Sequence[int]]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[1])) if len(size) > 1 else (int(size[0]), int(size[0]))
    return int(size), int(size)


def to_device_uint8(block: Union[np.ndarray, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 (numpy, possibly memory-mapped, or tensor) -> ``(B, 3, H, W)`` uint8 on ``device``.

    On a GPU the host copy is pinned so that the transfer can overlap with queued kernels.
    """
    t = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t.permute(0, 3, 1, 2)


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"  # OpenCLIP: anything else is bicubic
    y = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0)


def _centre_crop_or_pad(x: torch.Tensor, size: tuple[int, int], fill: float) -> torch.Tensor:
    """torchvision/OpenCLIP ``center_crop_or_pad`` on a ``(B, C, H, W)`` tensor."""
    h, w = x.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        pad_l = (tw - w) // 2 if tw > w else 0
        pad_t = (th - h) // 2 if th > h else 0
        pad_r = (tw - w + 1) // 2 if tw > w else 0
        pad_b = (th - h + 1) // 2 if th > h else 0
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b), value=fill)
        h, w = x.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw].contiguous()


def resized_shape(h: int, w: int, size: Size, resize_mode: str) -> tuple[int, int]:
    """Height and width after the resize step (before crop/pad), as OpenCLIP/torchvision compute them."""
    th, tw = _pair(size)
    if resize_mode == "squash":
        return th, tw
    if resize_mode == "longest":
        ratio = max(h / th, w / tw)
        return round(h / ratio), round(w / ratio)
    if resize_mode != "shortest":
        raise ValueError(f"resize_mode must be shortest, longest or squash; got {resize_mode!r}")
    if th != tw:  # ResizeKeepRatio(longest=0)
        ratio = min(h / th, w / tw)
        return round(h / ratio), round(w / ratio)
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(th * long / short)  # torchvision Resize(int): the short side becomes `size`
    return (th, new_long) if h <= w else (new_long, th)


def preprocess(
    images: Union[np.ndarray, torch.Tensor],
    size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """uint8 images -> the normalised float32 batch an OpenCLIP image tower expects.

    Parameters
    ----------
    images : (B, H, W, 3) uint8 array or tensor
    size : int or (h, w)
        The model's input size (``preprocess_cfg["size"]``).
    mean, std : 3 floats each
    interpolation : "bicubic" | "bilinear"
    resize_mode : "shortest" | "squash" | "longest"
    fill_color : int
        Padding value (0..255) of the ``longest`` mode.
    device : where the work happens

    Returns
    -------
    (B, 3, h, w) float32 tensor on ``device``.
    """
    device = torch.device(device)
    x = to_device_uint8(images, device).float().div_(255.0)  # ToTensor
    target = _pair(size)
    x = _resize(x, resized_shape(x.shape[-2], x.shape[-1], size, resize_mode), interpolation)
    if tuple(x.shape[-2:]) != target:
        x = _centre_crop_or_pad(x, target, fill_color / 255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)  # Normalize
