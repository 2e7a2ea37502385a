"""dataopt/drift: each registered drift test's false-positive rate on synthetic no-shift data over
many seeds, its power on a planted shift, the shared method contract, the verdict, and the shift
generators."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch

import dataopt.plugins  # noqa: F401  (fills the registries)
from dataopt.drift import benjamini_hochberg, holm, verdict
from dataopt.drift import shifts
from dataopt.drift.black_box import bbse_weights
from dataopt.drift.kernel import mmd_permutation
from dataopt.drift.result import DriftResult
from dataopt.errors import ConfigError
from dataopt.registry import DRIFT_TESTS, get_params, hyperparameters

C, DIM = 5, 16
MEANS = np.random.default_rng(1234).normal(0.0, 1.5, (C, DIM))  # class centres of the synthetic world
FAST = {"permutations": 200}  # fewer null draws in the loops: p-values still down to 1/201


def world(rng, n, *, prior=None, shift=0.0, noise_up=0.0, brightness=0, label_noise=0.1):
    """One side of a synthetic problem: labels, embeddings around class centres, a proxy's softmax
    (nearest centre), label-issue flags at a base rate (+ ``noise_up``), and small uint8 images
    whose brightness follows the class."""
    labels = rng.choice(C, n, p=prior)
    emb = MEANS[labels] + rng.normal(size=(n, DIM)) + shift
    logits = -0.5 * ((emb[:, None, :] - MEANS[None]) ** 2).sum(-1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    issue = rng.random(n) < label_noise
    if noise_up:
        _, flipped = shifts.raise_label_noise(labels, noise_up, C, rng)
        issue |= flipped
    base = rng.integers(60, 160, (n, 1, 1, 1)) + rng.integers(-30, 30, (n, 12, 12, 3))
    images = np.clip(base + 8 * labels[:, None, None, None], 0, 255).astype(np.uint8)
    if brightness:
        images = shifts.corrupt(images, "brightness", brightness, rng)
    return {"labels": labels, "embeddings": emb, "probs": probs, "label_issue": issue, "images": images}


def rates(name, seeds, n_ref=300, n_batch=100, **batch_kw):
    """The share of ``seeds`` on which test ``name`` decides drift, and its p-values."""
    kwargs = {k: v for k, v in FAST.items() if k in hyperparameters(DRIFT_TESTS.get(name))}
    ps = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        ref, batch = world(rng, n_ref), world(rng, n_batch, **batch_kw)
        ps.append(DRIFT_TESTS.build(name, kwargs, random_state=seed).fit(ref, batch).result_.p_value)
    ps = np.array(ps)
    return float(np.mean(ps <= 0.05)), ps


PERMUTATION_TESTS = ("mmd", "per_class_mmd")


@pytest.mark.parametrize("name", DRIFT_TESTS.names())
def test_false_positive_rate_without_shift_is_calibrated(name):
    fpr, ps = rates(name, range(100))
    assert fpr <= 0.12, f"{name}: {fpr:.2f} false positives at alpha 0.05 over 100 seeds"
    assert ((ps >= 0) & (ps <= 1)).all()
    if name in PERMUTATION_TESTS:  # an exact test: rejects about alpha, and its p-values are spread out
        assert fpr > 0, f"{name}: no false positive in 100 seeds, the null is too wide"
        assert 0.3 <= np.mean(ps <= 0.5) <= 0.7, f"{name}: p-values are not roughly uniform"


# a planted shift each test is meant to see, at batch size 100-200
THREE_CLASSES_AT_A_THIRD = np.array([0.2 / 3, 0.2 / 3, 0.2 / 3, 0.4, 0.4])  # from 0.2 each
PLANTED = {
    "mmd": {"shift": 0.4},
    "classifier": {"shift": 0.25},
    "per_class_mmd": {"shift": 0.4},
    "bbsd_ks": {"prior": THREE_CLASSES_AT_A_THIRD},
    "bbsd_chi2": {"prior": THREE_CLASSES_AT_A_THIRD},
    "label_shift": {"prior": THREE_CLASSES_AT_A_THIRD},
    "label_quality": {"noise_up": 0.20},
    "image_stats": {"brightness": 3},
}


def test_every_registered_test_has_a_planted_shift():
    assert sorted(PLANTED) == DRIFT_TESTS.names()


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_power_on_a_planted_shift(name):
    power, _ = rates(name, range(30), n_batch=200, **PLANTED[name])
    assert power >= 0.9, f"{name}: power {power:.2f} on {PLANTED[name]}"


# -- the shared contract ---------------------------------------------------------------------------

def _digest(side: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(side):
        h.update(k.encode() + np.ascontiguousarray(side[k]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", DRIFT_TESTS.names())
def test_fit_returns_self_leaves_inputs_unchanged_is_deterministic_and_json_safe(name):
    rng = np.random.default_rng(0)
    ref, batch = world(rng, 300), world(rng, 120, shift=0.3)
    before = (_digest(ref), _digest(batch))
    cls = DRIFT_TESTS.get(name)
    assert set(cls.requires) <= set(ref)
    m = DRIFT_TESTS.build(name, {}, random_state=3)
    assert m.fit(ref, batch) is m
    assert (_digest(ref), _digest(batch)) == before, "fit modified its inputs"
    r = m.result_
    assert isinstance(r, DriftResult) and r.test == name
    assert r.decision == (r.p_value <= r.alpha) and 0 <= r.p_value <= 1 and r.effect_size >= 0
    assert (r.n_reference, r.n_batch) == (300, 120) and r.why and "\n" not in r.why
    again = DRIFT_TESTS.build(name, {}, random_state=3).fit(ref, batch).result_
    assert json.dumps(r.to_dict()) == json.dumps(again.to_dict())
    params = get_params(m)
    assert json.loads(json.dumps(params)) == params
    with pytest.raises(ConfigError) as exc:
        DRIFT_TESTS.build(name, {"no_such_kwarg": 1})
    assert "no_such_kwarg" in str(exc.value) and all(hp in str(exc.value) for hp in hyperparameters(cls))


def test_missing_input_names_the_side_and_the_key():
    rng = np.random.default_rng(0)
    ref = world(rng, 50)
    with pytest.raises(ValueError, match="batch lacks 'probs'"):
        DRIFT_TESTS.build("bbsd_ks").fit(ref, {"labels": ref["labels"]})


# -- individual tests ------------------------------------------------------------------------------

def test_mmd_null_from_matrix_products_equals_reindexing_the_kernel():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 0.5
    mmd2, p, witness = mmd_permutation(x, y, 99, np.random.default_rng(7))
    # the same draws, naively: re-index the kernel per permutation
    g = np.random.default_rng(7)
    z = np.vstack([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    sub = np.arange(50)  # under MEDIAN_ROWS: every row, and take() draws nothing
    med = np.median(d2[sub][:, sub][~np.eye(50, dtype=bool)])
    k = np.exp(-d2 / (2 * med))
    perms = np.argsort(g.random((99, 50)), axis=1)

    def biased(idx):
        a, b = idx[:30], idx[30:]
        return k[np.ix_(a, a)].mean() + k[np.ix_(b, b)].mean() - 2 * k[np.ix_(a, b)].mean()

    observed = biased(np.arange(50))
    null = np.array([biased(np.argsort(perm)) for perm in perms])
    assert p == pytest.approx((1 + np.sum(null >= observed - 1e-9)) / 100, abs=0.011)
    kxx, kyy, kxy = k[:30, :30], k[30:, 30:], k[:30, 30:]
    unbiased = ((kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 20) / (20 * 19) - 2 * kxy.mean())
    assert mmd2 == pytest.approx(unbiased, rel=1e-4)
    assert witness.shape == (20,)


def test_mmd_subsamples_the_reference_to_its_bound_and_scores_batch_rows():
    rng = np.random.default_rng(0)
    ref, batch = world(rng, 900), world(rng, 150, shift=0.5)
    r = DRIFT_TESTS.build("mmd", {"max_reference": 200, "max_batch": 100}).fit(ref, batch).result_
    assert "200 reference vs 100 batch rows" in r.why and r.n_reference == 900
    looks_new = r.breakdown["looks_new"]
    assert looks_new.shape == (150,) and np.isnan(looks_new).sum() == 50


def test_classifier_looks_new_ranks_the_new_rows_first():
    rng = np.random.default_rng(0)
    ref, batch = world(rng, 400), world(rng, 200)
    batch["embeddings"][:50] += 3.0  # a quarter of the batch is new
    r = DRIFT_TESTS.build("classifier").fit(ref, batch).result_
    assert r.decision
    top = np.argsort(r.breakdown["looks_new"])[::-1][:50]
    assert np.mean(top < 50) >= 0.8


def test_classifier_on_a_tiny_batch_says_it_did_not_test():
    rng = np.random.default_rng(0)
    r = DRIFT_TESTS.build("classifier").fit(world(rng, 100), world(rng, 3)).result_
    assert not r.decision and r.p_value == 1.0 and "not tested" in r.why


def test_per_class_mmd_names_the_shifted_class_only():
    rng = np.random.default_rng(0)
    ref, batch = world(rng, 600), world(rng, 300)
    batch["embeddings"][batch["labels"] == 2] += 1.0
    r = DRIFT_TESTS.build("per_class_mmd").fit(ref, batch).result_
    b = r.breakdown
    assert list(b["class"][b["shifted"]]) == [2] and r.decision and "class(es) 2 shifted" in r.why


def test_label_shift_reports_a_new_class_and_bbse_recovers_the_prior_ratio():
    rng = np.random.default_rng(0)
    prior = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    ref, batch = world(rng, 5000), world(rng, 5000, prior=prior)
    m = DRIFT_TESTS.build("label_shift").fit(ref, batch)
    true_ratio = prior / np.bincount(ref["labels"], minlength=C) * len(ref["labels"])
    assert np.allclose(m.class_weights_, true_ratio, atol=0.15), m.class_weights_
    assert np.allclose(bbse_weights(ref["probs"], ref["labels"], batch["probs"], C), m.class_weights_)
    assert "NEW" not in m.result_.why
    newer = dict(batch, labels=np.where(np.arange(5000) < 300, 7, batch["labels"]))
    r = DRIFT_TESTS.build("label_shift").fit(ref, newer).result_
    assert "NEW class(es) 7 never in the reference: 300 batch rows" in r.why and r.decision
    assert r.breakdown["new_class"][list(r.breakdown["class"]).index(7)]


def test_label_quality_interval_covers_the_difference_and_takes_p_clean():
    rng = np.random.default_rng(0)
    ref = {"p_clean": np.where(rng.random(2000) < 0.1, 0.1, 0.9)}
    batch = {"p_clean": np.where(rng.random(1000) < 0.3, 0.1, 0.9)}
    r = DRIFT_TESTS.build("label_quality").fit(ref, batch).result_
    b = r.breakdown
    assert b["ci_low"] < b["difference"] < b["ci_high"] and b["ci_low"] > 0.1 and r.decision
    assert r.effect_size == pytest.approx(b["batch_rate"] - b["reference_rate"])
    better = DRIFT_TESTS.build("label_quality").fit(batch, ref).result_  # one-sided: better labels pass
    assert not better.decision and better.effect_size == 0.0


def test_image_stats_sees_a_size_change_and_names_the_statistic():
    rng = np.random.default_rng(0)
    ref, batch = world(rng, 300), world(rng, 200)
    ref["sizes"] = np.tile([32, 32], (300, 1))
    batch["sizes"] = np.tile([48, 64], (200, 1))
    r = DRIFT_TESTS.build("image_stats").fit(ref, batch).result_
    assert r.decision and "log_area" in r.breakdown["statistic"]
    blurred = dict(batch, images=shifts.corrupt(batch["images"], "gaussian_blur", 5, rng))
    del blurred["sizes"]
    r = DRIFT_TESTS.build("image_stats").fit(ref, blurred).result_
    sharpness = r.breakdown["ks"][r.breakdown["statistic"].index("sharpness")]
    assert r.decision and sharpness > 0.5


# -- the verdict -----------------------------------------------------------------------------------

def _result(name, p, effect, n_batch=100):
    return DriftResult(name, 0.0, p, effect, p <= 0.05, f"{name} stub", 1000, n_batch, 0.05)


def test_holm_and_bh_adjust_as_published():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])


def test_verdict_corrects_for_multiplicity_and_applies_floor_and_min_batch():
    results = {"a": _result("a", 0.02, 0.5), "b": _result("b", 0.5, 0.5), "c": _result("c", 0.9, 0.0)}
    v = verdict(results, alpha=0.05, min_batch=50, effect_floor=0.0)
    assert not v.drift and v.adjusted_p["a"] == pytest.approx(0.06)  # 0.02 alone, not after Holm over 3
    results["a"] = _result("a", 0.001, 0.5)
    v = verdict(results, alpha=0.05, min_batch=50, effect_floor=0.0)
    assert v.drift and v.decided == {"a": True, "b": False, "c": False} and "drift: a" in v.why
    assert v.lines["a"].startswith("a: drift:") and "a stub" in v.lines["a"]
    v = verdict(results, alpha=0.05, min_batch=50, effect_floor={"a": 0.6})
    assert not v.drift and "below" not in v.lines["a"] and "< floor 0.6" in v.lines["a"]
    small = {"a": _result("a", 1e-6, 0.9, n_batch=20)}
    v = verdict(small, alpha=0.05, min_batch=50)
    assert not v.drift and "fewer than min_batch=50" in v.why
    json.dumps(v.to_dict())


def test_verdict_over_all_tests_flags_a_shift_and_passes_no_shift():
    rng = np.random.default_rng(0)
    ref = world(rng, 600)
    names = DRIFT_TESTS.names()
    for batch, expected in ((world(rng, 200), False), (world(rng, 200, brightness=4, noise_up=0.2), True)):
        results = {n: DRIFT_TESTS.build(n).fit(ref, batch).result_ for n in names}
        v = verdict(results, alpha=0.05, min_batch=50, effect_floor=0.02)
        assert v.drift is expected, v.lines
    assert v.decided["image_stats"] and v.decided["label_quality"]


# -- shift generators ------------------------------------------------------------------------------

def smooth_images(rng, n=16, side=32):
    """Images with structure at several scales, so that blur, JPEG and pixelation change them."""
    small = torch.from_numpy(rng.integers(0, 256, (n, 3, side // 4, side // 4)).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=(side, side), mode="bilinear").permute(0, 2, 3, 1).numpy()
    return np.clip(big + rng.normal(0, 10, big.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", shifts.CORRUPTIONS)
def test_corruptions_are_monotone_in_severity_pure_and_deterministic(kind):
    images = smooth_images(np.random.default_rng(0))
    before = images.copy()
    dist = []
    for severity in range(6):
        out = shifts.corrupt(images, kind, severity, np.random.default_rng(1))
        assert out.shape == images.shape and out.dtype == np.uint8 and out is not images
        assert np.array_equal(out, shifts.corrupt(images, kind, severity, np.random.default_rng(1)))
        dist.append(np.abs(out.astype(float) - images).mean())
    assert np.array_equal(images, before), "corrupt modified its input"
    assert dist[0] == 0 and all(b >= a - 0.05 for a, b in zip(dist, dist[1:])), dist
    assert dist[5] > dist[1] > 0, dist


def test_corrupt_rejects_unknown_kind_and_severity():
    images = smooth_images(np.random.default_rng(0), n=1)
    with pytest.raises(ValueError, match="valid: gaussian_noise"):
        shifts.corrupt(images, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="0..5"):
        shifts.corrupt(images, "jpeg", 6, np.random.default_rng(0))


def test_class_prior_shift_and_new_class_and_no_shift_draw_the_asked_shares():
    labels = np.repeat(np.arange(C), 400)
    before = labels.copy()
    idx = shifts.class_prior_shift(labels, [0, 1, 2], 1 / 3, 500, np.random.default_rng(0))
    counts = np.bincount(labels[idx], minlength=C)
    assert len(idx) == 500 == len(np.unique(idx)) and np.allclose(counts, [33, 33, 33, 200, 200], atol=1)
    assert np.array_equal(idx, shifts.class_prior_shift(labels, [0, 1, 2], 1 / 3, 500, np.random.default_rng(0)))
    idx = shifts.with_new_class(labels, 4, 0.1, 500, np.random.default_rng(0))
    assert np.sum(labels[idx] == 4) == 50 and len(np.unique(idx)) == 500
    idx = shifts.no_shift(len(labels), 300, np.random.default_rng(0))
    assert len(np.unique(idx)) == 300 and idx.max() < len(labels)
    assert np.array_equal(labels, before)
    with pytest.raises(ValueError, match="asked for"):
        shifts.with_new_class(labels, 4, 0.9, 1000, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_raise_label_noise_flips_the_asked_share_to_wrong_classes(kind):
    labels = np.random.default_rng(0).integers(0, C, 1000)
    before = labels.copy()
    new, flipped = shifts.raise_label_noise(labels, 0.2, C, np.random.default_rng(1), kind)
    assert np.array_equal(labels, before) and flipped.sum() == 200
    assert (new[flipped] != labels[flipped]).all() and (new[~flipped] == labels[~flipped]).all()
    assert ((0 <= new) & (new < C)).all()
    if kind == "pair":
        assert (new[flipped] == (labels[flipped] + 1) % C).all()
    else:  # every wrong class is reached
        assert len(np.unique((new[flipped] - labels[flipped]) % C)) == C - 1
    again, _ = shifts.raise_label_noise(labels, 0.2, C, np.random.default_rng(1), kind)
    assert np.array_equal(new, again)


# -- the time target ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_mmd_and_classifier_check_of_5000_against_50000_rows_takes_under_10_seconds():
    rng = np.random.default_rng(0)
    ref = {"embeddings": rng.normal(size=(50_000, 512)).astype(np.float32)}
    batch = {"embeddings": rng.normal(size=(5_000, 512)).astype(np.float32) + 0.05}
    start = time.perf_counter()
    results = {n: DRIFT_TESTS.build(n).fit(ref, batch).result_ for n in ("mmd", "classifier")}
    seconds = time.perf_counter() - start
    assert seconds <= 10, f"{seconds:.1f} s on {torch.get_num_threads()} threads"
    assert all(r.decision for r in results.values())


def test_unknown_drift_test_names_are_config_errors():
    from dataopt.config import validate
    from dataopt.errors import ConfigError
    from dataopt.plugins import check_methods

    with pytest.raises(ConfigError, match=r"drift\.tests: unknown drift test method 'nope'; valid: .*mmd"):
        check_methods(validate({"drift": {"tests": ["mmd", "nope"]}}))
    with pytest.raises(ConfigError, match=r"drift\.effect_floor: unknown drift test method 'mdm'"):
        check_methods(validate({"drift": {"effect_floor": {"mdm": 0.1}}}))
