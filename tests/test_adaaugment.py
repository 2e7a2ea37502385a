"""AdaAugment (paper 001 part three): reward, lambda schedule, A2C updates, determinism, BatchNorm safety."""
from __future__ import annotations

import pytest
import torch

from dataopt.errors import ConfigError, DataError
from dataopt.image_kernels import MEAN, STD
from dataopt.registry import get_params
from dataopt.train.adaaugment import POLICIES, AdaAugment, quantise, reward, schedule
from dataopt.train.loop import FitConfig, fit, seeded
from dataopt.train.nets import SmallCNN

N, C, S, K = 64, 3, 16, 4
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, C, S, S), dtype=torch.uint8, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    return x.to(device), y.to(device)


def _model(device="cpu", seed=0):
    with seeded(seed):
        return SmallCNN(K, in_channels=C, width=8, image_size=S).to(device)


def _ada(model, y, epochs=3, **kw):
    kw = {"hidden1": 32, "hidden2": 16, "levels": 4, "groups": 2, **kw}
    return AdaAugment(N, K, model.feature_dim, epochs, **kw).bind(model, y)


def _train(seed=0, epochs=3):
    x, y = _data()
    model = _model()
    ada = _ada(model, y, epochs=epochs, seed=seed)
    snaps = []

    def on_epoch(epoch, _model):
        snaps.append(ada.magnitudes_.clone())
        return ada.epoch_stats(epoch)

    rows = fit(model, x, y, FitConfig(epochs=epochs, batch_size=32, progress=False, seed=0),
               on_epoch=on_epoch, augment_fn=ada)
    return model, ada, rows, snaps


def test_reward_prefers_easy_augmentation_early_and_hard_late():
    l_full, l_none = torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0])
    l_ada = torch.tensor([1.5, 2.5])
    early = reward(l_full, l_ada, l_none, 1.0)  # lam = 1 at epoch 1 of many
    late = reward(l_full, l_ada, l_none, 0.0)
    assert schedule(1, 50) == 1.0
    assert early[0] > early[1]  # smaller L_ada -> larger reward
    assert late[1] > late[0]
    torch.testing.assert_close(early, l_full - l_ada)
    torch.testing.assert_close(late, l_ada - l_none)
    for lam in (0.0, 0.3, 1.0):  # dr / dL_ada = 1 - 2 lam
        a = l_ada.clone().requires_grad_(True)
        reward(l_full, a, l_none, lam).sum().backward()
        torch.testing.assert_close(a.grad, torch.full((2,), 1.0 - 2.0 * lam))


def test_schedule_and_quantise():
    assert [schedule(e, 5) for e in range(1, 6)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert schedule(1, 1) == 1.0 and schedule(9, 5) == 0.0
    q = quantise(torch.tensor([0.0, 0.1, 0.2, 0.5, 0.99, 1.0], dtype=torch.float64), 4)
    torch.testing.assert_close(q, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_call_returns_a_normalised_batch_and_updates_only_the_policy(device):
    x, y = _data(device)
    model = _model(device)
    ada = _ada(model, y)
    actor = [p.detach().clone() for p in ada.actor_.parameters()]
    critic = [p.detach().clone() for p in ada.critic_.parameters()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.arange(8, 40, device=device)
    out = ada(x[idx], idx, 1, torch.Generator().manual_seed(0))
    assert out.shape == (32, C, S, S) and out.dtype == torch.float32 and out.device.type == device
    assert float(out.min()) >= (0 - MEAN) / STD - 1e-6 and float(out.max()) <= (1 - MEAN) / STD + 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(actor, ada.actor_.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic, ada.critic_.parameters()))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    m = ada.magnitudes_
    assert m.dtype == torch.float32 and m.device.type == "cpu" and m.shape == (N,)
    assert bool(((m[8:40] >= 0) & (m[8:40] <= 1)).all()) and bool((m[8:40] > 0).any())
    assert bool((m[:8] == 0).all() and (m[40:] == 0).all())
    stats = ada.epoch_stats(1)
    assert stats["ada_lambda"] == 1.0 and stats["ada_extra_forwards"] == 3 * 32
    assert abs(stats["ada_mean_magnitude"] - 0.5) < 0.1  # near-zero last layer: mu(s) = 0.5 at the start


def test_extra_forwards_leave_batchnorm_running_stats_alone():
    x, y = _data()
    model = _model()
    ada = _ada(model, y)
    idx = torch.arange(32)
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    ada(x[idx], idx, 1, torch.Generator().manual_seed(0))
    assert model.training  # train mode restored for the loop's own forward
    for k, v in model.named_buffers():
        assert torch.equal(before[k], v), k
    # the check has teeth: any forward in train mode moves the running statistics
    with torch.no_grad():
        model.features((x[idx].float() / 255 - MEAN) / STD)
    assert not torch.equal(before["body.0.1.running_mean"], model.body[0][1].running_mean)


def test_returned_batch_follows_the_chosen_magnitude():
    x, y = _data()
    idx = torch.arange(32)
    for bias, expect_plain in ((-50.0, True), (50.0, False)):
        model = _model()
        ada = _ada(model, y, base="none", sigma=1e-4, actor_lr=1e-12, critic_lr=1e-12)
        with torch.no_grad():
            ada.actor_[-1].bias.fill_(bias)  # mu(s) ~ 0 or ~ 1 for every sample
        out = ada(x[idx], idx, 1, torch.Generator().manual_seed(0))
        plain = (x[idx].float() / 255 - MEAN) / STD
        changed = (out - plain).abs().flatten(1).amax(1) > 1e-6
        if expect_plain:
            assert not bool(changed.any()) and float(ada.magnitudes_[:32].max()) < 0.01
        else:
            assert float(changed.float().mean()) > 0.8 and float(ada.magnitudes_[:32].min()) > 0.99


def test_fit_runs_lambda_decays_and_magnitudes_move():
    model, ada, rows, snaps = _train()
    assert [r["ada_lambda"] for r in rows] == [1.0, 0.5, 0.0]
    assert all(r["ada_extra_forwards"] == 3 * N for r in rows)
    assert all(0 <= r["ada_mean_magnitude"] <= 1 for r in rows)
    assert all(isinstance(r["ada_mean_reward"], float) for r in rows)
    m = ada.magnitudes_
    assert bool(((m >= 0) & (m <= 1)).all()) and bool((m > 0).all())  # every row seen
    assert not torch.equal(snaps[0], m)


def test_same_seed_same_run_other_seed_other_magnitudes():
    m1, a1, _, _ = _train(seed=0)
    m2, a2, _, _ = _train(seed=0)
    torch.testing.assert_close(a1.magnitudes_, a2.magnitudes_, rtol=0, atol=0)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _, a3, _, _ = _train(seed=1)
    assert not torch.equal(a1.magnitudes_, a3.magnitudes_)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs(policy):
    x, y = _data()
    model = _model()
    ada = _ada(model, y, policy=policy, base="crop")
    idx = torch.arange(16)
    out = ada(x[idx], idx, 2, torch.Generator().manual_seed(1))
    assert out.shape == (16, C, S, S) and bool(torch.isfinite(out).all())


def test_hyperparameters_and_errors():
    x, y = _data()
    model = _model()
    ada = AdaAugment(N, K, model.feature_dim, 3, sigma=0.2)
    assert get_params(ada)["sigma"] == 0.2 and not hasattr(ada, "actor_")  # __init__ only stores
    with pytest.raises(ConfigError, match="policy"):
        AdaAugment(N, K, model.feature_dim, 3, policy="cutout").bind(model, y)
    with pytest.raises(ConfigError, match="feature_dim"):
        AdaAugment(N, K, model.feature_dim + 1, 3).bind(model, y)
    with pytest.raises(ConfigError, match="levels"):
        AdaAugment(N, K, model.feature_dim, 3, levels=1).bind(model, y)
    with pytest.raises(RuntimeError, match="bind"):
        ada(x[:4], torch.arange(4), 1, torch.Generator())
    with pytest.raises(DataError, match="uint8"):
        _ada(model, y)(x[:4].float(), torch.arange(4), 1, torch.Generator())
