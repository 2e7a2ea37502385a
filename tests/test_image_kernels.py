"""The image kernels shared by the train loop, the augmentation policies and AdaAugment."""
from __future__ import annotations

import numpy as np
import torch

from dataopt import image_kernels


def test_random_crop_flip_per_sample_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8).repeat(50, 1, 1, 1)  # 200 images
    shift = torch.tensor([0, 1, 2, 2]).repeat(50)
    out = image_kernels.random_crop_flip(x, 2, False, gen, max_shift=shift)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = []
    for i in range(len(x)):  # recover each sample's translation (a test, not a hot path)
        found = [
            (dy, dx) for dy in range(5) for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert found, i
        dy, dx = found[0]
        offsets.append((abs(dy - 2), abs(dx - 2)))
    offsets = np.array(offsets).reshape(50, 4, 2)
    assert (offsets[:, 0] == 0).all()  # shift 0: untouched
    assert offsets[:, 1].max() == 1  # shift 1: at most one px, and it does move
    assert offsets[:, 2:].max() == 2 and (offsets[:, 2:] == 0).any()  # full range used


def test_standardise_and_normalise():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    expected = torch.tensor([[[[-0.5 / 0.25, 0.5 / 0.25]]]])
    assert torch.equal(image_kernels.standardise(x), expected)
    assert torch.equal(image_kernels.standardise(x.float()), expected)  # a cropped (float) batch alike
    assert torch.equal(image_kernels.normalise(x), expected)
    emb = torch.tensor([[0.3, -2.0]], dtype=torch.float64)
    assert torch.equal(image_kernels.normalise(emb), emb.float())  # embeddings are not rescaled


def test_crop_pad_defaults_to_an_eighth_of_the_width():
    assert image_kernels.crop_pad(None, 32) == 4
    assert image_kernels.crop_pad(None, 4) == 1
    assert image_kernels.crop_pad(3, 32) == 3
