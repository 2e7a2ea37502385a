"""dataopt.train.losses.make_loss: each directive against hand-computed values on tiny tensors,
their composition, validation, and the loop's ``loss_fn`` hook."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataopt.errors import ConfigError
from dataopt.train import loop
from dataopt.train.losses import make_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
Y = torch.tensor([0, 2, 0, 2])
W = torch.tensor([1.0, 0.5, 2.0, 1.5])


def ce(logits=LOGITS, y=Y, w=W, eps=0.0):
    return (F.cross_entropy(logits, y, reduction="none", label_smoothing=eps) * w).sum() / len(y)


def call(directives, logits=LOGITS, w=W, epoch=1, n_classes=3, prior=None):
    return make_loss(directives, n_classes, prior)(logits, Y, w, epoch, torch.arange(len(Y)))


def test_no_directive_is_the_loops_cross_entropy_bit_for_bit():
    assert torch.equal(call({}), ce())
    assert torch.equal(call(None), ce())
    assert torch.equal(call({"label_smoothing": 0.1}), ce(eps=0.1))


def test_neutral_settings_equal_cross_entropy():
    target = ce()
    # focal γ = 0 and soft bootstrap β = 1 (general path), logit adjustment τ = 0
    assert torch.allclose(call({"focal": {"gamma": 0.0}, "bootstrap": {"kind": "soft", "beta": 1.0}}), target)
    assert torch.allclose(call({"bootstrap": {"kind": "soft", "beta": 1.0}}), target)
    assert torch.allclose(call({"bootstrap": {"kind": "hard", "beta": 1.0}}), target)
    assert torch.equal(call({"logit_adjustment": {"tau": 0.0, "prior": [0.7, 0.2, 0.1]}}), target)
    # the general path's label smoothing matches torch's
    assert torch.allclose(call({"label_smoothing": 0.1, "bootstrap": {"kind": "soft", "beta": 1.0}}),
                          ce(eps=0.1))


def test_focal_matches_lin_et_al():
    p = LOGITS.softmax(1)
    pt = p[torch.arange(4), Y]
    expected = (-(1 - pt) ** 2 * pt.log() * W).sum() / 4
    assert torch.allclose(call({"focal": {"gamma": 2.0}}), expected)
    assert call({"focal": {"gamma": 2.0}}) < ce()  # down-weights well-classified rows


def test_logit_adjustment_matches_menon_et_al():
    prior = torch.tensor([0.7, 0.2, 0.1])
    expected = ce(LOGITS + 1.5 * prior.log())
    assert torch.allclose(call({"logit_adjustment": {"tau": 1.5, "prior": prior.tolist()}}), expected)
    # the prior may come from the caller; a shorter prior pads absent classes with π = 0
    assert torch.allclose(call({"logit_adjustment": {"tau": 1.5}}, prior=prior.tolist()), expected)
    short = call({"logit_adjustment": {"tau": 1.0, "prior": [0.5, 0.5]}})
    assert torch.isfinite(short)


def test_bootstrapping_matches_reed_et_al():
    logp = LOGITS.log_softmax(1)
    p = logp.exp()
    onehot = F.one_hot(Y, 3).float()
    soft = (-(0.6 * onehot + 0.4 * p) * logp).sum(1)
    assert torch.allclose(call({"bootstrap": {"kind": "soft", "beta": 0.6}}), (soft * W).sum() / 4)
    hard = (-(0.8 * onehot + 0.2 * F.one_hot(p.argmax(1), 3).float()) * logp).sum(1)
    assert torch.allclose(call({"bootstrap": {"kind": "hard", "beta": 0.8}}), (hard * W).sum() / 4)
    assert torch.allclose(call({"bootstrap": {"kind": "hard"}}), (hard * W).sum() / 4)  # paper's 0.8


def test_composition_order_smoothing_then_bootstrap_then_focal():
    prior = torch.tensor([0.5, 0.3, 0.2])
    z = LOGITS + prior.log()
    logp = z.log_softmax(1)
    p = logp.exp()
    q = F.one_hot(Y, 3).float() * 0.9 + 0.1 / 3
    q = 0.7 * q + 0.3 * p
    expected = ((-(q * (1 - p) ** 2 * logp).sum(1)) * W).sum() / 4
    got = call({"label_smoothing": 0.1, "logit_adjustment": {"tau": 1.0, "prior": prior.tolist()},
                "bootstrap": {"kind": "soft", "beta": 0.7}, "focal": {"gamma": 2.0}})
    assert torch.allclose(got, expected)


def test_self_paced_keeps_the_easiest_share_and_grows():
    per = F.cross_entropy(LOGITS, Y, reduction="none")
    easy = per.argsort()[:2]
    mask = torch.zeros(4)
    mask[easy] = 1
    d = {"self_paced": {"start_share": 0.5, "growth": 2.0}}
    assert torch.allclose(call(d, epoch=1), (per * W * mask).sum() / 4)
    assert torch.allclose(call(d, epoch=2), ce())  # share 1.0 from epoch 2
    # share 0.3 of 4 rows -> ceil = 2 rows at epoch 1, then 0.45 -> 2, 0.675 -> 3
    d3 = {"self_paced": {"start_share": 0.3, "growth": 1.5}}
    mask3 = torch.zeros(4)
    mask3[per.argsort()[:3]] = 1
    assert torch.allclose(call(d3, epoch=3), (per * W * mask3).sum() / 4)


def test_gradients_are_finite_for_confident_predictions():
    logits = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    fn = make_loss({"focal": {"gamma": 0.5}, "bootstrap": {"kind": "soft", "beta": 0.9}}, 3)
    loss = fn(logits, torch.tensor([0, 1]), torch.ones(2), 1, torch.arange(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("bad,match", [
    ({"mixup": 1}, "unknown directives.*valid: label_smoothing"),
    ({"focal": {"gama": 2}}, "unknown keys \\['gama'\\]"),
    ({"bootstrap": {"beta": 0.5}}, "missing \\['kind'\\]"),
    ({"bootstrap": {"kind": "x"}}, "kind"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"logit_adjustment": {"tau": 1.0}}, "needs a prior"),
    ({"logit_adjustment": {"tau": 1.0, "prior": [0.2] * 4}}, "at most 3"),
    ({"self_paced": {"start_share": 0.0}}, "start_share"),
    ({"self_paced": {"growth": 0.5}}, "growth"),
])
def test_bad_directives_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        make_loss(bad, 3)


def blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=g) + 2.0 * y[:, None].float()
    return x, y


def train(loss_fn, seed=0):
    x, y = blobs()
    with loop.seeded(seed):
        model = nn.Linear(4, 2)
    cfg = loop.FitConfig(epochs=3, batch_size=16, lr=0.05, progress=False, label_smoothing=0.1)
    hist = loop.fit(model, x, y, cfg, weights=torch.linspace(0.5, 1.5, len(x)), loss_fn=loss_fn)
    return model, hist


def test_loop_hook_default_loss_is_bit_identical():
    m0, h0 = train(None)
    m1, h1 = train(make_loss({"label_smoothing": 0.1}, 2))
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1]
    assert torch.equal(m0.weight, m1.weight) and torch.equal(m0.bias, m1.bias)


def test_loop_hook_passes_epoch_and_indices():
    seen = []
    base = make_loss({"focal": {"gamma": 2.0}}, 2)

    def spy(logits, y, w, epoch, idx):
        seen.append((epoch, idx.clone()))
        return base(logits, y, w, epoch, idx)

    _, hist = train(spy)
    assert sorted({e for e, _ in seen}) == [1, 2, 3]
    first = torch.cat([i for e, i in seen if e == 1])
    assert sorted(first.tolist()) == list(range(64))  # indices are positions in the training set
    assert all(math.isfinite(h["loss"]) for h in hist)
