"""perceive.model: head, the ``cnn`` alias and any registered MODELS name; augment and label smoothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataopt.config import validate
from dataopt.errors import ConfigError
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.perceive.dynamics import OOFDynamics
from dataopt.perceive.dynamics import features_and_logits, perceive_models, resolve_model
from dataopt.plugins import check_methods
from dataopt.registry import MODELS
from dataopt.stages import run_stage

FAST = {"width": 4, "epochs": 2, "early_epochs": 1, "folds": 2, "batch_size": 32, "device": "cpu"}


def _images(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8, 3) uint8 images whose brightness pattern depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    x = rng.integers(0, 60, size=(n, 8, 8, 3))
    for c in range(3):
        x[y == c, :, :, c] += 180
    return x.astype(np.uint8), y


def test_valid_names_are_head_cnn_and_the_registry():
    valid = perceive_models()
    assert valid[:2] == ["head", "cnn"] and set(MODELS.names()) <= set(valid)
    assert resolve_model("cnn") == "small_cnn" and resolve_model("small_cnn") == "small_cnn"
    assert resolve_model("head") == "head"
    for name in MODELS.names():
        assert check_methods(validate({"perceive": {"model": name}})).perceive.model == name


def test_unknown_model_and_head_augment_are_readable_config_errors():
    valid = r"unknown perceive model 'mlp'; valid: head, cnn, .*small_cnn"
    with pytest.raises(ConfigError, match=r"perceive\.model.*" + valid):
        check_methods(validate({"perceive": {"model": "mlp"}}))
    with pytest.raises(ConfigError, match="augment='crop' needs an image model"):
        validate({"perceive": {"augment": "crop"}})
    with pytest.raises(ConfigError, match="perceive.augment"):
        validate({"perceive": {"model": "cnn", "augment": "mirror"}})
    with pytest.raises(ConfigError, match="unknown perceive augment 'mirror'"):
        OOFDynamics(model="cnn", augment="mirror").fit(*_images(), 3)


def test_small_cnn_by_name_equals_the_cnn_alias():
    x, y = _images()
    kw = dict(width=4, folds=2, epochs=2, batch_size=16, device="cpu", random_state=3)
    by_name = OOFDynamics(model="small_cnn", **kw).fit(x, y, 3)
    alias = OOFDynamics(model="cnn", **kw).fit(x, y, 3)
    assert by_name.model_ == alias.model_ == "small_cnn"
    for f in ("loss", "margin", "logit_margin", "feature_norm", "probs"):
        np.testing.assert_array_equal(getattr(by_name.dynamics_, f), getattr(alias.dynamics_, f))


def test_augment_and_label_smoothing_reach_the_training_loop():
    x, y = _images()
    kw = dict(model="small_cnn", width=4, folds=2, epochs=2, batch_size=16, device="cpu")
    plain = OOFDynamics(**kw).fit(x, y, 3).dynamics_
    aug = OOFDynamics(augment="flip_crop", **kw).fit(x, y, 3).dynamics_
    smooth = OOFDynamics(label_smoothing=0.3, **kw).fit(x, y, 3).dynamics_
    assert not np.array_equal(plain.loss, aug.loss) and not np.array_equal(plain.loss, smooth.loss)
    for d in (aug, smooth):  # still plain cross-entropy of the given label, out of fold
        assert np.isfinite(d.loss).all() and d.loss.shape == (2, 60)
        np.testing.assert_allclose(d.loss[-1], -np.log(d.probs[np.arange(60), y]), rtol=1e-4, atol=1e-5)


class _Scaled(torch.nn.Module):
    """A head whose logits are ``fc(h) / 9`` (airbench's output scale)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3, bias=False)

    def features(self, x):
        return x

    def forward(self, x):
        return self.fc(x) / 9


def test_features_and_logits_use_the_models_own_output():
    model = _Scaled()
    x = torch.randn(7, 4)
    norms, logits = features_and_logits(model, x, batch_size=3)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(norms, x.norm(dim=1))


def test_stage_with_a_registered_model_name(digits_ingested: Paths):
    params = validate({"perceive": {"model": "small_cnn", "augment": "crop", "label_smoothing": 0.1, **FAST}})
    run_stage("embed", params, digits_ingested)
    metrics = run_stage("perceive", params, digits_ingested)
    corpus = read_json(digits_ingested.artifacts / "perceive" / "corpus.json")
    assert corpus["model"] == "small_cnn" and corpus["network"] == "small_cnn"
    assert corpus["augment"] == "crop" and corpus["label_smoothing"] == 0.1
    assert corpus["epochs_completed"] == 2 and 0.0 <= metrics["oof_accuracy"] <= 1.0


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_records_out_of_fold_dynamics(name):
    x, y = _images(30)
    oof = OOFDynamics(model=name, width=4, folds=2, epochs=1, batch_size=16, device="cpu").fit(x, y, 3)
    d = oof.dynamics_
    assert oof.model_ == name and d.loss.shape == (1, 30) and d.probs.shape == (30, 3)
    assert np.isfinite(d.loss).all() and (d.feature_norm > 0).all()
    np.testing.assert_allclose(d.probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(d.loss[0], -np.log(d.probs[np.arange(30), y]), rtol=1e-4, atol=1e-5)
