"""Applying a plan's augmentation policy to training batches, on the device (no PIL).

:class:`BatchAugmenter` is the ``augment_fn`` of :func:`dataopt.train.loop.fit`: it takes a uint8
``(B, C, H, W)`` batch, the dataset positions of its rows, the epoch and the loop's generator, and
returns the normalised float batch the model sees.

Per-sample operations: torchvision v2 policies draw ONE op (and one magnitude) per call, even on a
batch. So the batch is cut into small groups - every sample gets a magnitude level (its plan
``augment_magnitude`` quantised to at most ``levels`` values) and a random group id in
``[0, groups)``; the policy is called once per (level, group) cell. Different cells draw different ops.

Determinism: v2 transforms draw from torch's global RNG, so every call runs under
``torch.random.fork_rng`` with a seed taken from the loop's generator - reproducible for a seed, and
the global RNG is left untouched.

Mixing (``mixup`` / ``cutmix``, v2.MixUp / v2.CutMix): the batch is mixed with its roll by one
(``x_i`` with ``x_{i-1}``, the v2 convention) and ``lam`` is recorded in :attr:`BatchAugmenter.mix`;
the trainer's loss then computes ``lam * L(y_i) + (1 - lam) * L(y_{i-1})``, which equals the
cross-entropy on the soft targets ``lam * onehot(y_i) + (1 - lam) * onehot(y_{i-1})`` (CE is linear
in the target) and works with any hard-target loss (focal, bootstrap: the usual mixup criterion).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from dataopt.errors import ConfigError
from dataopt.image_kernels import crop_pad, random_crop_flip, standardise

IMAGE_POLICIES = ("flips_crops", "randaugment", "trivialaugment", "autoaugment", "augmix")
MIX_POLICIES = ("mixup", "cutmix")
FEATURE_POLICIES = ("gaussian_noise", "smote")


def slot(policy: str) -> str:
    """Where a policy lives in plan.json ``augment``: ``image``, ``mix`` or ``features``."""
    if policy in IMAGE_POLICIES:
        return "image"
    if policy in MIX_POLICIES:
        return "mix"
    if policy in FEATURE_POLICIES:
        return "features"
    raise ConfigError(f"unknown augmentation policy {policy!r}; valid: "
                      f"{', '.join(IMAGE_POLICIES + MIX_POLICIES + FEATURE_POLICIES)}")


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=gen))


class _Forked:
    """``with _Forked(seed, device):`` - torch's global RNG seeded for the block, restored after."""

    def __init__(self, seed: int, device: torch.device):
        devices = [device.index or 0] if device.type == "cuda" else []
        self._ctx = torch.random.fork_rng(devices=devices)
        self.seed, self.device = seed, device

    def __enter__(self):
        self._ctx.__enter__()
        torch.manual_seed(self.seed)  # seeds the forked CPU (and CUDA) generators only

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _transform(image: dict, m: float) -> tuple[Any, bool]:
    """``(v2 transform, applied_with_probability_m)`` for an image policy at magnitude ``m`` in (0, 1].

    RandAugment: magnitude bin ``round(m * (bins - 1))``; AugMix: severity ``1 + round(m * 9)``;
    TrivialAugmentWide and AutoAugment have no magnitude knob, so ``m`` is the probability the policy is
    applied to the sample.
    """
    from torchvision.transforms import v2  # why: torchvision loads torch._dynamo (1.5 s a start)

    p = image["policy"]
    if p == "randaugment":
        bins = int(image.get("num_magnitude_bins", 31))
        return v2.RandAugment(num_ops=int(image.get("num_ops", 2)), magnitude=int(round(m * (bins - 1))),
                              num_magnitude_bins=bins), False
    if p == "trivialaugment":
        return v2.TrivialAugmentWide(num_magnitude_bins=int(image.get("num_magnitude_bins", 31))), True
    if p == "autoaugment":
        name = str(image.get("policy_name", "cifar10")).upper()
        return v2.AutoAugment(policy=v2.AutoAugmentPolicy[name]), True
    if p == "augmix":
        return v2.AugMix(severity=1 + int(round(m * 9)), mixture_width=int(image.get("mixture_width", 3)),
                         chain_depth=int(image.get("chain_depth", -1)),
                         alpha=float(image.get("alpha", 1.0))), False
    raise ConfigError(f"{p!r} is not a torchvision image policy")


class BatchAugmenter:
    """The ``augment_fn`` for :func:`dataopt.train.loop.fit` built from plan.json ``augment``.

    Parameters
    ----------
    augment : dict
        plan.json ``augment``: optional ``image`` (policy dict), ``mix`` (mixup/cutmix dict); a
        ``features`` policy is for head-only training and ignored here.
    magnitudes : (N,) float tensor in [0, 1] over the dataset rows, or None (all 1 = the policy's own
        magnitude when the plan has none)
    base : ``train.augment`` (``none`` | ``crop`` | ``flip_crop``), applied as today on top
    n_classes : for MixUp/CutMix
    levels : at most this many magnitude levels per batch
    groups : random groups per level (one policy call each), so ops vary within a batch
    translate : largest crop shift in px (``train.translate``); None = image width // 8
    """

    def __init__(self, augment: dict, magnitudes: Optional[torch.Tensor], base: str = "none",
                 n_classes: int = 2, levels: int = 4, groups: int = 4, translate: Optional[int] = None):
        self.image = augment.get("image")
        self.mixing = augment.get("mix")
        self.magnitudes = None if magnitudes is None else magnitudes.detach().cpu().double()
        self.base = base
        self.n_classes = n_classes
        self.levels = max(1, int(levels))
        self.groups = max(1, int(groups))
        self.translate = translate
        self.mix: Optional[float] = None  # lam of the last batch (None = not mixed)

    def _mags(self, idx: torch.Tensor) -> torch.Tensor:
        b = len(idx)
        if self.magnitudes is None:
            return torch.ones(b, dtype=torch.float64)
        m = self.magnitudes[idx.cpu()]
        if len(torch.unique(m)) > self.levels:  # quantise to bin centres so each cell is big enough
            m = torch.where(m > 0, ((m * self.levels).floor().clamp(max=self.levels - 1) + 0.5) / self.levels, m)
        return m

    def apply_policy(self, xb: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The image policy alone, per (magnitude level, random group) cell: ``(B, C, H, W)`` uint8 and
        ``(B,)`` magnitudes in [0, 1] -> ``(B, C, H, W)`` uint8; magnitude 0 = untouched."""
        b = len(xb)
        group = torch.randint(0, self.groups, (b,), generator=gen)
        coin = torch.rand(b, generator=gen, dtype=torch.float64)
        seed = _seed(gen)
        out = xb.clone()
        for lvl in torch.unique(m[m > 0]).tolist():  # a handful of cells, never a loop over samples
            tf, probabilistic = _transform(self.image, lvl)
            on = (m == lvl) & (coin < lvl) if probabilistic else (m == lvl)
            for g in range(self.groups):
                rows = torch.nonzero(on & (group == g)).flatten()
                if len(rows) == 0:
                    continue
                rows_d = rows.to(xb.device)
                with _Forked(seed + 1009 * g + int(lvl * 1e6), xb.device):
                    out[rows_d] = tf(xb[rows_d])
        return out

    def __call__(self, xb: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 batch -> ``(B, C, H, W)`` normalised float batch."""
        m = self._mags(idx)
        policy = None if self.image is None else self.image["policy"]
        if policy is not None and policy != "flips_crops":
            xb = self.apply_policy(xb, m, gen)
        pad = crop_pad(self.translate, xb.shape[-1])
        if policy == "flips_crops":
            base_pad = pad if self.base != "none" else 0
            pad = max(1, base_pad, int(round(float(self.image.get("pad_fraction", 0.125)) * xb.shape[-1])))
            flip = bool(self.image.get("flip", True)) or self.base == "flip_crop"
            shift = torch.clamp(torch.ceil(m * pad).long(), min=base_pad)
            moved = random_crop_flip(xb.float(), pad, flip, gen, max_shift=shift)
            if self.base == "none":  # magnitude 0 = no augmentation beyond train.augment: no flip either
                still = (m == 0).to(xb.device)[:, None, None, None]
                moved = torch.where(still, xb.float(), moved)
            xb = moved
        elif policy is None and self.magnitudes is not None:
            # no image policy: the plan magnitude is extra translation, as loop.fit does without augment_fn
            base = pad if self.base != "none" else 0
            xb = random_crop_flip(xb.float(), base + pad, self.base == "flip_crop", gen,
                                  max_shift=base + torch.ceil(m * pad).long())
        elif self.base != "none":
            xb = random_crop_flip(xb.float(), pad, self.base == "flip_crop", gen)
        x = standardise(xb)
        self.mix = None
        if self.mixing is not None and len(x) > 1:
            x = self._mix(x, gen)
        return x

    def _mix(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """v2.MixUp / v2.CutMix on the batch; ``lam`` recovered from identity dummy labels.

        Zhang et al. 2018 (mixup, §2) and Yun et al. 2019 (CutMix, §3.1; ``lam`` = the kept area). The
        dummy labels ``arange(B)`` give soft targets ``lam * I + (1 - lam) * roll(I)``, so ``lam`` is
        entry (0, 0); the real soft targets are built from it in the loss.
        """
        from torchvision.transforms import v2  # why: see _transform

        b = len(x)
        alpha = float(self.mixing.get("alpha", 1.0))
        kind = self.mixing["policy"]
        tf = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=alpha, num_classes=b)
        dummy = torch.arange(b, device=x.device)
        with _Forked(_seed(gen), x.device):
            x, soft = tf(x, dummy)
        self.mix = float(soft[0, 0])
        return x

    def mixed_loss(self, base_loss):
        """Wrap a hard-target loss ``base_loss(logits, targets, weights, epoch, indices) -> scalar``
        into the mixup criterion ``lam * base(y) + (1 - lam) * base(roll(y))`` for mixed batches."""

        def loss(logits, targets, weights, epoch, indices):
            lam = self.mix
            if lam is None:
                return base_loss(logits, targets, weights, epoch, indices)
            r = lambda t: t.roll(1, 0)  # noqa: E731  (v2's partner of row i is row i - 1)
            return (lam * base_loss(logits, targets, weights, epoch, indices)
                    + (1.0 - lam) * base_loss(logits, r(targets), r(weights), epoch, r(indices)))

        return loss


def soft_targets(targets: torch.Tensor, lam: float, n_classes: int) -> torch.Tensor:
    """``(B,) int -> (B, C)``: ``lam * onehot(y_i) + (1 - lam) * onehot(y_{i-1})`` (v2's roll by one)."""
    one = torch.nn.functional.one_hot(targets, n_classes).float()
    return lam * one + (1.0 - lam) * one.roll(1, 0)


def default_loss(label_smoothing: float = 0.0):
    """The loss :func:`dataopt.train.loop.fit` uses by default, as a ``loss_fn``."""
    def loss(logits, targets, weights, epoch, indices):
        losses = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
        return (losses * weights).sum() / len(targets)

    return loss


__all__ = ["BatchAugmenter", "slot", "soft_targets", "default_loss", "IMAGE_POLICIES", "MIX_POLICIES",
           "FEATURE_POLICIES"]
