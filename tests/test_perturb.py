"""Perturbers (PERTURBERS): label smoothing, logit adjustment, bootstrapping, relabel."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.errors import ConfigError, DataError
from dataopt.registry import PERTURBERS
from dataopt.train.losses import make_loss


def labels(n=100, c=4, seed=0):
    return np.random.default_rng(seed).integers(0, c, n)


@pytest.mark.parametrize("name,kwargs,directive", [
    ("label_smoothing", {"epsilon": 0.2}, {"label_smoothing": 0.2}),
    ("bootstrap", {}, {"bootstrap": {"kind": "soft", "beta": 0.95}}),
    ("bootstrap", {"kind": "hard"}, {"bootstrap": {"kind": "hard", "beta": 0.8}}),
    ("bootstrap", {"kind": "hard", "beta": 0.6}, {"bootstrap": {"kind": "hard", "beta": 0.6}}),
])
def test_directive_perturbers_keep_labels_and_emit_a_loadable_directive(name, kwargs, directive):
    y = labels()
    m = PERTURBERS.build(name, kwargs).fit(y)
    np.testing.assert_array_equal(m.new_label_, y)
    assert m.train_ == directive
    make_loss(json.loads(json.dumps(m.train_)), 4)  # the train side accepts it as written


def test_logit_adjustment_prior_is_the_kept_class_share():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    keep = np.ones(100, bool)
    keep[:10] = False  # class 0 now 40 of 90
    m = PERTURBERS.build("logit_adjustment", {"tau": 0.5}).fit(y, 4, keep=keep)
    la = m.train_["logit_adjustment"]
    assert la["tau"] == 0.5
    np.testing.assert_allclose(la["prior"], [40 / 90, 30 / 90, 20 / 90, 0.0])
    assert "prior of class 2 0.2222" in m.reason_[-1]
    make_loss(m.train_, 4)


def test_directive_perturbers_validate_ranges():
    y = labels()
    with pytest.raises(ConfigError, match="epsilon"):
        PERTURBERS.build("label_smoothing", {"epsilon": 1.0}).fit(y)
    with pytest.raises(ConfigError, match="kind"):
        PERTURBERS.build("bootstrap", {"kind": "medium"}).fit(y)
    with pytest.raises(ConfigError, match="tau"):
        PERTURBERS.build("logit_adjustment", {"tau": -1}).fit(y, 4)


def relabel_inputs(n=60, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n)
    flagged = rng.random(n) < 0.4
    suggested = np.where(flagged, (y + 1) % c, y)
    return y, pd.DataFrame({"is_label_issue": flagged, "suggested_label": suggested}), probs


def test_relabel_changes_exactly_the_flagged_confident_rows():
    y, analysis, probs = relabel_inputs()
    suggested = analysis["suggested_label"].to_numpy()
    conf = probs[np.arange(len(y)), suggested]
    m = PERTURBERS.build("relabel", {"threshold": 0.5}).fit(y, analysis, probs)
    expected = analysis["is_label_issue"].to_numpy() & (conf >= 0.5)
    assert expected.any() and (~expected & analysis["is_label_issue"].to_numpy()).any()
    np.testing.assert_array_equal(m.new_label_ != y, expected)
    np.testing.assert_array_equal(m.new_label_[expected], suggested[expected])
    assert m.new_label_.dtype == np.int64 and m.train_ == {}
    i = int(np.flatnonzero(expected)[0])
    assert m.reason_[i] == f"relabel: {y[i]} -> {suggested[i]} (out-of-fold confidence {conf[i]:.3f} >= 0.5)"
    j = int(np.flatnonzero(~expected & analysis["is_label_issue"].to_numpy())[0])
    assert m.reason_[j].startswith(f"relabel: flagged, kept label {y[j]}")
    assert (m.reason_[~analysis["is_label_issue"].to_numpy()] == "").all()
    assert m.summary_["counts"]["relabelled"] == int(expected.sum())
    # only kept rows are relabelled
    keep = np.ones(len(y), bool)
    keep[i] = False
    m2 = PERTURBERS.build("relabel", {"threshold": 0.5}).fit(y, analysis, probs, keep=keep)
    assert m2.new_label_[i] == y[i] and (m2.new_label_ != y).sum() == expected.sum() - 1
    # threshold 1.01 is out of range; threshold 1 relabels nothing here
    with pytest.raises(ConfigError, match="threshold"):
        PERTURBERS.build("relabel", {"threshold": 1.01}).fit(y, analysis, probs)
    np.testing.assert_array_equal(PERTURBERS.build("relabel", {"threshold": 1.0})
                                  .fit(y, analysis, probs).new_label_, y)


def test_relabel_rejects_misaligned_inputs():
    y, analysis, probs = relabel_inputs()
    with pytest.raises(DataError, match="train rows"):
        PERTURBERS.build("relabel").fit(y, analysis, probs[:-1])
    with pytest.raises(DataError, match="suggested_label"):
        PERTURBERS.build("relabel").fit(y, analysis.drop(columns="suggested_label"), probs)


@pytest.mark.parametrize("name", PERTURBERS.names())
def test_every_perturber_is_deterministic_and_rejects_unknown_kwargs(name):
    y, analysis, probs = relabel_inputs()
    inputs = {"labels": y, "analysis": analysis, "probs": probs, "n_classes": 3}
    keep = np.random.default_rng(0).random(len(y)) < 0.8
    outs = []
    for _ in range(2):
        m = PERTURBERS.build(name, {}, random_state=0)
        assert m.fit(**{k: inputs[k] for k in m.requires}, keep=keep) is m
        assert m.new_label_.shape == y.shape and m.reason_.shape == y.shape
        assert ((m.new_label_ >= 0) & (m.new_label_ < 3)).all()
        json.dumps(m.train_)
        outs.append((m.new_label_, json.dumps(m.train_, sort_keys=True)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]
    with pytest.raises(ConfigError, match="unknown kwargs.*valid"):
        PERTURBERS.build(name, {"bogus": 1})
