"""Weighters (WEIGHTERS): inverse frequency, effective number, focal, self-paced, DIVA reweight
(plus none / p_clean under the keep protocol)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.errors import ConfigError
from dataopt.perceive.valuation import diva_loo_gradient
from dataopt.registry import WEIGHTERS


def imbalanced_labels(counts=(60, 25, 10, 5), seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def check_output(w, n):
    assert w.shape == (n,) and w.dtype == np.float64
    assert np.isfinite(w).all() and (w >= 0).all()


def test_inverse_frequency_equalises_class_mass_with_mean_one():
    y = imbalanced_labels()
    w = WEIGHTERS.build("inverse_frequency").fit(y).weight_
    check_output(w, len(y))
    assert w.mean() == pytest.approx(1.0)
    mass = np.bincount(y, weights=w)
    np.testing.assert_allclose(mass, mass.mean())


def test_effective_number_matches_cui_et_al():
    y = imbalanced_labels()
    counts = np.array([60, 25, 10, 5])
    m = WEIGHTERS.build("effective_number", {"beta": 0.9}).fit(y)
    cw = (1 - 0.9) / (1 - 0.9 ** counts)
    cw = cw * 4 / cw.sum()
    np.testing.assert_allclose(m.class_weight_, cw)
    np.testing.assert_allclose(m.weight_, cw[y])
    np.testing.assert_allclose(m.effective_number_, (1 - 0.9 ** counts) / 0.1)
    # β = 0: no re-weighting; β -> 1: inverse frequency
    np.testing.assert_allclose(WEIGHTERS.build("effective_number", {"beta": 0.0}).fit(y).weight_, 1.0)
    inv = WEIGHTERS.build("effective_number", {"beta": 1 - 1e-9}).fit(y).class_weight_
    np.testing.assert_allclose(inv / inv[0], counts[0] / counts, rtol=1e-5)
    assert "effective number" in m.reason_[0]
    with pytest.raises(ConfigError, match="beta"):
        WEIGHTERS.build("effective_number", {"beta": 1.0}).fit(y)


def test_focal_is_a_training_directive():
    y = imbalanced_labels()
    m = WEIGHTERS.build("focal", {"gamma": 1.5}).fit(y)
    np.testing.assert_array_equal(m.weight_, np.ones(len(y)))
    assert m.train_ == {"focal": {"gamma": 1.5}}
    with pytest.raises(ConfigError, match="gamma"):
        WEIGHTERS.build("focal", {"gamma": -1}).fit(y)


def loss_table(n=100, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"sample_id": np.arange(n), "loss_early": rng.permutation(np.arange(n)) / n})


def test_self_paced_dynamic_emits_the_schedule_and_entry_epochs():
    s = loss_table()
    m = WEIGHTERS.build("self_paced", {"start_share": 0.5, "growth": 1.5}).fit(s)
    np.testing.assert_array_equal(m.weight_, np.ones(len(s)))
    assert m.train_ == {"self_paced": {"start_share": 0.5, "growth": 1.5}}
    rank = s["loss_early"].to_numpy() * 100 + 1  # 1..100: number of rows at least as easy
    # share 0.5 -> epoch 1, 0.75 -> 2, 1.0 (>= 1.125) -> 3
    expected = np.where(rank <= 50, 1, np.where(rank <= 75, 2, 3))
    np.testing.assert_array_equal(m.entry_epoch_, expected)
    assert m.summary_["counts"]["in_first_epoch"] == 50
    i = int(np.argmax(rank))
    assert "enters at epoch 3" in m.reason_[i]


def test_self_paced_static_weights_are_the_active_share_of_epochs():
    s = loss_table()
    m = WEIGHTERS.build("self_paced", {"start_share": 0.5, "growth": 1.5, "dynamic": False,
                                       "epochs": 4}).fit(s)
    assert m.train_ == {}
    loss = s["loss_early"].to_numpy()
    check_output(m.weight_, len(s))
    np.testing.assert_array_equal(np.unique(m.weight_), [0.5, 0.75, 1.0])
    assert np.all(np.diff(m.weight_[np.argsort(loss)]) <= 0)  # easy first
    # growth 1: the hard half never enters
    flat = WEIGHTERS.build("self_paced", {"growth": 1.0, "dynamic": False}).fit(s)
    assert (flat.weight_ == 0).sum() == 50 and "never" in flat.reason_[int(np.argmax(loss))]


def noisy_digits(n=400, noise=0.2, seed=0):
    x, y = load_digits(return_X_y=True)
    x, y = x[:n] / np.linalg.norm(x[:n], axis=1, keepdims=True), y[:n]
    rng = np.random.default_rng(seed)
    flip = rng.random(n) < noise
    yn = y.copy()
    yn[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    return x.astype(np.float32), yn, flip


def test_diva_downweights_mislabeled_rows():
    x, y, flip = noisy_digits()
    m = WEIGHTERS.build("diva").fit(x, y, 10)
    check_output(m.weight_, len(y))
    assert m.weight_[flip].mean() < m.weight_[~flip].mean() - 0.3
    g, _ = diva_loo_gradient(x, y, 10)
    np.testing.assert_allclose(m.loo_gradient_, g)  # the first step is the perception gradient
    # one step: alpha = 1 - lr * g / mean|g| exactly
    one = WEIGHTERS.build("diva", {"steps": 1, "lr": 0.1}).fit(x, y, 10)
    np.testing.assert_allclose(one.weight_, np.maximum(1 - 0.1 * g / np.abs(g).mean(), 0))
    # a huge step clips at 0
    big = WEIGHTERS.build("diva", {"steps": 1, "lr": 100.0}).fit(x, y, 10)
    assert (big.weight_ == 0).any() and (big.weight_ >= 0).all()
    assert "detrimental" in m.reason_[int(np.argmax(g))]


def test_diva_only_reweights_kept_rows():
    x, y, _ = noisy_digits(200)
    keep = np.arange(200) < 150
    m = WEIGHTERS.build("diva").fit(x, y, 10, keep=keep)
    np.testing.assert_array_equal(m.weight_[~keep], 1.0)
    g, _ = diva_loo_gradient(x[keep], y[keep], 10)
    np.testing.assert_allclose(m.loo_gradient_[keep], g)
    assert (m.reason_[~keep] == "").all()


@pytest.mark.parametrize("name", WEIGHTERS.names())
def test_every_weighter_is_deterministic_and_rejects_unknown_kwargs(name):
    x, y, _ = noisy_digits(150)
    rng = np.random.default_rng(0)
    inputs = {"labels": y, "embeddings": x, "n_classes": 10, "p_clean": rng.random(len(y)),
              "signals": pd.DataFrame({"loss_early": rng.random(len(y))})}
    keep = rng.random(len(y)) < 0.8
    before = {k: np.array(v, copy=True) for k, v in inputs.items() if k != "signals"}
    outs = []
    for _ in range(2):
        m = WEIGHTERS.build(name, {}, random_state=1)
        assert m.fit(**{k: inputs[k] for k in m.requires}, keep=keep) is m
        check_output(m.weight_, len(y))
        assert m.reason_.shape == (len(y),)
        outs.append(m.weight_)
    np.testing.assert_array_equal(outs[0], outs[1])
    for k, v in before.items():
        np.testing.assert_array_equal(inputs[k], v)
    with pytest.raises(ConfigError, match="unknown kwargs.*valid"):
        WEIGHTERS.build(name, {"bogus": 1})
