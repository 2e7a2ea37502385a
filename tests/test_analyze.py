"""analyze: loss-mixture detectors (gmm, bmm), the analyze stage and its artifacts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import beta as beta_dist
from sklearn.metrics import f1_score
from sklearn.mixture import GaussianMixture

from dataopt.analyze import report
from dataopt.analyze.base import LazyInputs, arrow_table, fit_method
from dataopt.analyze.mixture import BetaLossMixture, GaussianLossMixture
from dataopt.config import Params, validate
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.io import read_json, write_parquet
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.registry import DETECTORS
from dataopt.schema import ANALYSIS_COLUMNS
from dataopt.stages import run_stage

from conftest import write_signals_project as make_project
from dataopt.analyze.run import FLAG_COLUMNS, analyze


def planted_losses(n: int = 2000, rate: float = 0.2, seed: int = 0):
    """Early-epoch-like losses: clean ~ Gamma near 0, a planted ``rate`` of noisy ones near log(10)."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < rate
    loss = np.where(noisy, np.clip(rng.normal(2.4, 0.5, n), 0.05, None), rng.gamma(1.5, 0.15, n))
    return loss, noisy


@pytest.mark.parametrize("name", ["gmm", "bmm"])
def test_detectors_recover_planted_noise(name):
    loss, noisy = planted_losses()
    det = DETECTORS.build(name, {}, random_state=0).fit(loss)
    p = det.p_clean_
    assert p.shape == loss.shape and np.isfinite(p).all()
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert f1_score(noisy, p < 0.5) > 0.8
    assert abs(det.noise_rate_ - noisy.mean()) < 0.05
    assert det.noise_rate_ == pytest.approx(np.mean(1 - p))
    assert det.means_[0] < det.means_[1]  # components are ordered [clean, noisy]
    assert det.weights_.sum() == pytest.approx(1.0)
    again = DETECTORS.build(name, {}, random_state=0).fit(loss)
    np.testing.assert_array_equal(again.p_clean_, p)  # deterministic for a seed
    proba = det.predict_proba(loss)
    np.testing.assert_allclose(proba[:, 0], p)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


@pytest.mark.parametrize("name", ["gmm", "bmm"])
def test_p_clean_is_non_increasing_in_loss(name):
    loss, _ = planted_losses(seed=3)
    det = DETECTORS.build(name, {}, random_state=0).fit(loss)
    p_sorted = det.p_clean_[np.argsort(loss, kind="stable")]
    assert np.all(np.diff(p_sorted) <= 1e-12)


def test_monotone_envelope_fixes_gaussian_tail():
    # a wide clean component and a narrow noisy one: the raw Gaussian posterior turns back to
    # "clean" in the far right tail; the monotone envelope must not.
    rng = np.random.default_rng(1)
    loss = np.concatenate([rng.normal(0.30, 0.12, 1600).clip(0, None), rng.normal(0.62, 0.02, 400)])
    loss = np.concatenate([loss, [1.2, 1.3]])  # two extreme losses
    raw = GaussianLossMixture(monotone=False, clip_quantile=1.0, random_state=0).fit(loss)
    env = GaussianLossMixture(monotone=True, clip_quantile=1.0, random_state=0).fit(loss)
    order = np.argsort(loss)
    assert np.any(np.diff(raw.p_clean_[order]) > 0.05)  # the artefact exists
    assert np.all(np.diff(env.p_clean_[order]) <= 1e-12)
    assert env.p_clean_[-1] < 0.5  # the most extreme loss is not called clean


def test_gmm_raw_posterior_matches_sklearn():
    loss, _ = planted_losses(seed=2)
    det = GaussianLossMixture(monotone=False, random_state=0).fit(loss)
    gm = GaussianMixture(2, reg_covar=5e-4, random_state=0).fit(det.normalised_[:, None])
    clean = int(np.argmin(gm.means_.ravel()))
    np.testing.assert_allclose(det.p_clean_, gm.predict_proba(det.normalised_[:, None])[:, clean],
                               atol=1e-8)


def test_bmm_is_a_weighted_moments_fixed_point():
    loss, _ = planted_losses(seed=4)
    det = BetaLossMixture(monotone=False, tol=1e-10, max_iter=2000).fit(loss)
    x = np.clip(det.normalised_, det.eps, 1 - det.eps)
    dens = det.weights_ * beta_dist.pdf(x[:, None], det.alphas_, det.betas_)
    r = dens / dens.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(det.p_clean_, r[:, 0], atol=1e-8)  # posterior of the low-mean Beta
    mean = (r * x[:, None]).sum(0) / r.sum(0)
    var = (r * (x[:, None] - mean) ** 2).sum(0) / r.sum(0)
    common = mean * (1 - mean) / var - 1
    np.testing.assert_allclose(det.alphas_, mean * common, rtol=1e-3)
    np.testing.assert_allclose(det.betas_, (1 - mean) * common, rtol=1e-3)
    np.testing.assert_allclose(det.weights_, r.mean(0), rtol=1e-3)
    assert det.converged_


def test_normalisation_clips_high_quantile():
    loss = np.concatenate([np.linspace(0, 1, 99), [1000.0]])
    det = GaussianLossMixture(clip_quantile=0.95, random_state=0).fit(loss)
    assert det.lo_ == 0.0 and det.hi_ == pytest.approx(np.quantile(loss, 0.95))
    assert det.normalised_.min() == 0.0 and det.normalised_.max() == 1.0
    assert np.sum(det.normalised_ == 1.0) == 5  # the clipped top 5 %
    assert np.isfinite(det.threshold_loss(0.5)) or det.p_clean_.min() >= 0.5


def test_log_transform_option():
    loss, noisy = planted_losses(seed=5)
    det = GaussianLossMixture(transform="log", random_state=0).fit(loss)
    t = np.log(loss + 1e-3)
    np.testing.assert_allclose(det.normalised_, (np.clip(t, det.lo_, det.hi_) - det.lo_)
                               / (det.hi_ - det.lo_))
    assert det.lo_ == pytest.approx(t.min())
    assert f1_score(noisy, det.p_clean_ < 0.5) > 0.8
    assert det.summary()["normalisation"]["transform"] == "log"
    with pytest.raises(ConfigError, match="transform must be 'minmax' or 'log'"):
        BetaLossMixture(transform="sqrt").fit(loss)


@pytest.mark.parametrize("loss, match", [
    (np.full(50, 0.7), "constant"),
    (np.r_[np.ones(10), np.nan], "not finite"),
    (np.ones(1), "at least 2"),
])
def test_detectors_reject_unusable_loss(loss, match):
    for cls in (GaussianLossMixture, BetaLossMixture):
        with pytest.raises(DataError, match=match):
            cls().fit(loss)


def test_unknown_detector_kwargs_and_names_list_valid_ones():
    with pytest.raises(ConfigError, match="clip_quantile") as exc:
        DETECTORS.build("gmm", {"bogus": 1})
    assert "bogus" in str(exc.value)
    with pytest.raises(ConfigError, match="bmm, calibrated_confidence, cl_mixture, confident_learning, gmm"):
        DETECTORS.build("nope")
    with pytest.raises(ConfigError, match="eps"):
        check_methods(validate({"analyze": {"detector": "bmm", "kwargs": {"reg_covar": 1e-3}}}))
    with pytest.raises(ConfigError, match="top-level seed"):
        validate({"analyze": {"kwargs": {"random_state": 3}}})
    assert check_methods(validate({"analyze": {"detector": "bmm", "kwargs": {"eps": 1e-3}}})).analyze.detector == "bmm"


def test_lazy_inputs_load_on_demand_and_name_missing_ones():
    calls = []
    inputs = LazyInputs({"loss": lambda: calls.append(1) or np.arange(3.0)}, "analyze")
    assert inputs.loaded() == [] and calls == []
    det = fit_method(GaussianLossMixture(random_state=0), inputs)
    assert det.p_clean_.shape == (3,) and inputs.loaded() == ["loss"]
    inputs.get("loss")
    assert calls == [1]  # loaded once
    with pytest.raises(ConfigError, match="'probs'.*available: loss"):
        inputs.get("probs", "method 'x'")


def test_arrow_table_enforces_the_contract():
    with pytest.raises(ValueError, match="missing"):
        arrow_table(ANALYSIS_COLUMNS, {"sample_id": [1]})


def test_detection_quality_numbers():
    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    flags = np.array([1, 0, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.3])
    q = report.detection_quality(truth, flags, score, estimated_noise_rate=0.5)
    assert q["precision"] == 0.5 and q["recall"] == 0.5 and q["f1"] == 0.5
    assert q["true_noise_rate"] == pytest.approx(1 / 3)
    assert q["noise_rate_error"] == pytest.approx(0.5 - 1 / 3)
    assert q["auroc"] == pytest.approx(7 / 8)  # (noisy, clean) pairs ranked correctly: 7 of 8
    assert "auroc" not in report.detection_quality(np.zeros(3, bool), np.zeros(3, bool),
                                                   np.zeros(3), 0.0)


@pytest.mark.parametrize("detector", ["gmm", "bmm"])
def test_analyze_stage_writes_artifacts_and_scores_detection(tmp_path, detector):
    paths = make_project(tmp_path)
    params = Params().model_copy(update={"analyze": validate({"analyze": {"detector": detector}}).analyze})
    metrics = run_stage("analyze", params, paths)
    out = paths.artifacts / "analyze"

    table = pq.read_table(out / "analysis.parquet")
    assert table.schema.names == [*ANALYSIS_COLUMNS, *FLAG_COLUMNS]
    assert [str(t) for t in table.schema.types] == ["int64", "double", "bool", "double", "int64",
                                                    "double", "double", "bool", "double", "bool"]
    df = table.to_pandas()
    signals = pd.read_parquet(paths.artifacts / "perceive" / "signals.parquet")
    np.testing.assert_array_equal(df["sample_id"], signals["sample_id"])
    assert df["p_clean"].between(0, 1).all() and df["p_clean"].notna().all()
    np.testing.assert_array_equal(df["is_label_issue"], df["p_clean"] < 0.5)
    np.testing.assert_allclose(df["label_issue_score"], 1 - df["p_clean"])
    np.testing.assert_array_equal(df["suggested_label"], signals["pred_label"])

    summary = read_json(out / "analysis.json")
    assert summary["detector"] == detector
    assert summary["n_label_issues"] == int(df["is_label_issue"].sum()) == metrics["n_label_issues"]
    assert summary["estimated_noise_rate"] == pytest.approx(1 - df["p_clean"].mean())
    assert len(summary["mixture"]["means"]) == 2 and len(summary["mixture"]["weights"]) == 2
    per_class = summary["per_class"]
    assert sum(v["n"] for v in per_class.values()) == len(df)
    assert sum(v["n_issues"] for v in per_class.values()) == summary["n_label_issues"]
    assert per_class["0"]["name"] == "c0"
    det = summary["detection"]
    assert det["n_scored"] == len(df)
    for key in ("precision", "recall", "f1", "auroc", "average_precision", "true_noise_rate",
                "noise_rate_error"):
        assert key in det and f"detection_{key}" in metrics
    assert det["f1"] > 0.8 and det["noise_rate_error"] < 0.05

    assert read_json(out / "metrics.json")["n_label_issues"] == metrics["n_label_issues"]
    for png in ("loss_mixture.png", "class_issues.png", "projection.png", "transition_matrix.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    rows = read_json(out / "plots" / "loss_hist.json")
    assert isinstance(rows, list) and {"bin", "count", "count_flagged", "count_clean",
                                       "density_clean", "density_noisy"} <= set(rows[0])
    assert sum(r["count"] for r in rows) == len(df)
    assert sum(r["count_flagged"] for r in rows) == summary["n_label_issues"]


def test_analyze_stage_without_ground_truth_and_deterministic(tmp_path):
    paths = make_project(tmp_path, clean_known=False)
    metrics = run_stage("analyze", Params(), paths)
    assert not any(k.startswith("detection_") for k in metrics)
    assert "detection" not in read_json(paths.artifacts / "analyze" / "analysis.json")
    first = pq.read_table(paths.artifacts / "analyze" / "analysis.parquet")
    run_stage("analyze", Params(), paths)
    assert pq.read_table(paths.artifacts / "analyze" / "analysis.parquet").equals(first)


def test_analyze_stage_input_errors(tmp_path):
    paths = Paths.at(tmp_path)
    with pytest.raises(MissingArtifactError, match="ingest"):
        run_stage("analyze", Params(), paths)
    paths = make_project(tmp_path)
    sig_path = paths.artifacts / "perceive" / "signals.parquet"
    signals = pd.read_parquet(sig_path)
    write_parquet(sig_path, signals.iloc[::-1])
    with pytest.raises(DataError, match="does not match the 300 train rows"):
        run_stage("analyze", Params(), paths)
    stale = signals.copy()
    stale.loc[7, "label"] = (stale.loc[7, "label"] + 1) % 4
    write_parquet(sig_path, stale)
    with pytest.raises(DataError, match=f"label differs .* 1 train rows .*sample_id {stale.loc[7, 'sample_id']}"):
        run_stage("analyze", Params(), paths)
    signals.loc[5, "loss_early"] = np.nan
    write_parquet(sig_path, signals)
    with pytest.raises(DataError, match="loss_early.*sample_id"):
        run_stage("analyze", Params(), paths)
    write_parquet(sig_path, signals.drop(columns=["pred_label"]))
    with pytest.raises(DataError, match="pred_label"):
        run_stage("analyze", Params(), paths)


def test_agreement_gate_trusts_labels_the_model_predicts(tmp_path):
    # clean data whose out-of-fold predictions all agree with the labels: the mixture alone still
    # splits the losses and flags samples; the agreement gate flags none of them
    paths = make_project(tmp_path, noise=0.0)
    mixture = validate({"analyze": {"detector": "gmm"}})  # a mixture (the default detector is CL-based)
    plain = validate({"analyze": {"detector": "gmm", "gate": "none"}})
    run_stage("analyze", plain, paths)
    mixture_only = pd.read_parquet(paths.artifacts / "analyze" / "analysis.parquet")
    assert mixture_only["is_label_issue"].sum() > 0
    np.testing.assert_array_equal(mixture_only["p_clean"], mixture_only["p_clean_mixture"])

    metrics = run_stage("analyze", mixture, paths)  # default gate: agreement
    gated = pd.read_parquet(paths.artifacts / "analyze" / "analysis.parquet")
    assert metrics["n_label_issues"] == 0 and (gated["p_clean"] == 1.0).all()
    np.testing.assert_array_equal(gated["p_clean_mixture"], mixture_only["p_clean_mixture"])
    assert read_json(paths.artifacts / "analyze" / "analysis.json")["gate"] == "agreement"

    # where the prediction disagrees with the label, the mixture posterior decides
    paths = make_project(tmp_path / "noisy", noise=0.3)
    run_stage("analyze", mixture, paths)
    df = pd.read_parquet(paths.artifacts / "analyze" / "analysis.parquet")
    signals = pd.read_parquet(paths.artifacts / "perceive" / "signals.parquet")
    disagree = (signals["pred_label"] != signals["label"]).to_numpy()
    np.testing.assert_array_equal(df["p_clean"][disagree], df["p_clean_mixture"][disagree])
    assert (df["p_clean"][~disagree] == 1.0).all() and df["is_label_issue"][disagree].mean() > 0.9


def test_analyze_is_a_call_on_arrays_and_flags_the_planted_noise():
    """The library call the stage wraps: no paths; its table has the stage's columns, the planted
    high-loss rows are flagged, detection is scored on the rows with a known clean label only."""
    loss, noisy = planted_losses(n=600)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, loss.size)
    probs = np.full((loss.size, 3), 0.1)
    probs[np.arange(loss.size), np.where(noisy, (labels + 1) % 3, labels)] = 0.8
    signals = pd.DataFrame({"sample_id": np.arange(loss.size) * 7, "label": labels, "loss_early": loss,
                            "pred_label": probs.argmax(1)})
    clean = np.where(noisy, (labels + 1) % 3, labels).astype(np.float64)
    clean[:100] = np.nan
    dist = np.sort(rng.random((loss.size, 4)), axis=1)
    res = analyze(signals, probs, dist, Params().analyze, seed=0, label_clean=clean,
                  embeddings=rng.normal(size=(loss.size, 5)))
    assert res.table.schema.names == [*ANALYSIS_COLUMNS, *FLAG_COLUMNS]
    flagged = res.table.column("is_label_issue").to_numpy()
    assert f1_score(noisy, flagged) > 0.9
    assert res.summary["detection"]["n_scored"] == loss.size - 100
    assert res.metrics["n_label_issues"] == int(flagged.sum())
    assert len(res.plots["xy"]) == min(loss.size, Params().analyze.plot_points)
