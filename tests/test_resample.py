"""Resamplers (RESAMPLERS): uniform, class-balanced over/under, sqrt, importance, difficulty,
uncertainty - shapes, ranges, direction, determinism, kwargs checking."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.errors import ConfigError, DataError
from dataopt.registry import RESAMPLERS


def imbalanced_labels(counts=(60, 25, 10, 5), seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def class_mass(labels, w, keep=None):
    keep = np.ones(len(labels), bool) if keep is None else keep
    return np.bincount(labels[keep], weights=w[keep])


def check_output(w, n):
    assert w.shape == (n,) and w.dtype == np.float64
    assert np.isfinite(w).all() and (w >= 0).all()


def test_uniform_is_all_ones():
    y = imbalanced_labels()
    r = RESAMPLERS.build("uniform").fit(y)
    np.testing.assert_array_equal(r.sampling_weight_, np.ones(len(y)))
    assert r.reason_.shape == (len(y),)


@pytest.mark.parametrize("name", ["class_balanced_over", "class_balanced_under"])
def test_class_balanced_gives_each_class_equal_mass(name):
    y = imbalanced_labels()
    r = RESAMPLERS.build(name).fit(y)
    check_output(r.sampling_weight_, len(y))
    mass = class_mass(y, r.sampling_weight_)
    np.testing.assert_allclose(mass, mass.mean())
    assert r.sampling_weight_.mean() == pytest.approx(1.0)
    # rarest class weighs 12x the commonest (60 / 5)
    w = r.sampling_weight_
    assert w[y == 3][0] / w[y == 0][0] == pytest.approx(12.0)
    assert "class 3 has 5 kept" in r.reason_[np.flatnonzero(y == 3)[0]]
    assert sum(r.summary_["class_draw_share"].values()) == pytest.approx(1.0)


def test_class_balanced_counts_only_kept_rows():
    y = imbalanced_labels()
    keep = np.ones(len(y), bool)
    keep[np.flatnonzero(y == 0)[:50]] = False  # class 0 now has 10 kept rows
    r = RESAMPLERS.build("class_balanced_over").fit(y, keep=keep)
    mass = class_mass(y, r.sampling_weight_, keep)
    np.testing.assert_allclose(mass, mass.mean())
    assert r.sampling_weight_[keep].mean() == pytest.approx(1.0)


def test_under_sampling_records_the_epoch_budget():
    y = imbalanced_labels()
    r = RESAMPLERS.build("class_balanced_under").fit(y)
    assert r.summary_["epoch_budget"] == 4 * 5
    assert "budget 20 draws per epoch" in r.reason_[0]


def test_sqrt_gives_class_mass_proportional_to_sqrt_count():
    counts = np.array([64, 16, 4])
    y = imbalanced_labels(tuple(counts))
    r = RESAMPLERS.build("sqrt").fit(y)
    mass = class_mass(y, r.sampling_weight_)
    np.testing.assert_allclose(mass / mass.sum(), np.sqrt(counts) / np.sqrt(counts).sum())


def shifted(n_train=400, n_test=200, seed=0):
    """Train rows: two blobs (half each); test rows: only blob B -> B rows should be up-weighted."""
    rng = np.random.default_rng(seed)
    blob = np.r_[np.zeros(n_train // 2, int), np.ones(n_train - n_train // 2, int)]
    centres = np.array([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    train = centres[blob] + rng.normal(size=(n_train, 3))
    test = centres[1] + rng.normal(size=(n_test, 3))
    return train.astype(np.float32), test.astype(np.float32), blob


def test_importance_upweights_train_rows_that_look_like_the_target():
    train, test, blob = shifted()
    r = RESAMPLERS.build("importance", {}, random_state=0).fit(train, test)
    w = r.sampling_weight_
    check_output(w, len(train))
    assert w.mean() == pytest.approx(1.0)
    assert w[blob == 1].mean() > 5 * w[blob == 0].mean()
    assert (r.density_ratio_ >= 0.05 - 1e-12).all() and (r.density_ratio_ <= 10 + 1e-12).all()
    assert r.reason_[0].startswith("importance: P(target|x) ")
    # same distribution -> weights near 1
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    t = rng.normal(size=(300, 3)).astype(np.float32)
    w_same = RESAMPLERS.build("importance", {}, random_state=0).fit(x, t).sampling_weight_
    assert w_same.std() < 0.3 and np.median(np.abs(w_same - 1)) < 0.2


def test_importance_rejects_mismatched_target():
    train, _, _ = shifted()
    with pytest.raises(DataError, match="target embeddings"):
        RESAMPLERS.build("importance").fit(train, np.zeros((0, 3), np.float32))
    with pytest.raises(ConfigError, match="max_weight"):
        RESAMPLERS.build("importance", {"max_weight": -1}).fit(train, train)


def signals_table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"sample_id": np.arange(n), "loss_last": rng.gamma(1.5, 0.5, n),
                         "el2n": rng.random(n)})


def test_difficulty_is_monotone_in_the_loss_and_the_temperature_flattens():
    s = signals_table()
    loss = s["loss_last"].to_numpy()
    order = np.argsort(loss)
    hard = RESAMPLERS.build("difficulty").fit(s).sampling_weight_
    check_output(hard, len(s))
    assert np.all(np.diff(hard[order]) >= -1e-12)
    easy = RESAMPLERS.build("difficulty", {"direction": "easy"}).fit(s).sampling_weight_
    assert np.all(np.diff(easy[order]) <= 1e-12)
    flat = RESAMPLERS.build("difficulty", {"temperature": 100.0}).fit(s).sampling_weight_
    assert flat.std() < hard.std() / 10
    el2n = RESAMPLERS.build("difficulty", {"signal": "el2n"}).fit(s)
    assert el2n.reason_[0].startswith("difficulty (hard): el2n ")
    with pytest.raises(ConfigError, match="available: sample_id, loss_last, el2n"):
        RESAMPLERS.build("difficulty", {"signal": "nope"}).fit(s)
    with pytest.raises(ConfigError, match="direction"):
        RESAMPLERS.build("difficulty", {"direction": "sideways"}).fit(s)


def test_uncertainty_prefers_high_entropy_rows():
    probs = np.array([[1.0, 0.0, 0.0], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    r = RESAMPLERS.build("uncertainty").fit(probs)
    w = r.sampling_weight_
    check_output(w, 4)
    assert np.all(np.diff(w) > 0)
    assert w[0] > 0  # the floor keeps a certain row drawable
    assert r.entropy_[3] == pytest.approx(1.0) and r.entropy_[0] == pytest.approx(0.0)


@pytest.mark.parametrize("name", RESAMPLERS.names())
def test_every_resampler_is_deterministic_and_rejects_unknown_kwargs(name):
    y = imbalanced_labels()
    train, test, _ = shifted(len(y))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), len(y))
    inputs = {"labels": y, "embeddings": train, "test_embeddings": test, "probs": probs,
              "signals": signals_table(len(y))}
    keep = rng.random(len(y)) < 0.8
    outs = []
    for _ in range(2):
        m = RESAMPLERS.build(name, {}, random_state=3)
        fitted = m.fit(**{k: inputs[k] for k in m.requires}, keep=keep)
        assert fitted is m
        check_output(m.sampling_weight_, len(y))
        assert m.sampling_weight_[keep].mean() == pytest.approx(1.0)
        assert m.reason_.shape == (len(y),)
        outs.append(m.sampling_weight_)
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ConfigError, match="unknown kwargs.*valid"):
        RESAMPLERS.build(name, {"bogus": 1})
