"""Augmenters: policies recorded by fit, applied per batch on the device (per-sample ops and magnitudes,
deterministic, global RNG untouched), MixUp/CutMix soft targets, magnitude from a signal, and the
feature-space functions (Gaussian noise, SMOTE)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dataopt.errors import ConfigError
from dataopt.image_kernels import MEAN, STD
from dataopt.optimize.augment.augmenters import MagnitudeFromSignal
from dataopt.optimize.augment.batch import BatchAugmenter, default_loss, slot, soft_targets
from dataopt.optimize.augment.features import gaussian_noise, smote, smote_targets
from dataopt.registry import AUGMENTERS

IMAGE = {
    "randaugment": {"policy": "randaugment", "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31},
    "trivialaugment": {"policy": "trivialaugment", "num_magnitude_bins": 31},
    "autoaugment": {"policy": "autoaugment", "policy_name": "cifar10"},
    "augmix": {"policy": "augmix", "severity": 3, "mixture_width": 3, "chain_depth": -1, "alpha": 1.0},
    "flips_crops": {"policy": "flips_crops", "pad_fraction": 0.125, "flip": True},
}


def batch(b=48, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def plain(x):
    return (x.float() / 255.0 - MEAN) / STD


def test_fit_records_policy_and_magnitude():
    y = np.arange(10) % 3
    ra = AUGMENTERS.build("randaugment", {"magnitude": 15}).fit(y)
    assert ra.augment_ == {"policy": "randaugment", "num_ops": 2, "magnitude": 15, "num_magnitude_bins": 31}
    np.testing.assert_allclose(ra.augment_magnitude_, 0.5)
    assert ra.reason_[0].startswith("randaugment: magnitude 0.50")
    mix = AUGMENTERS.build("mixup", {"alpha": 0.4}).fit(y)
    assert mix.augment_ == {"policy": "mixup", "alpha": 0.4} and mix.augment_magnitude_ is None
    assert [slot(p) for p in ("augmix", "cutmix", "smote")] == ["image", "mix", "features"]
    with pytest.raises(ConfigError, match="randaugment.magnitude must be in"):
        AUGMENTERS.build("randaugment", {"magnitude": 40}).fit(y)
    with pytest.raises(ConfigError, match="valid: cifar10, imagenet, svhn"):
        AUGMENTERS.build("autoaugment", {"policy_name": "mnist"}).fit(y)


@pytest.mark.parametrize("name", sorted(IMAGE))
def test_image_policies_change_batches_deterministically(name):
    x = batch()
    idx = torch.arange(len(x))
    mags = torch.where(idx % 4 == 0, 0.0, 0.6).double()  # every 4th sample: magnitude 0
    aug = BatchAugmenter({"image": IMAGE[name]}, mags)
    state = torch.get_rng_state()
    a = aug(x, idx, 1, torch.Generator().manual_seed(3))
    b = aug(x, idx, 1, torch.Generator().manual_seed(3))
    c = aug(x, idx, 1, torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.get_rng_state()), "the global RNG was used or changed"
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    moved = (a != plain(x)).flatten(1).any(1)
    assert moved[idx % 4 != 0].float().mean() > 0.5  # most augmented samples changed
    assert not moved[idx % 4 == 0].any()  # magnitude 0: untouched (no base augment)


def test_ops_differ_within_a_batch_and_magnitude_scales_strength():
    # one image repeated: a single op per call would transform every copy the same way
    x = batch(b=1).repeat(64, 1, 1, 1)
    idx = torch.arange(64)
    one_op = {"policy": "randaugment", "num_ops": 1, "magnitude": 9, "num_magnitude_bins": 31}
    out = BatchAugmenter({"image": one_op}, torch.full((64,), 0.5, dtype=torch.float64), groups=8)(
        x, idx, 1, torch.Generator().manual_seed(0))
    assert len(torch.unique(out.flatten(1), dim=0)) >= 3
    # crops: magnitude m allows shifts up to ceil(m * pad) px; 0 never moves, 1 moves most samples
    img = batch(b=1, size=32).repeat(200, 1, 1, 1)
    crop = {"policy": "flips_crops", "pad_fraction": 0.125, "flip": False}
    mags = torch.tensor([0.0] * 100 + [1.0] * 100, dtype=torch.float64)
    out = BatchAugmenter({"image": crop}, mags)(img, torch.arange(200), 1, torch.Generator().manual_seed(0))
    moved = (out != plain(img)).flatten(1).any(1)
    assert not moved[:100].any() and moved[100:].float().mean() > 0.9


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_records_lam_and_the_loss_is_soft_target_cross_entropy(kind):
    x = batch(b=16)
    aug = BatchAugmenter({"mix": {"policy": kind, "alpha": 1.0}}, None, n_classes=5)
    out = aug(x, torch.arange(16), 1, torch.Generator().manual_seed(1))
    lam = aug.mix
    assert lam is not None and 0.0 <= lam <= 1.0
    p = plain(x)
    if kind == "mixup":
        torch.testing.assert_close(out, lam * p + (1 - lam) * p.roll(1, 0))
    else:  # every pixel comes from the sample or its partner; the partner's share is 1 - lam
        from_self = (out == p).all(1)
        from_partner = (out == p.roll(1, 0)).all(1)
        assert (from_self | from_partner).all()
        share = (~from_self).float().mean().item()
        assert share == pytest.approx(1 - lam, abs=1e-6)
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    w = torch.ones(16)
    got = aug.mixed_loss(default_loss())(logits, y, w, 1, torch.arange(16))
    soft = soft_targets(y, lam, 5)
    expect = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(got, expect)
    aug.mix = None  # an unmixed batch: the plain loss
    torch.testing.assert_close(aug.mixed_loss(default_loss())(logits, y, w, 1, torch.arange(16)),
                               F.cross_entropy(logits, y))


def test_magnitude_from_signal_ranks_easy_samples_highest():
    s = pd.DataFrame({"sample_id": np.arange(5), "label": 0, "loss_last": [0.5, 0.1, 2.0, 0.3, 1.0],
                      "tag": list("abcde")})
    m = MagnitudeFromSignal(low=0.2, high=1.0).fit(s)
    np.testing.assert_allclose(m.augment_magnitude_, [0.6, 1.0, 0.2, 0.8, 0.4])
    assert m.reason_[1] == "magnitude_from_plan: loss_last 0.1 -> magnitude 1.00"
    rev = MagnitudeFromSignal(easy_high=False).fit(s)
    assert rev.augment_magnitude_[2] == 1.0 and rev.augment_magnitude_[1] == 0.0
    with pytest.raises(ConfigError, match="valid: loss_last$"):
        MagnitudeFromSignal(signal="tag").fit(s)


def test_gaussian_noise_has_the_requested_spread_and_is_seeded():
    z = torch.zeros(4000, 8)
    a = gaussian_noise(z, 0.1, torch.Generator().manual_seed(0))
    b = gaussian_noise(z, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.std().item() == pytest.approx(0.1, rel=0.05)


def test_smote_fills_minority_classes_with_same_class_interpolations():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 10 + [2] * 2)
    z = rng.normal(size=(52, 3)).astype(np.float32) + 5 * y[:, None]
    targets = smote_targets(y)
    np.testing.assert_array_equal(targets, [40, 40, 40])
    syn, syn_y = smote(z, y, 3, targets, np.random.default_rng(1))
    assert syn.shape == (68, 3) and syn.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(syn_y, minlength=3), [0, 30, 38])
    # class 2 has two points: every synthetic row lies on the segment between them
    a, b = z[y == 2]
    u = (syn[syn_y == 2] - a) @ (b - a) / ((b - a) @ (b - a))
    np.testing.assert_allclose(a + u[:, None] * (b - a), syn[syn_y == 2], atol=1e-5)
    assert ((u >= 0) & (u <= 1)).all()
    # class 1: inside the class's bounding box (interpolations never leave it)
    c1 = z[y == 1]
    assert (syn[syn_y == 1] >= c1.min(0) - 1e-6).all() and (syn[syn_y == 1] <= c1.max(0) + 1e-6).all()
    again, _ = smote(z, y, 3, targets, np.random.default_rng(1))
    np.testing.assert_array_equal(syn, again)
    half, _ = smote(z, y, 3, smote_targets(y, 0.5), np.random.default_rng(1))
    assert len(half) == 10 + 18
    policy = AUGMENTERS.build("smote", {"k": 3}).fit(y)
    assert policy.augment_["synthetic_per_class"] == {"1": 30, "2": 38}
    assert policy.reason_[0] == "" and policy.reason_[-1] == "smote: minority class, 38 synthetic rows for it"


def _shifts_within(out: torch.Tensor, x: torch.Tensor, pad: int) -> torch.Tensor:
    """(B,) bool: each output row is one of the reflect-padded crops of its input shifted <= pad px."""
    h, w = x.shape[-2:]
    padded = F.pad(plain(x), (pad,) * 4, mode="reflect")
    hit = torch.zeros(len(x), dtype=torch.bool)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            hit |= (out == padded[..., dy:dy + h, dx:dx + w]).flatten(1).all(1)
    return hit


def test_base_crop_honours_train_translate():
    from dataopt.train.adaaugment import AdaAugment
    from dataopt.train.nets import SmallCNN

    x = batch(b=200, size=32)
    idx, gen = torch.arange(200), lambda: torch.Generator().manual_seed(0)
    one_px = BatchAugmenter({}, None, base="crop", translate=1)(x, idx, 1, gen())
    assert _shifts_within(one_px, x, 1).all()
    default = BatchAugmenter({}, None, base="crop")(x, idx, 1, gen())  # width // 8 = 4 px
    assert not _shifts_within(default, x, 1).all() and _shifts_within(default, x, 4).all()
    # AdaAugment's base crop (before its policy) reads the same setting
    model = SmallCNN(10, width=4)
    ada = AdaAugment(200, 10, model.feature_dim, 2, base="crop", translate=1).bind(model, torch.zeros(200).long())
    assert _shifts_within(plain(ada._base(x, gen())), x, 1).all()
    with pytest.raises(ConfigError, match="translate must be >= 1"):
        AdaAugment(200, 10, model.feature_dim, 2, translate=0).bind(model, torch.zeros(200).long())
