"""DETECTORS on planted noise: confident learning (hand-checked), cl_mixture, transition matrix,
outlier and near-duplicate flags, plots, determinism."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from dataopt.analyze import report
from dataopt.analyze.base import LazyInputs, fit_method
from dataopt.analyze.confident import (ConfidentLearning, calibrate_joint, confident_joint,
                                       per_class_thresholds, prune_by_noise_rate,
                                       transition_matrix)
from dataopt.config import Params, validate
from dataopt.errors import ConfigError, DataError
from dataopt.io import read_json, save_npz
from dataopt.plugins import check_methods
from dataopt.registry import DETECTORS
from dataopt.stages import run_stage
from dataopt.analyze.run import outlier_scores
from test_analyze import make_project


def planted(n=3000, C=4, rate=0.2, pair=False, seed=0):
    """OOF-like probabilities of a decent model of the clean label, given labels with planted
    noise (symmetric, or pair flips c -> c+1), and losses / signals consistent with them."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, C, n)
    noisy = rng.random(n) < rate
    shift = np.ones(n, int) if pair else rng.integers(1, C, n)
    given = np.where(noisy, (clean + shift) % C, clean)
    logits = rng.normal(0, 0.7, (n, C))
    logits[np.arange(n), clean] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = -np.log(probs[np.arange(n), given])
    signals = pd.DataFrame({"loss_last": loss, "loss_early": loss})
    return probs, given, clean, noisy, signals


def fit(name, probs, labels, signals, **kw):
    inputs = LazyInputs({"probs": lambda: probs, "labels": lambda: labels,
                         "signals": lambda: signals, "loss": lambda: signals["loss_early"].to_numpy()},
                        "analyze")
    return fit_method(DETECTORS.build(name, kw, random_state=0), inputs)


@pytest.mark.parametrize("name", ["gmm", "bmm", "confident_learning", "cl_mixture", "calibrated_confidence"])
def test_every_detector_finds_planted_noise(name):
    probs, given, _, noisy, signals = planted()
    det = fit(name, probs, given, signals)
    p, flags = det.p_clean_, det.is_label_issue_
    assert p.shape == flags.shape == given.shape and flags.dtype == bool
    assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    assert f1_score(noisy, flags) > 0.7  # chance F1 at 20 % noise is ~0.29
    assert abs(det.noise_rate_ - noisy.mean()) < 0.06
    again = fit(name, probs, given, signals)
    np.testing.assert_array_equal(again.p_clean_, p)
    np.testing.assert_array_equal(again.is_label_issue_, flags)


def test_confident_joint_matches_hand_computation():
    # 6 samples, 3 classes. thresholds: t0 = mean p0 over labels 0 = (.7+.2)/2 = .45,
    # t1 = (.8+.5)/2 = .65, t2 = (.6+.1)/2 = .35
    probs = np.array([[.7, .2, .1],    # label 0: above t0 only -> (0, 0)
                      [.2, .1, .7],    # label 0: above t2 only -> (0, 2)
                      [.1, .8, .1],    # label 1: above t1 -> (1, 1)
                      [.1, .5, .4],    # label 1: above t2 only (.5 < .65) -> (1, 2)
                      [.0, .4, .6],    # label 2: above t2 -> (2, 2)
                      [.5, .4, .1]])   # label 2: above t0 only -> (2, 0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(per_class_thresholds(probs, labels), [.45, .65, .35])
    joint, guess = confident_joint(probs, labels)
    expected = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(joint, expected)
    np.testing.assert_array_equal(guess, [0, 2, 1, 2, 2, 0])
    # a sample above two thresholds counts at the larger probability; one above none is dropped
    j2, g2 = confident_joint(np.array([[.5, .0, .5 - 1e-3], [.3, .3, .3]]), np.array([0, 0]),
                             thresholds=np.array([.4, .9, .4]))
    np.testing.assert_array_equal(g2, [0, -1])
    assert j2.sum() == 1 and j2[0, 0] == 1
    q = calibrate_joint(joint, labels)
    assert q.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(q, expected / 6)  # each row already holds its 2 samples
    det = ConfidentLearning().fit(probs, labels)
    assert det.noise_rate_ == pytest.approx(0.5)  # off-diagonal mass 3/6
    # pruning: round(6 * 1/6) = 1 per off-diagonal cell, largest margin p_j - p_i in the row
    flags = prune_by_noise_rate(probs, labels, q)
    np.testing.assert_array_equal(flags, [False, True, False, True, False, True])
    # agreeing predictions are trusted: sample 3 predicts its own label 1 (.5 > .4)
    np.testing.assert_array_equal(det.is_label_issue_, [False, True, False, False, False, True])


def test_confident_learning_matches_cleanlab_when_installed():
    cleanlab = pytest.importorskip("cleanlab.filter")
    from cleanlab.count import compute_confident_joint, estimate_joint

    probs, given, *_ = planted(n=1500, seed=3)
    joint, _ = confident_joint(probs, given)
    np.testing.assert_array_equal(joint, compute_confident_joint(given, probs, calibrate=False))
    det = ConfidentLearning().fit(probs, given)
    np.testing.assert_allclose(det.joint_, estimate_joint(given, probs), atol=1e-3)
    # cleanlab rounds the pruning counts preserving row totals; a sample at the cut can differ
    ref = cleanlab.find_label_issues(given, probs)
    assert np.mean(det.is_label_issue_ == ref) > 0.995 and abs(det.is_label_issue_.sum() - ref.sum()) <= 3


def test_transition_matrix_recovers_pair_flips():
    probs, given, clean, noisy, _ = planted(n=4000, C=4, rate=0.3, pair=True, seed=1)
    det = ConfidentLearning().fit(probs, given)
    T = det.transition_matrix_
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    assert (T >= 0).all()
    for c in range(4):  # true c is given as c (70 %) or c + 1 (30 %), nothing else
        assert T[c, c] == pytest.approx(0.7, abs=0.06)
        assert T[c, (c + 1) % 4] == pytest.approx(0.3, abs=0.06)
        assert T[c, (c + 2) % 4] < 0.03 and T[c, (c + 3) % 4] < 0.03
    assert det.noise_rate_ == pytest.approx(noisy.mean(), abs=0.04)
    # a true class that is never confidently predicted keeps an identity row
    q = np.array([[0.5, 0.0], [0.5, 0.0]])
    np.testing.assert_allclose(transition_matrix(q), [[0.5, 0.5], [0.0, 1.0]])


def test_detector_kwargs_are_checked():
    with pytest.raises(ConfigError, match="valid: filter_by, trust_predicted, min_per_class"):
        DETECTORS.build("confident_learning", {"threshold": 0.3})
    with pytest.raises(ConfigError, match="valid: loss, mixture"):
        check_methods(validate({"analyze": {"detector": "cl_mixture", "kwargs": {"bogus": 1}}}))
    probs, given, *_ , signals = planted(n=200)
    with pytest.raises(ConfigError, match="filter_by"):
        ConfidentLearning(filter_by="nope").fit(probs, given)
    with pytest.raises(DataError, match="no column 'loss_x'"):
        fit("cl_mixture", probs, given, signals, loss="loss_x")
    with pytest.raises(DataError, match="labels must lie"):
        ConfidentLearning().fit(probs, given + 10)


def test_outlier_scores_are_robust_z():
    d = np.tile(np.linspace(0.9, 1.1, 100)[:, None], (1, 3))
    d[7] = 5.0
    z = outlier_scores(d)
    assert z.argmax() == 7 and z[7] > 10 and np.sum(z > 3.5) == 1
    assert np.median(z) == pytest.approx(0.0)


@pytest.mark.parametrize("detector", ["confident_learning", "cl_mixture"])
def test_stage_flags_outliers_duplicates_and_writes_plots(tmp_path, detector):
    paths = make_project(tmp_path, n_train=300, pred_clean=False)
    knn_path = paths.artifacts / "embed" / "knn.npz"
    with np.load(knn_path) as z:
        knn = {k: z[k].copy() for k in z.files}
    knn["distances"][[3, 40]] = 5.0  # two planted outliers: far from every neighbour
    knn["distances"][[10, 11], 0] = 0.0  # a planted duplicate pair
    knn["indices"][10, 0], knn["indices"][11, 0] = 11, 10
    save_npz(knn_path, **knn)
    params = Params().model_copy(update={"analyze": validate(
        {"analyze": {"detector": detector, "duplicate_distance": 0.01}}).analyze})
    metrics = run_stage("analyze", params, paths)
    out = paths.artifacts / "analyze"
    df = pd.read_parquet(out / "analysis.parquet")
    assert set(np.flatnonzero(df["is_outlier"])) == {3, 40}
    assert set(np.flatnonzero(df["is_near_duplicate"])) == {10, 11}
    np.testing.assert_array_equal(df["nearest_distance"], knn["distances"][:, 0].astype(float))
    assert metrics["n_outliers"] == 2 and metrics["n_near_duplicates"] == 2
    s = read_json(out / "analysis.json")
    assert s["detection"]["f1"] > 0.7 and s["detection"]["noise_rate_error"] < 0.08
    assert s["threshold"] is None  # these detectors flag by pruning
    T = np.array(s["transition_matrix"]["matrix"])
    assert T.shape == (4, 4) and np.allclose(T.sum(1), 1.0)
    assert len(s["confident_joint"]["counts"]) == 4
    assert s["flags"]["n_outliers"] == 2 and sum(v["n_outliers"] for v in s["per_class"].values()) == 2
    for png in ("loss_mixture.png", "class_issues.png", "projection.png", "transition_matrix.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    proj = read_json(out / "plots" / "projection.json")
    assert len(proj) == 300 and {r["flag"] for r in proj} >= {"clean", "label issue", "outlier"}
    assert read_json(out / "plots" / "class_issues.json")[0]["class"] == "c0"
    first = pd.read_parquet(out / "analysis.parquet")
    run_stage("analyze", params, paths)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "analysis.parquet"), first)


def test_projection_subsample_is_seeded_and_bounded():
    rows = report.subsample(10_000, 500, seed=3)
    assert rows.size == 500 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, report.subsample(10_000, 500, seed=3))
    assert not np.array_equal(rows, report.subsample(10_000, 500, seed=4))
    z = np.random.default_rng(0).normal(size=(200, 5)) * [5, 2, 1, 1, 1]
    xy = report.projection(z)
    assert xy.shape == (200, 2) and xy[:, 0].var() > xy[:, 1].var()
    cat = report.flag_category(np.array([1, 0, 0, 0], bool), np.array([1, 1, 0, 0], bool),
                               np.array([0, 1, 1, 0], bool))
    assert cat.tolist() == ["label issue", "outlier", "near duplicate", "clean"]


def test_temperature_fit_recovers_a_planted_temperature():
    from dataopt.analyze.confident import fit_temperature, temperature_scale

    rng = np.random.default_rng(0)
    n, C = 20000, 5
    logits = rng.normal(0, 2.0, (n, C))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(C, p=row) for row in true_p])  # labels drawn from the true probs
    softened = temperature_scale(true_p, 2.0)  # an under-confident model: logits divided by 2
    t = fit_temperature(softened, labels)
    assert abs(t - 0.5) < 0.05  # dividing by 0.5 undoes the softening
    np.testing.assert_allclose(temperature_scale(softened, t), true_p, atol=0.03)


def test_calibrated_confidence_flags_the_estimated_count_by_self_confidence():
    from dataopt.analyze.confident import temperature_scale

    probs, given, _, noisy, signals = planted(rate=0.15, seed=3)
    soft = temperature_scale(probs, 2.5)  # under-confident probabilities, as label smoothing gives
    cal = fit("calibrated_confidence", soft, given, signals)
    raw = fit("calibrated_confidence", soft, given, signals, calibrate=False)
    # the flags are exactly the round(n * noise_rate) lowest calibrated self-confidences
    k = int(round(cal.noise_rate_ * len(given)))
    assert cal.is_label_issue_.sum() == k
    lowest = np.argsort(cal.self_confidence_, kind="stable")[:k]
    assert cal.is_label_issue_[lowest].all()
    # p_clean keeps the self-confidence ranking and puts exactly the flagged below 0.5
    assert ((cal.p_clean_ < 0.5) == cal.is_label_issue_).all()
    order = np.argsort(cal.self_confidence_)
    assert (np.diff(cal.p_clean_[order]) >= -1e-12).all()
    # the softened probabilities are sharpened again, and the noise rate is estimated well
    assert cal.temperature_ < 0.6 and raw.temperature_ == 1.0
    assert abs(cal.noise_rate_ - noisy.mean()) < 0.02
    assert f1_score(noisy, cal.is_label_issue_) > 0.8
