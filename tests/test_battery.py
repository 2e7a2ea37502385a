"""The common battery (issue 5): every registered resampler, weighter, perturber, augmenter and
selector, built with its defaults, fitted on one fabricated input set that offers every input name of
the optimize stage; and every registered embedder that fits offline, on a few tiny images. New methods
are picked up automatically."""
from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import pandas as pd
import pytest

from dataopt.config import Params
from dataopt.errors import ConfigError
from dataopt.io import save_npy, write_parquet
import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.registry import (AUGMENTERS, EMBEDDERS, PERTURBERS, RESAMPLERS, SELECTORS, WEIGHTERS, get_params,
                              hyperparameters)
from dataopt.stages import run_stage
from dataopt.stages.optimize import INPUT_NAMES, _inputs

from conftest import write_signals_project

FAMILIES = {"resample": RESAMPLERS, "weight": WEIGHTERS, "perturb": PERTURBERS,
            "augment": AUGMENTERS, "prune": SELECTORS}
METHODS = [(fam, name) for fam, reg in FAMILIES.items() for name in reg.names()]
IDS = [f"{fam}:{name}" for fam, name in METHODS]
# every signal column of perceive/signals.py, so score-based methods find theirs
EXTRA_SIGNALS = ("margin_last", "margin_mean", "aum", "confidence", "entropy", "forgetting", "grand",
                 "cartography_confidence", "cartography_variability", "cartography_correctness",
                 "semantic_consistency", "diva_grad", "knn_shapley", "knn_density", "knn_label_agreement")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every optimize input name, loaded once: ``{name: value}`` over 240 train rows, 4 classes."""
    root = tmp_path_factory.mktemp("battery")
    paths = write_signals_project(root, n_train=240, n_test=40, interleave=True)
    sig_path = paths.artifacts / "perceive" / "signals.parquet"
    signals = pd.read_parquet(sig_path)
    rng = np.random.default_rng(0)
    for col in EXTRA_SIGNALS:
        signals[col] = rng.random(len(signals))
    signals["forgetting"] = rng.integers(0, 5, len(signals)).astype(float)
    write_parquet(sig_path, signals)
    emb = np.load(paths.artifacts / "embed" / "embeddings.npy")
    text = rng.normal(size=emb.shape)
    save_npy(paths.artifacts / "embed" / "text_embeddings.npy",
             (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float16))
    run_stage("analyze", Params(), paths)
    lazy, _, _ = _inputs(paths)
    return {name: lazy.get(name) for name in INPUT_NAMES}


def _digest(value) -> str:
    """A content hash of an input (arrays, DataFrames, dicts of arrays, scalars, None)."""
    h = hashlib.sha1()
    if isinstance(value, pd.DataFrame):
        h.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
        h.update(",".join(map(str, value.columns)).encode())
    elif isinstance(value, dict):
        for k in sorted(value):
            h.update(k.encode() + _digest(value[k]).encode())
    elif isinstance(value, np.ndarray):
        h.update(str((value.dtype, value.shape)).encode() + np.ascontiguousarray(value).tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def _build(fam, name, seed=0, **extra):
    trusted = {"random_state": seed, **extra}
    if fam == "prune":
        trusted.setdefault("ratio", 0.5)
    return FAMILIES[fam].build(name, {}, **trusted)


def _fit(method, inputs, keep=None):
    kwargs = {r: inputs[r] for r in method.requires}
    if "keep" in inspect.signature(method.fit).parameters:
        kwargs["keep"] = np.ones(len(inputs["labels"]), bool) if keep is None else keep.copy()
    return method.fit(**kwargs)


OUTPUTS = {"prune": ("keep_",), "weight": ("weight_",), "resample": ("sampling_weight_",),
           "perturb": ("new_label_", "train_"), "augment": ("augment_magnitude_", "augment_")}


def _outputs(fam, m) -> dict:
    out = {a: getattr(m, a, None) for a in OUTPUTS[fam]}
    out["reason_"] = getattr(m, "reason_", None)
    return out


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("fam,name", METHODS, ids=IDS)
def test_fit_returns_self_leaves_inputs_unchanged_and_is_deterministic(fam, name, inputs):
    required = _build(fam, name).requires
    assert set(required) <= set(INPUT_NAMES), f"{name} requires inputs the stage cannot load"
    before = {r: _digest(inputs[r]) for r in required}
    m = _build(fam, name)
    assert _fit(m, inputs) is m
    assert {r: _digest(inputs[r]) for r in required} == before, "fit modified its inputs"
    again = _fit(_build(fam, name), inputs)
    a, b = _outputs(fam, m), _outputs(fam, again)
    for key in a:
        assert _same(a[key], b[key]), f"{key} differs between two fits with the same seed"


@pytest.mark.parametrize("fam,name", METHODS, ids=IDS)
def test_outputs_have_the_family_shape_and_range(fam, name, inputs):
    n = len(inputs["labels"])
    m = _fit(_build(fam, name), inputs)
    if fam == "prune":
        assert m.keep_.shape == (n,) and m.keep_.dtype == bool and m.keep_.any()
        score = getattr(m, "score_", None)
        if score is not None:
            assert np.asarray(score).shape == (n,)
    elif fam in ("weight", "resample"):
        w = np.asarray(getattr(m, "weight_" if fam == "weight" else "sampling_weight_"), float)
        assert w.shape == (n,) and np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0
    elif fam == "perturb":
        new, directives = getattr(m, "new_label_", None), getattr(m, "train_", None)
        assert new is not None or directives, "a perturber sets new_label_ and/or train_"
        if new is not None:
            new = np.asarray(new)
            assert new.shape == (n,) and np.issubdtype(new.dtype, np.integer)
            assert (new >= 0).all() and (new < inputs["n_classes"]).all()
        if directives:
            json.dumps(directives)
    else:
        mag, policy = getattr(m, "augment_magnitude_", None), getattr(m, "augment_", None)
        assert mag is not None or policy, "an augmenter sets augment_magnitude_ and/or augment_"
        if mag is not None:
            mag = np.asarray(mag, float)
            assert mag.shape == (n,) and np.isfinite(mag).all() and (mag >= 0).all() and (mag <= 1).all()
        if policy:
            assert policy["policy"] == name and json.dumps(policy)
    reason = getattr(m, "reason_", None)
    if reason is not None:
        assert np.asarray(reason).shape == (n,)
    for v in vars(m).values():  # no NaN in any fitted array
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            assert not np.isnan(v).any()


@pytest.mark.parametrize("fam,name", METHODS, ids=IDS)
def test_params_are_json_safe_and_unknown_kwargs_list_the_valid_ones(fam, name):
    m = _build(fam, name)
    params = get_params(m)
    assert json.loads(json.dumps(params)) == params
    with pytest.raises(ConfigError) as exc:
        FAMILIES[fam].build(name, {"no_such_kwarg": 1})
    text = str(exc.value)
    assert "no_such_kwarg" in text and "valid:" in text
    for hp in hyperparameters(type(m)):
        assert hp in text


SELECTOR_RATIO = [n for n in SELECTORS.names() if "ratio" in hyperparameters(SELECTORS.get(n))]


@pytest.mark.parametrize("name", SELECTOR_RATIO)
def test_selectors_respect_the_ratio_within_one_sample(name, inputs):
    n = len(inputs["labels"])
    for ratio in (0.1, 0.3, 0.5, 0.8):
        keep = _fit(_build("prune", name, ratio=ratio), inputs).keep_
        assert abs(int(keep.sum()) - ratio * n) <= 1, f"ratio {ratio}: kept {keep.sum()} of {n}"
    # after an earlier step, the ratio still counts the original set, chosen among the rows kept
    prior = np.random.default_rng(1).random(n) < 0.7
    keep = _fit(_build("prune", name, ratio=0.3), inputs, keep=prior).keep_
    assert not (keep & ~prior).any(), "a selector kept a row an earlier step dropped"
    assert abs(int(keep.sum()) - 0.3 * n) <= 1


SELECTOR_N_KEEP = [n for n in SELECTORS.names() if "n_keep" in hyperparameters(SELECTORS.get(n))]


@pytest.mark.parametrize("name", SELECTOR_N_KEEP)
def test_selectors_respect_n_keep_within_one_sample(name, inputs):
    for count in (13, 120):
        keep = FAMILIES["prune"].build(name, {}, random_state=0, n_keep=count).fit(
            **{r: inputs[r] for r in SELECTORS.get(name).requires},
            keep=np.ones(len(inputs["labels"]), bool)).keep_
        assert abs(int(keep.sum()) - count) <= 1, f"n_keep {count}: kept {keep.sum()}"


# embedders that fit offline from their defaults (open_clip needs a checkpoint: tests/test_embed_openclip.py)
OFFLINE_EMBEDDERS = [n for n in EMBEDDERS.names() if n != "open_clip"]


def _embedder(name, seed=0):
    return EMBEDDERS.build(name, {}, random_state=seed, device="cpu", transform_batch_size=16)


@pytest.fixture(scope="module")
def images():
    """48 RGB 8x8 uint8 images of 3 classes (class k: brighter k-th third) and their labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 3
    x = rng.integers(0, 120, (48, 8, 8, 3))
    for i, lab in enumerate(labels):
        x[i, :, lab * 2 : lab * 2 + 3] += 120
    return x.astype(np.uint8), labels


@pytest.mark.parametrize("name", OFFLINE_EMBEDDERS)
def test_embedders_fit_deterministic_unit_rows_and_restore_their_state(name, images, one_torch_thread):
    x, labels = images
    before = _digest(x)
    m = _embedder(name)
    assert m.fit(x[:40], labels[:40], n_classes=3) is m
    assert _digest(x) == before, "fit modified its inputs"
    f = m.transform(x)
    assert f.shape == (48, m.dim_) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(_embedder(name).fit(x[:40], labels[:40], n_classes=3).transform(x), f)
    state = m.get_state()
    if state is not None:
        assert np.array_equal(_embedder(name).set_state(*state).transform(x), f)
    json.dumps(m.info())


@pytest.mark.parametrize("name", EMBEDDERS.names())
def test_embedder_params_are_json_safe_and_unknown_kwargs_list_the_valid_ones(name):
    params = get_params(EMBEDDERS.build(name, {}))
    assert json.loads(json.dumps(params)) == params
    with pytest.raises(ConfigError) as exc:
        EMBEDDERS.build(name, {"no_such_kwarg": 1})
    text = str(exc.value)
    assert "no_such_kwarg" in text and "valid:" in text
