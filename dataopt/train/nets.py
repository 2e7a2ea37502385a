"""Networks: a small CNN for images of any size >= 8 px, and a head on frozen embeddings."""
from __future__ import annotations

import torch
from torch import nn

from dataopt.registry import MODELS


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
    """A linear (``hidden=0``) or one-hidden-layer classifier on ``(B, dim)`` embeddings."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True))
            self.fc = nn.Linear(hidden, n_classes)
            self.feature_dim = hidden
        else:
            self.body = nn.Identity()
            self.fc = nn.Linear(dim, n_classes)
            self.feature_dim = dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))
