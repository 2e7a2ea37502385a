"""Networks: a small CNN for images of any size >= 8 px, and a head on frozen embeddings."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dataopt.registry import MODELS, hyperparameters
from dataopt.train.loop import seeded


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Three conv blocks (width, 2w, 4w), global average pooling, a linear classifier.

    Input ``(B, C, H, W)`` float; ``features`` returns the ``(B, 4w)`` penultimate activations.
    Pooling stops once the map is 4 px wide, so 8x8 digits and 32x32 CIFAR images both fit.
    """

    def __init__(self, n_classes: int, in_channels: int = 3, width: int = 32, image_size: int = 32):
        super().__init__()
        pools, size = [], image_size
        for _ in range(3):
            pools.append(size >= 8)
            size = size // 2 if size >= 8 else size
        w = width
        self.body = nn.Sequential(
            _block(in_channels, w, pools[0]),
            _block(w, 2 * w, pools[1]),
            _block(2 * w, 4 * w, pools[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, n_classes)
        self.feature_dim = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class Head(nn.Module):
    """A linear (``hidden=0``) or one-hidden-layer classifier on ``(B, dim)`` embeddings.

    ``standardise``: inputs are centred and divided by one scale first (buffers ``shift``, ``scale``, set
    with :meth:`fit_standardiser` and saved with the weights), as the perceive stage's head does: unit-norm
    embeddings of thousands of coordinates are too small for SGD at usual learning rates."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0, standardise: bool = False):
        super().__init__()
        self.standardise = bool(standardise)
        if self.standardise:
            self.register_buffer("shift", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(()))
        if hidden:
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True))
            self.fc = nn.Linear(hidden, n_classes)
            self.feature_dim = hidden
        else:
            self.body = nn.Identity()
            self.fc = nn.Linear(dim, n_classes)
            self.feature_dim = dim

    @torch.no_grad()
    def fit_standardiser(self, x: torch.Tensor) -> "Head":
        """The perceive head's rule (``OOFDynamics``): centre, and scale by ONE factor so that the mean
        per-coordinate variance is 1 (a per-coordinate scale would blow up the noisy directions)."""
        self.shift.copy_(x.mean(0))
        self.scale.copy_((x - self.shift).pow(2).mean().sqrt().clamp_min(1e-6))
        return self

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale if self.standardise else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._inputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self._inputs(x)))


# --- airbench-class network (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024) -----------


class _FrozenScaleBN(nn.BatchNorm2d):
    """airbench BatchNorm: scale fixed at 1 (only the shift is learned), high running-stat momentum."""

    def __init__(self, channels: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _DiracConv(nn.Conv2d):
    """3x3 conv whose first ``in_channels`` filters start as identities (airbench's dirac init)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class _ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.conv1, self.conv2 = _DiracConv(c_in, c_out), _DiracConv(c_out, c_out)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm1, self.norm2 = _FrozenScaleBN(c_out), _FrozenScaleBN(c_out)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


@MODELS.register("airbench")
class AirbenchNet(nn.Module):
    """The airbench94 network: a frozen 2x2 patch-whitening conv (24 channels, set from the data by
    :meth:`prepare`), three conv groups (64, 256, 256 channels at width 64: conv, max-pool, BN, GELU,
    conv, BN, GELU), a global max-pool and a bias-free linear layer scaled by 1/9.

    ``width`` scales the groups (64 -> 64/256/256). ``flip_tta``: in eval mode the logits are the mean
    over the image and its mirror (airbench's TTA level 1); the trainer turns it on only when training
    used flips, since a flip does not preserve every dataset's labels. Pooling stops once the map is
    below 2 px, so small images (8x8 digits) fit too. Optimiser recipe (airbench, in mean-loss units):
    see :meth:`param_groups` and the README's CIFAR settings.
    """

    bias_scaler = 64.0  # airbench: BatchNorm shifts learn 64x faster, with proportionally less decay

    def __init__(self, n_classes: int, in_channels: int = 3, width: int = 64, image_size: int = 32,
                 flip_tta: bool = False):
        super().__init__()
        widths = (width, 4 * width, 4 * width)
        self.whiten_width = 2 * in_channels * 4
        self.whiten = nn.Conv2d(in_channels, self.whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        size, groups, c = image_size - 1, [], self.whiten_width
        for w in widths:
            groups.append(_ConvGroup(c, w, pool=size >= 2))
            size, c = (size // 2 if size >= 2 else size), w
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], n_classes, bias=False)
        self.feature_dim = widths[-1]
        self.flip_tta = flip_tta
        self.scale = 1 / 9

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from ``x`` ``(B, C, H, W)`` normalised float (first 5,000 images):
        the eigenvectors of the 2x2 patch covariance scaled by ``1 / sqrt(eigenvalue + eps)``, and their
        negatives (airbench §3.2)."""
        x = x[:5000].float()
        c, (h, w) = x.shape[1], self.whiten.weight.shape[2:]
        patches = x.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w)
        flat = patches.reshape(len(patches), -1).double()
        eigval, eigvec = torch.linalg.eigh(flat.T @ flat / len(flat))
        eigval, eigvec = eigval.flip(0).view(-1, 1, 1, 1), eigvec.T.reshape(c * h * w, c, h, w).flip(0)
        scaled = (eigvec / torch.sqrt(eigval.clamp_min(0) + eps)).to(self.whiten.weight.dtype)
        self.whiten.weight.data[:] = torch.cat((scaled, -scaled))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """SGD groups: BatchNorm/whitening shifts at ``lr * 64`` with ``weight_decay / 64`` (the same
        decay per step, airbench's bias scaler); everything else at ``lr``."""
        biases = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith("bias")]
        ids = {id(p) for p in biases}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": biases, "lr": lr * self.bias_scaler, "weight_decay": weight_decay / self.bias_scaler},
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.whiten(x))
        return self.pool(self.groups(x)).flatten(1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.scale

    def _flip_mean(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self._logits(x) + self._logits(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_tta and not self.training:
            # airbench TTA level 2: the mirror pair, plus the pair shifted one px up-left and down-right
            h, w = x.shape[-2:]
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = 0.5 * (self._flip_mean(padded[..., :h, :w]) + self._flip_mean(padded[..., 2:, 2:]))
            return 0.5 * self._flip_mean(x) + 0.5 * shifted
        return self._logits(x)


@MODELS.register("resnet18")
class ResNet18(nn.Module):
    """torchvision's ResNet-18 in its CIFAR form (He et al. 2016 §4.2 practice for 32x32 inputs): a 3x3
    stride-1 stem and no stem max-pool. ``width`` is the first stage's channels (64 = the standard net)."""

    def __init__(self, n_classes: int, in_channels: int = 3, width: int = 64):
        from torchvision.models.resnet import BasicBlock, ResNet  # why: loads torch._dynamo (1.5 s a start)

        super().__init__()
        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=n_classes, width_per_group=64)
        if width != 64:  # rebuild the stages at another width (the stem conv is replaced below)
            net.inplanes = width
            net.bn1 = nn.BatchNorm2d(width)
            net.layer1 = net._make_layer(BasicBlock, width, 2)
            net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
            net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
            net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
            net.fc = nn.Linear(8 * width, n_classes)
        net.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        self.fc = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.feature_dim = self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def build_model(
    name: str, seed: int, n_classes: int, in_channels: int, width: int, image_size: int,
    flip_tta: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build registered model ``name`` under ``seed``; return it and the kwargs that rebuild it.

    Only the kwargs the model's ``__init__`` accepts are passed (and returned).
    """
    cls = MODELS.get(name)
    offered = {"n_classes": n_classes, "in_channels": in_channels, "width": width, "image_size": image_size,
               "flip_tta": flip_tta}
    kwargs = {k: v for k, v in offered.items() if k in hyperparameters(cls)}
    with seeded(seed):
        model = cls(**kwargs)
    return model, kwargs
