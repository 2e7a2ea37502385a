"""One training loop for every model in the project (proxy runs, the train stage).

Data is moved to the device once: images stay ``uint8`` ``(N, C, H, W)`` and are normalised per
batch; embeddings are float. Shuffling and augmentation draw from an explicit ``torch.Generator``, and
model initialisation runs under a forked RNG, so nothing is seeded globally and a run on the CPU is
deterministic for a seed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

MEAN, STD = 0.5, 0.25  # images are scaled to [0, 1] then standardised with these


def resolve_device(device: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``key`` names the param in the error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from dataopt.errors import ConfigError

        raise ConfigError(f"{key} is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (e.g. model construction) under ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 (possibly memory-mapped) -> ``(N, C, H, W)`` uint8 on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    return t.permute(0, 3, 1, 2).contiguous().to(device)


def normalise(batch: torch.Tensor) -> torch.Tensor:
    if batch.dtype == torch.uint8:
        return (batch.float() / 255.0 - MEAN) / STD
    return batch.float()


def random_crop_flip(
    x: torch.Tensor,
    pad: int,
    flip: bool,
    gen: torch.Generator,
    max_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batched random translation (reflect padding) and horizontal flip, one draw per sample.

    Parameters
    ----------
    x : (B, C, H, W) tensor
    pad : reflect padding on each side; without ``max_shift`` every sample moves by up to ``pad`` px.
    max_shift : (B,) int64 CPU tensor, optional
        Per-sample largest translation in px (each ``<= pad``; 0 leaves the sample in place).
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
        mask = (torch.rand(b, generator=gen) < 0.5).to(dev)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: str = "none"  # "none" | "crop" | "flip_crop" (images only)
    seed: int = 0
    max_seconds: Optional[float] = None  # stop after the epoch that crosses this budget
    progress: bool = True
    desc: str = "train"
    history: list = field(default_factory=list)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FitConfig,
    weights: Optional[torch.Tensor] = None,
    on_epoch: Optional[Callable[[int, nn.Module], Optional[dict]]] = None,
    sampling_weights: Optional[torch.Tensor] = None,
    augment_magnitudes: Optional[torch.Tensor] = None,
    loss_fn: Optional[Callable[..., torch.Tensor]] = None,
    augment_fn: Optional[Callable[..., torch.Tensor]] = None,
) -> list[dict]:
    """Train ``model`` on ``x`` (uint8 images or float features, on the model's device).

    Parameters
    ----------
    x : (N, C, H, W) uint8 or (N, d) float tensor
    y : (N,) int64 tensor of labels
    weights : (N,) float tensor of per-sample loss weights, or None (all 1). Normalised to mean 1.
    on_epoch : called as ``on_epoch(epoch, model)`` after every epoch (model in eval mode); a dict it
        returns is merged into that epoch's history row.
    sampling_weights : (N,) non-negative float tensor, or None
        None (default): every epoch is one shuffled pass over all N samples. Else each epoch draws N
        samples with replacement, with probability proportional to the weight (``torch.multinomial``
        on the seeded generator), so steps and samples seen per epoch stay the same.
    augment_magnitudes : (N,) float tensor in [0, 1], or None (images only)
        Extra per-sample translation on top of ``cfg.augment``: sample i moves by up to
        ``ceil(m_i * pad)`` more px (``pad = max(1, W // 8)``); 0 = the ``cfg.augment`` default only.
        Flips stay governed by ``cfg.augment`` alone (a flip is not label-preserving for every dataset).
    loss_fn : callable, optional
        ``loss_fn(logits (B, C) float, targets (B,), weights (B,), epoch (1-based), indices (B,))`` ->
        scalar batch loss (e.g. :func:`dataopt.train.losses.make_loss`); ``weights`` are the
        mean-1 normalised loss weights. None (default): weighted cross-entropy with
        ``cfg.label_smoothing``.
    augment_fn : callable, optional
        ``augment_fn(xb (B, ...) as stored in x, indices (B,), epoch (1-based), gen) -> (B, ...) float``
        model input (normalised): replaces the built-in ``cfg.augment`` / ``augment_magnitudes``
        handling (e.g. :class:`dataopt.optimize.augment.BatchAugmenter`); draw randomness from ``gen``.
        None (default): the built-in path.

    Returns
    -------
    history : one dict per epoch: epoch, loss, samples_seen, steps, seconds, lr.
    """
    device = x.device
    n = len(x)
    gen = torch.Generator().manual_seed(cfg.seed)
    w = torch.ones(n, device=device) if weights is None else weights.to(device).float()
    w = w / w.mean().clamp_min(1e-12)
    draw_p = None
    if sampling_weights is not None:
        draw_p = sampling_weights.detach().cpu().double()
        if len(draw_p) != n or not bool((draw_p >= 0).all()) or float(draw_p.sum()) <= 0:
            raise ValueError("sampling_weights must be N non-negative numbers with a positive sum")
    mags = None if augment_magnitudes is None else augment_magnitudes.detach().cpu().double()
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    # linear warm-up over the first 10% of steps, then cosine decay (airbench-style schedule)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    use_amp = device.type == "cuda"
    is_image = x.dtype == torch.uint8 and x.dim() == 4
    history = cfg.history
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=cfg.desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        model.train()
        if draw_p is None:
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.multinomial(draw_p, n, replacement=True, generator=gen)
        perm = order.to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb = x[idx]
            if augment_fn is not None:
                xb = augment_fn(xb, idx, epoch + 1, gen)
            elif is_image and (cfg.augment != "none" or mags is not None):
                pad = max(1, xb.shape[-1] // 8)
                flip = cfg.augment == "flip_crop"
                if mags is None:
                    xb = random_crop_flip(xb.float(), pad, flip, gen)
                else:
                    base = pad if cfg.augment != "none" else 0
                    m = mags[order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
                    shift = base + torch.ceil(m * pad).long()
                    xb = random_crop_flip(xb.float(), base + pad, flip, gen, max_shift=shift)
                xb = ((xb / 255.0) - MEAN) / STD
            else:
                xb = normalise(xb)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xb)
            if loss_fn is None:
                losses = F.cross_entropy(
                    logits.float(), y[idx], reduction="none", label_smoothing=cfg.label_smoothing
                )
                loss = (losses * w[idx]).sum() / len(idx)
            else:
                loss = loss_fn(logits.float(), y[idx], w[idx], epoch + 1, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
        row = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / n,
            "samples_seen": seen,
            "steps": (epoch + 1) * steps_per_epoch,
            "seconds": round(time.perf_counter() - t0, 3),
            "lr": opt.param_groups[0]["lr"],
        }
        if on_epoch is not None:
            model.eval()
            row.update(on_epoch(epoch + 1, model) or {})
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if cfg.max_seconds is not None and row["seconds"] >= cfg.max_seconds:
            break
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``(N, n_classes)`` float32 logits on ``x``'s device, model in eval mode."""
    model.eval()
    use_amp = x.device.type == "cuda"
    out = []
    for s in range(0, len(x), batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(model(normalise(x[s : s + batch_size])).float())
    return torch.cat(out) if out else torch.zeros((0, model.fc.out_features), device=x.device)


@torch.no_grad()
def predict_features(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``(N, feature_dim)`` float32 penultimate features."""
    model.eval()
    out = [model.features(normalise(x[s : s + batch_size])).float() for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.feature_dim), device=x.device)
