"""The shared training loop: weighted sampling, per-sample augmentation magnitude, determinism."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dataopt import image_kernels
from dataopt.errors import DivergedError
from dataopt.train import loop


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder(nn.Module):
    """A linear classifier that records every training batch it is given."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.fc = nn.Linear(d, k)
        self.batches: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.batches.append(x.detach().clone())
        return self.fc(x.flatten(1))


def features(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Column 0 holds the sample's index, so a recorded batch tells which samples were drawn."""
    x = torch.zeros(n, 2)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x, torch.arange(n) % 2


def drawn(model: Recorder) -> torch.Tensor:
    return torch.cat([b[:, 0] for b in model.batches]).long()


def cfg(**kw) -> loop.FitConfig:
    base = dict(epochs=3, batch_size=16, lr=0.01, progress=False)
    base.update(kw)
    return loop.FitConfig(**base)


def test_default_is_one_shuffled_pass_per_epoch():
    x, y = features()
    m = Recorder(2, 2)
    hist = loop.fit(m, x, y, cfg())
    ids = drawn(m).view(3, -1)
    for epoch in ids:  # a permutation every epoch
        assert sorted(epoch.tolist()) == list(range(40))
    assert [h["samples_seen"] for h in hist] == [40, 80, 120]


def test_sampling_weights_draw_with_replacement_in_proportion():
    x, y = features()
    w = torch.zeros(40)
    w[:10] = 1.0
    w[10:20] = 3.0  # samples 20..39 are never drawn
    m = Recorder(2, 2)
    hist = loop.fit(m, x, y, cfg(epochs=50), sampling_weights=w)
    ids = drawn(m)
    assert len(ids) == 40 * 50 and hist[-1]["samples_seen"] == 2000 and hist[-1]["steps"] == 150
    assert (ids < 20).all()
    counts = torch.bincount(ids, minlength=40).double()
    share_heavy = counts[10:20].sum() / counts.sum()
    assert share_heavy == pytest.approx(0.75, abs=0.04)  # 3 / (1 + 3)
    assert len(torch.unique(drawn(m)[:40])) < 20  # replacement: duplicates within one epoch


def test_sampling_is_seeded():
    x, y = features()
    w = torch.linspace(0.1, 1.0, 40)
    runs = []
    for seed in (0, 0, 1):
        m = Recorder(2, 2)
        loop.fit(m, x, y, cfg(seed=seed), sampling_weights=w)
        runs.append(drawn(m))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("bad", [torch.full((40,), -1.0), torch.zeros(40), torch.ones(39)])
def test_bad_sampling_weights_raise(bad):
    x, y = features()
    with pytest.raises(ValueError, match="sampling_weights"):
        loop.fit(Recorder(2, 2), x, y, cfg(), sampling_weights=bad)


def test_augment_magnitudes_translate_only_augmented_samples():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1])
    m = Recorder(3 * 8 * 8, 2)
    loop.fit(m, x, y, cfg(epochs=30, batch_size=2), augment_magnitudes=torch.tensor([0.0, 1.0]))
    plain = image_kernels.normalise(x)
    batches = torch.cat(m.batches)  # 30 epochs x 2 samples, normalised inputs
    is_a = torch.tensor([torch.equal(b, plain[0]) for b in batches])
    is_b = torch.tensor([torch.equal(b, plain[1]) for b in batches])
    assert int(is_a.sum()) == 30  # sample 0 (magnitude 0) always arrives unchanged
    assert int(is_b.sum()) < 20  # sample 1 is translated most of the time ((3x3 - 1) / 9 offsets)


def test_default_path_draws_the_same_random_stream_as_before():
    """Without the new arguments, fit shuffles with randperm and augments with random_crop_flip's
    randint/rand draws on one seeded generator, in that order (the behaviour before they existed)."""
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 2, (16,))
    m = Recorder(3 * 8 * 8, 2)
    loop.fit(m, x, y, cfg(augment="flip_crop", epochs=1, batch_size=16, seed=5))
    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(16, generator=gen)
    expected = image_kernels.random_crop_flip(x[perm].float(), 1, True, gen)
    expected = ((expected / 255.0) - image_kernels.MEAN) / image_kernels.STD
    assert torch.equal(m.batches[0], expected)


def test_non_finite_loss_stops_at_that_step_with_one_message():
    """The step that first gives a NaN loss ends training before its update; the message names the
    step and the learning-rate parameter to lower."""
    x, y = features()
    m = Recorder(2, 2)
    x[25, 1] = float("nan")  # the sample at position 25 of the first epoch's order poisons its batch
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    step = int((order == 25).nonzero()) // 16 + 1
    before = m.fc.weight.detach().clone()
    with pytest.raises(DivergedError) as exc:
        loop.fit(m, x, y, cfg(desc="proxy", lr_key="embed.kwargs.lr", lr=0.5))
    assert str(exc.value) == (f"proxy diverged at epoch 1, step {step}: loss is nan; "
                              "lower embed.kwargs.lr (0.5)")
    assert len(m.batches) == step and torch.isfinite(m.fc.weight).all()
    assert step > 1 or torch.equal(m.fc.weight, before)


def test_non_finite_weights_stop_after_the_epoch():
    x, y = features()
    m = Recorder(2, 2)
    m.register_buffer("stat", torch.tensor([float("inf")]))  # e.g. a batch-norm statistic gone bad
    with pytest.raises(DivergedError, match=r"^train diverged in epoch 1: the weights are not finite; "
                                            r"lower the learning rate \(0.01\)$"):
        loop.fit(m, x, y, cfg())


def test_a_stop_request_ends_a_loop_running_in_a_worker_thread():
    """Under `dataopt run` a stage trains in Prefect's worker thread, which a signal never reaches:
    the command's stop request does, at the next step."""
    import threading

    from dataopt import interrupt

    x, y = features(4000)
    started, outcome = threading.Event(), []

    def on_epoch(epoch, model):
        started.set()

    def train():
        try:
            loop.fit(Recorder(2, 2), x, y, cfg(epochs=10_000, batch_size=8), on_epoch=on_epoch)
            outcome.append("finished")
        except KeyboardInterrupt:
            outcome.append("stopped")

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    try:
        assert started.wait(30)
        interrupt.request_stop()
        worker.join(5)
    finally:
        interrupt.clear()
    assert not worker.is_alive() and outcome == ["stopped"]
