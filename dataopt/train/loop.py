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
from typing import Any, Callable, Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dataopt import interrupt
from dataopt.config import Flip, Precision
from dataopt.errors import ConfigError, DivergedError
from dataopt.image_kernels import crop_pad, normalise, random_crop_flip, standardise

PRECISIONS, FLIPS = get_args(Precision), get_args(Flip)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device``; None = float32, no autocast. ``auto`` is bf16
    on a GPU and float32 on the CPU (CPU autocast is slower without AMX); ``fp16`` trains with a gradient
    scaler (its range is too narrow for small gradients)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_device(device: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``key`` names the param in the error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
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


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: str = "none"  # "none" | "crop" | "flip_crop" (images only)
    translate: Optional[int] = None  # crop: largest shift in px (reflect padding); None = width // 8
    lookahead: bool = False  # airbench's lookahead: an EMA of the weights every 5 steps, used at the end
    precision: str = "auto"  # PRECISIONS: the autocast dtype of the forward pass (see autocast_dtype)
    flip: str = "random"  # FLIPS: how augment="flip_crop" mirrors (random: a fair coin per sample and epoch)
    whiten_bias_epochs: Optional[int] = None  # train a whitening layer's bias only in the first N epochs
    seed: int = 0
    max_seconds: Optional[float] = None  # stop after the epoch that crosses this budget
    progress: bool = True
    desc: str = "train"
    lr_key: str = "the learning rate"  # the param a divergence message asks to lower, e.g. "train.lr"
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
    selector: Optional[Any] = None,
    on_epoch_loss: Optional[Callable[[int, torch.Tensor], None]] = None,
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
        ``ceil(m_i * pad)`` more px (``pad = crop_pad(cfg.translate, W)``); 0 = the ``cfg.augment`` default only.
        Flips stay governed by ``cfg.augment`` alone (a flip is not label-preserving for every dataset).
    loss_fn : callable, optional
        ``loss_fn(logits (B, C) float, targets (B,), weights (B,), epoch (1-based), indices (B,))`` ->
        scalar batch loss (e.g. :func:`dataopt.train.losses.make_loss`); ``weights`` are the
        mean-1 normalised loss weights. None (default): weighted cross-entropy with
        ``cfg.label_smoothing``.
    augment_fn : callable, optional
        ``augment_fn(xb (B, ...) as stored in x, indices (B,), epoch (1-based), gen) -> (B, ...) float``
        model input (normalised): replaces the built-in ``cfg.augment`` / ``augment_magnitudes``
        handling (e.g. :class:`dataopt.optimize.augment.batch.BatchAugmenter`); draw randomness from ``gen``.
        None (default): the built-in path.
    selector : a fitted dynamic selector (:mod:`dataopt.train.dynamic_selection`), optional
        Decides each epoch's samples: ``selector.epoch_sizes_`` (E,) gives how many samples every
        epoch trains on (the learning-rate schedule is laid out over their steps) and
        ``selector.select(epoch, last_loss, gen) -> (positions (k,) int64, weights (k,) float or
        None)`` draws them; the weights multiply the loss weights (e.g. InfoBatch's 1/(1 - r)).
        Not combinable with ``sampling_weights``.
    on_epoch_loss : called as ``on_epoch_loss(epoch, last_loss)`` after every epoch with the (N,)
        float tensor of each sample's most recent training loss (cross-entropy on its given label,
        as trained: augmented, before weighting; NaN until first seen) - the per-sample signal of the
        dynamic methods and of the perception stage's dynamics.

    ``cfg.flip="alternating"`` (images with ``augment="flip_crop"``, built-in path only): airbench94's
    derandomised flip (Jordan 2024, arXiv:2404.00498, §3.6 "Alternating flip"; ``legacy/airbench94.py`` of
    KellerJordan/cifar10-airbench): each sample gets one fair coin before the first epoch, is mirrored
    in odd epochs when it came up heads and in even epochs when not, so every two consecutive epochs
    show it both ways. ``cfg.whiten_bias_epochs=N``: ``model.whiten.bias`` gets gradients only in the
    first N epochs and then keeps its value, as airbench94 trains it for 3 (its lookahead average, when
    on, still moves it afterwards, as there).

    Models may define ``prepare(x_normalised)`` (data-dependent initialisation, e.g. airbench's
    whitening, run once on the first 5,000 training images) and ``param_groups(lr, weight_decay)``
    (per-group SGD settings); channels-last memory layout is used for images on a GPU.

    Returns
    -------
    history : one dict per epoch: epoch, loss, samples_seen, steps, seconds, lr.

    Raises
    ------
    DivergedError
        A batch loss or, after an epoch, a weight is NaN or infinite. On the CPU the loss is checked
        after every step; on a GPU once per epoch (a per-step check would wait for the device).
    """
    device = x.device
    n = len(x)
    gen = torch.Generator().manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg.precision, device)
    w = torch.ones(n, device=device) if weights is None else weights.to(device).float()
    w = w / w.mean().clamp_min(1e-12)
    draw_p = None
    if sampling_weights is not None:
        draw_p = sampling_weights.detach().cpu().double()
        if len(draw_p) != n or not bool((draw_p >= 0).all()) or float(draw_p.sum()) <= 0:
            raise ValueError("sampling_weights must be N non-negative numbers with a positive sum")
    if selector is not None and draw_p is not None:
        raise ValueError("a dynamic selector and sampling_weights both decide what an epoch draws; use one")
    mags = None if augment_magnitudes is None else augment_magnitudes.detach().cpu().double()
    sizes = [n] * cfg.epochs if selector is None else [int(k) for k in selector.epoch_sizes_]
    if len(sizes) != cfg.epochs or min(sizes) < 1:
        raise ValueError(f"selector.epoch_sizes_ must hold {cfg.epochs} positive sizes, got {sizes}")
    total = sum(max(1, math.ceil(k / cfg.batch_size)) for k in sizes)
    is_image = x.dtype == torch.uint8 and x.dim() == 4
    flip_coin = _alternating_flip_coins(cfg, n, is_image, augment_fn is not None, gen)
    whiten_bias = _whitening_bias(model, cfg)
    channels_last = is_image and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if is_image and hasattr(model, "prepare"):
        model.prepare(normalise(x[:5000]))
    groups = (model.param_groups(cfg.lr, cfg.weight_decay) if hasattr(model, "param_groups")
              else model.parameters())
    opt = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay,
    )
    # linear warm-up over the first 10% of steps, then cosine decay (airbench-style schedule)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    check_steps = device.type != "cuda"  # reading a loss on the CPU costs nothing; on a GPU it syncs
    ema = _Lookahead(model, total) if cfg.lookahead else None
    history = cfg.history
    last_loss = torch.full((n,), float("nan"), device=device)
    seen = steps_done = 0
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=cfg.desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        model.train()
        if whiten_bias is not None:
            whiten_bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
        dyn_w = None
        sel_stats: dict = {}
        if selector is not None:
            chosen, dyn_w = selector.select(epoch + 1, last_loss, gen)
            sel_stats = {f"dyn_{k}": v for k, v in getattr(selector, "stats_", {}).items()}
            order = chosen[torch.randperm(len(chosen), generator=gen)]
            if dyn_w is not None:
                full_w = torch.zeros(n, dtype=torch.float32)
                full_w[chosen] = dyn_w.float().cpu()
                dyn_w = full_w.to(device)
        elif draw_p is None:
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.multinomial(draw_p, n, replacement=True, generator=gen)
        perm = order.to(device)
        loss_sum = torch.zeros((), device=device)
        n_steps = max(1, math.ceil(len(order) / cfg.batch_size))
        for s in range(n_steps):
            interrupt.check()  # Ctrl-C / SIGTERM reach a loop in a worker thread only through this
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb = x[idx]
            if augment_fn is not None:
                xb = augment_fn(xb, idx, epoch + 1, gen)
            elif is_image and (cfg.augment != "none" or mags is not None):
                pad = crop_pad(cfg.translate, xb.shape[-1])
                flip = cfg.augment == "flip_crop"
                rows = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                # alternating: mirrored when the sample's coin and the epoch's parity differ
                mask = None if flip_coin is None else flip_coin[rows] ^ bool(epoch % 2)
                if mags is None:
                    xb = random_crop_flip(xb.float(), pad, flip, gen, flip_mask=mask)
                else:
                    base = pad if cfg.augment != "none" else 0
                    shift = base + torch.ceil(mags[rows] * pad).long()
                    xb = random_crop_flip(xb.float(), base + pad, flip, gen, max_shift=shift, flip_mask=mask)
                xb = standardise(xb)
            else:
                xb = normalise(xb)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            wb = w[idx] if dyn_w is None else w[idx] * dyn_w[idx]
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(xb)
            if loss_fn is None:
                losses = F.cross_entropy(
                    logits.float(), y[idx], reduction="none", label_smoothing=cfg.label_smoothing
                )
                loss = (losses * wb).sum() / len(idx)
                last_loss[idx] = losses.detach()
            else:
                loss = loss_fn(logits.float(), y[idx], wb, epoch + 1, idx)
                last_loss[idx] = F.cross_entropy(logits.detach().float(), y[idx], reduction="none")
            if check_steps and not math.isfinite(loss_value := float(loss.detach())):
                _diverged(cfg, f"at epoch {epoch + 1}, step {s + 1}: loss is {loss_value}")
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sched.step()
            if ema is not None:
                ema.step(model)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
        steps_done += n_steps
        if not math.isfinite(epoch_loss := float(loss_sum)):
            _diverged(cfg, f"in epoch {epoch + 1}: loss is {epoch_loss}")
        _check_weights(model, cfg, f"in epoch {epoch + 1}")
        row = {
            "epoch": epoch + 1,
            "loss": epoch_loss / max(1, len(order)),
            "samples_seen": seen,
            "steps": steps_done,
            "seconds": round(time.perf_counter() - t0, 3),
            "lr": opt.param_groups[-1]["lr"],
            **sel_stats,
        }
        if on_epoch_loss is not None:
            on_epoch_loss(epoch + 1, last_loss)
        if on_epoch is not None:
            model.eval()
            row.update(on_epoch(epoch + 1, model) or {})
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if cfg.max_seconds is not None and row["seconds"] >= cfg.max_seconds:
            break
    if ema is not None:
        ema.finish(model)
        _check_weights(model, cfg, "in the lookahead average")
    if whiten_bias is not None:
        whiten_bias.requires_grad_(True)  # as built: a later fit starts from the same model
    model.eval()
    return history


def _alternating_flip_coins(cfg: FitConfig, n: int, is_image: bool, has_augment_fn: bool,
                            gen: torch.Generator) -> Optional[torch.Tensor]:
    """(n,) bool CPU coins of ``cfg.flip="alternating"`` (None for random flips); drawn once from ``gen``."""
    if cfg.flip not in FLIPS:
        raise ValueError(f"flip {cfg.flip!r} is not one of {', '.join(FLIPS)}")
    if cfg.flip == "random":
        return None
    if has_augment_fn or not is_image or cfg.augment != "flip_crop":
        raise ValueError("flip='alternating' is the built-in augment='flip_crop' path on images; "
                         "an augment_fn, or another augment, does not flip by it")
    return torch.rand(n, generator=gen) < 0.5


def _whitening_bias(model: nn.Module, cfg: FitConfig) -> Optional[torch.Tensor]:
    """The bias of ``model.whiten`` that ``cfg.whiten_bias_epochs`` freezes (None when not set)."""
    if cfg.whiten_bias_epochs is None:
        return None
    bias = getattr(getattr(model, "whiten", None), "bias", None)
    if bias is None or cfg.whiten_bias_epochs < 0:
        raise ValueError("whiten_bias_epochs needs a model with a whitening layer with a bias (model.whiten, "
                         f"e.g. airbench) and a count >= 0; {type(model).__name__}, {cfg.whiten_bias_epochs}")
    return bias


def _diverged(cfg: FitConfig, where: str) -> None:
    raise DivergedError(f"{cfg.desc} diverged {where}; lower {cfg.lr_key} ({cfg.lr:g})")


@torch.no_grad()
def _check_weights(model: nn.Module, cfg: FitConfig, where: str) -> None:
    """Raise :class:`DivergedError` when a parameter or buffer (e.g. batch-norm statistics) of
    ``model`` is not finite."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        _diverged(cfg, f"{where}: the weights are not finite")


class _Lookahead:
    """airbench94's lookahead (Jordan 2024, after Zhang et al. 2019): every 5 steps the weights and an
    EMA of them are both set to ``ema + (1 - decay) * (w - ema)`` with ``decay = 0.95**5 * (t/T)**3``
    (no averaging early, stronger averaging late); the EMA becomes the final weights."""

    def __init__(self, model: nn.Module, total_steps: int):
        self.total, self.t = max(1, total_steps), 0
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.t += 1
        if self.t % 5 == 0:
            self._update(model, 0.95**5 * (self.t / self.total) ** 3)

    @torch.no_grad()
    def _update(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v, 1 - decay)
                v.copy_(self.ema[k])

    def finish(self, model: nn.Module) -> None:
        self._update(model, 1.0)  # decay 1: the weights become the EMA


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
