"""The airbench94 recipe items of the train loop: precision (autocast), alternating flips and the
whitening-bias freeze; each off by default, so today's runs reproduce."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dataopt.config import validate
from dataopt.errors import ConfigError
from dataopt.image_kernels import MEAN, STD
from dataopt.train import loop
from dataopt.train.nets import AirbenchNet, SmallCNN
from dataopt.train.trainer import check_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def coded_images(n: int, size: int = 16) -> torch.Tensor:
    """uint8 (n, 3, size, size): channel 0 holds the sample's index everywhere (a translation keeps a
    constant image constant), channel 1 is bright on the left half only (a mirror moves it right)."""
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    x[:, 1, :, : size // 2] = 255
    return x


class FlipRecorder(nn.Module):
    """Records, per training forward, each input's sample index and whether it arrived mirrored."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            pixels = (x * STD + MEAN) * 255  # undo standardise
            index = pixels[:, 0].mean((1, 2)).round().long()
            w = x.shape[-1]
            mirrored = pixels[:, 1, :, : w // 4].mean((1, 2)) < pixels[:, 1, :, -(w // 4):].mean((1, 2))
            self.seen.append((index, mirrored))
        return self.fc(x[:, :1, 0, 0])


def flips_per_epoch(flip: str, epochs: int = 4, n: int = 40, batch: int = 16) -> list[torch.Tensor]:
    """(n,) bool per epoch: which samples were mirrored in that epoch."""
    m = FlipRecorder()
    loop.fit(m, coded_images(n), torch.arange(n) % 2,
             loop.FitConfig(epochs=epochs, batch_size=batch, augment="flip_crop", flip=flip, progress=False))
    steps = -(-n // batch)
    out = []
    for e in range(epochs):
        index = torch.cat([i for i, _ in m.seen[e * steps:(e + 1) * steps]])
        mirrored = torch.cat([f for _, f in m.seen[e * steps:(e + 1) * steps]])
        assert sorted(index.tolist()) == list(range(n))  # every sample once: the decoding is right
        flipped = torch.zeros(n, dtype=torch.bool)
        flipped[index] = mirrored
        out.append(flipped)
    return out


def test_alternating_flips_mirror_exactly_the_complement_on_the_next_epoch():
    epochs = flips_per_epoch("alternating")
    assert 0 < int(epochs[0].sum()) < len(epochs[0])  # a coin per sample, not all or none
    for a, b in zip(epochs, epochs[1:]):
        assert torch.equal(b, ~a)
    # random flips draw afresh each epoch: not the complement
    rnd = flips_per_epoch("random")
    assert not all(torch.equal(b, ~a) for a, b in zip(rnd, rnd[1:]))


def test_alternating_flips_need_the_built_in_flip_crop():
    x, y = coded_images(8), torch.arange(8) % 2
    with pytest.raises(ValueError, match="alternating"):
        loop.fit(FlipRecorder(), x, y, loop.FitConfig(epochs=1, augment="crop", flip="alternating", progress=False))
    with pytest.raises(ValueError, match="alternating"):
        loop.fit(FlipRecorder(), x, y, loop.FitConfig(epochs=1, augment="flip_crop", flip="alternating",
                                                      progress=False),
                 augment_fn=lambda xb, idx, epoch, gen: xb.float())
    with pytest.raises(ValueError, match="flip 'sometimes'"):
        loop.fit(FlipRecorder(), x, y, loop.FitConfig(epochs=1, flip="sometimes", progress=False))


def whiten_bias_per_epoch(whiten_bias_epochs, epochs: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randint(0, 60, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 1, 0] += 150
    with loop.seeded(0):
        model = AirbenchNet(2, width=8, image_size=8)
    biases = []
    loop.fit(model, x, y, loop.FitConfig(epochs=epochs, batch_size=16, augment="flip_crop", progress=False,
                                         whiten_bias_epochs=whiten_bias_epochs),
             on_epoch=lambda epoch, m: biases.append(m.whiten.bias.detach().clone()))
    assert model.whiten.bias.requires_grad  # handed back as built
    return biases


def test_whitening_bias_is_frozen_after_its_epochs():
    frozen = whiten_bias_per_epoch(2)
    assert not torch.equal(frozen[0], frozen[1])  # trained in epochs 1 and 2
    assert torch.equal(frozen[1], frozen[2]) and torch.equal(frozen[2], frozen[3])  # then never again
    always = whiten_bias_per_epoch(None)  # the default: trained throughout
    assert not torch.equal(always[2], always[3])
    assert torch.equal(always[1], frozen[1])  # the freeze changes nothing before it starts


def test_whitening_bias_freeze_needs_a_whitening_layer():
    x, y = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8) % 2
    with pytest.raises(ValueError, match="whitening layer"):
        loop.fit(SmallCNN(2, width=4, image_size=8), x, y,
                 loop.FitConfig(epochs=1, whiten_bias_epochs=1, progress=False))


def losses(precision: str) -> list[float]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    x = torch.randint(0, 255, (32, 3, 8, 8), generator=g, dtype=torch.uint8)
    with loop.seeded(0):
        model = SmallCNN(2, width=4, image_size=8)
    hist = loop.fit(model, x, y, loop.FitConfig(epochs=2, batch_size=8, precision=precision, progress=False))
    return [h["loss"] for h in hist]


def test_precision_auto_is_float32_on_the_cpu_and_autocast_changes_the_numbers():
    assert loop.autocast_dtype("auto", torch.device("cpu")) is None
    assert loop.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16  # today's GPU behaviour
    assert loop.autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    fp32 = losses("fp32")
    assert losses("auto") == fp32  # bit for bit: the default did not change on the CPU
    for low in ("bf16", "fp16"):  # autocast on the CPU too (the GPU script's toy run uses it)
        got = losses(low)
        assert all(map(torch.isfinite, torch.tensor(got))) and got != fp32


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, fp32, bf16, fp16"):
        losses("fp8")
    with pytest.raises(ConfigError, match=r"train\.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"):
        validate({"train": {"precision": "fp8"}})


def test_params_default_to_todays_recipe_and_check_what_a_run_cannot_honour():
    tp = validate({}).train
    assert (tp.precision, tp.flip, tp.whiten_bias_epochs) == ("auto", "random", None)
    with pytest.raises(ConfigError, match="train: flip: 'alternating' mirrors under augment 'flip_crop'"):
        validate({"train": {"flip": "alternating"}})
    tp = validate({"train": {"augment": "flip_crop", "flip": "alternating", "whiten_bias_epochs": 3}}).train
    check_recipe(tp, AirbenchNet(2, width=4, image_size=8), None)  # fine
    with pytest.raises(ConfigError, match="flips by itself"):
        check_recipe(tp, AirbenchNet(2, width=4, image_size=8), augment_fn=object())
    with pytest.raises(ConfigError, match="train.whiten_bias_epochs"):
        check_recipe(tp.model_copy(update={"flip": "random"}), SmallCNN(2, width=4, image_size=8), None)
