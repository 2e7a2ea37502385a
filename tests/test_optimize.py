"""optimize: selectors (none, random, moderate), weighters (none, p_clean), the optimize stage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from dataopt.config import Params, validate
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.io import read_json, save_npy, write_parquet
from dataopt.optimize.prune.base import n_keep
from dataopt.optimize.prune.scores import ModerateCoreset, RandomSubset, class_centre_distance
from dataopt.optimize.weight.weighters import PCleanWeight
from dataopt.paths import Paths
from dataopt.plugins import check_methods
from dataopt.registry import SELECTORS, WEIGHTERS
from dataopt.schema import PLAN_COLUMNS
from dataopt.stages import run_stage

from conftest import write_signals_project


def clustered(n=200, n_classes=4, dim=8, seed=0):
    """``(embeddings (n, dim) float32, labels (n,))`` with one blob per class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    z = rng.normal(size=(n_classes, dim))[labels] + rng.normal(size=(n, dim))
    return z.astype(np.float32), labels


def direct_distance(z, labels):
    """Class-centre distance, written the obvious way (a loop over classes) as the reference."""
    d = np.empty(len(z))
    for c in np.unique(labels):
        rows = labels == c
        d[rows] = np.linalg.norm(z[rows] - z[rows].mean(axis=0), axis=1)
    return d


def middle_band(score, m):
    """Indices of the m samples in the middle of the ascending order ((n - m) // 2 dropped below)."""
    order = np.argsort(score, kind="stable")
    lo = (len(score) - m) // 2
    return np.sort(order[lo:lo + m])


def make_project(root, **kwargs) -> Paths:
    """The shared fabricated project, train and test rows interleaved (row mapping must hold)."""
    return write_signals_project(root, **{"n_train": 240, "n_test": 40, "interleave": True, **kwargs})


def optimize_params(**section) -> Params:
    return Params().model_copy(update={"optimize": validate({"optimize": section}).optimize})


# ---------------------------------------------------------------- selectors

def test_class_centre_distance_matches_direct_computation():
    z, y = clustered(300)
    np.testing.assert_allclose(class_centre_distance(z, y, block=7), direct_distance(z, y), rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.77, 1.0])
def test_moderate_keeps_the_middle_band_around_the_median(ratio):
    z, y = clustered(201)
    sel = SELECTORS.build("moderate", {}, ratio=ratio, random_state=0).fit(y, embeddings=z)
    d = direct_distance(z, y)
    m = round(ratio * 201)
    assert sel.keep_.sum() == m
    np.testing.assert_array_equal(np.flatnonzero(sel.keep_), middle_band(d, m))
    kept, dropped = d[sel.keep_], d[~sel.keep_]
    # contiguous: no dropped score strictly inside the kept band; the ends are dropped evenly
    assert not np.any((dropped > kept.min()) & (dropped < kept.max()))
    below, above = (dropped < np.median(d)).sum(), (dropped > np.median(d)).sum()
    assert below == (201 - m) // 2 and above == 201 - m - (201 - m) // 2
    if m % 2 == 1:  # an odd band is centred on the median itself (n is odd)
        assert np.median(d) in kept
    assert sel.summary_["band"] == [pytest.approx(kept.min()), pytest.approx(kept.max())]
    assert sel.summary_["median"] == pytest.approx(np.median(d))


def test_moderate_per_class_keeps_a_band_in_every_class():
    z, y = clustered(203, n_classes=5, seed=1)
    ratio = 0.4
    sel = ModerateCoreset(ratio=ratio, per_class=True).fit(y, embeddings=z)
    d = direct_distance(z, y)
    assert sel.keep_.sum() == round(ratio * 203)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        m_c = int(sel.keep_[rows].sum())
        assert abs(m_c - ratio * rows.size) < 1  # proportional share, within one sample
        np.testing.assert_array_equal(np.flatnonzero(sel.keep_[rows]), middle_band(d[rows], m_c))
    assert "class median" in sel.reason_[0]
    # the global variant selects differently on the same data
    assert not np.array_equal(ModerateCoreset(ratio=ratio).fit(y, embeddings=z).keep_, sel.keep_)


def test_moderate_per_class_reason_for_a_class_with_no_quota():
    y = np.array([0] * 10 + [1])
    z = np.random.default_rng(0).normal(size=(11, 3))
    sel = ModerateCoreset(ratio=0.2, per_class=True).fit(y, embeddings=z)
    assert sel.keep_.sum() == 2 and not sel.keep_[10]
    assert sel.reason_[10].startswith("moderate: dropped, distance ")
    assert sel.reason_[10].endswith(", class keeps 0 of 1")


def test_moderate_on_a_signal_column_and_its_errors():
    rng = np.random.default_rng(0)
    signals = pd.DataFrame({"sample_id": np.arange(50), "el2n": rng.random(50), "tag": ["a"] * 50,
                            "pred_label": np.zeros(50, dtype=int)})
    y = np.zeros(50, dtype=int)
    sel = ModerateCoreset(ratio=0.3, score="el2n").fit(y, signals=signals)
    np.testing.assert_array_equal(np.flatnonzero(sel.keep_), middle_band(signals["el2n"].to_numpy(), 15))
    assert all(r.startswith("moderate: ") and " el2n " in r for r in sel.reason_)
    with pytest.raises(ConfigError, match="'tag' is not a numeric signal; valid: el2n$"):
        ModerateCoreset(score="tag").fit(y, signals=signals)
    signals.loc[3, "el2n"] = np.nan
    with pytest.raises(DataError, match="not finite"):
        ModerateCoreset(score="el2n").fit(y, signals=signals)


def test_moderate_reasons_name_the_values_that_decided():
    z, y = clustered(100)
    sel = ModerateCoreset(ratio=0.5).fit(y, embeddings=z)
    d = direct_distance(z, y)
    lo, hi = np.sort(d[sel.keep_])[[0, -1]]
    i_kept = np.flatnonzero(sel.keep_)[0]
    i_low = int(np.argmin(d))
    i_high = int(np.argmax(d))
    assert sel.reason_[i_kept] == (f"moderate: kept, distance {d[i_kept]:.4g} within "
                                   f"[{lo:.4g}, {hi:.4g}] around median {np.median(d):.4g}")
    assert sel.reason_[i_low].startswith(f"moderate: dropped, distance {d[i_low]:.4g} below kept band")
    assert sel.reason_[i_high].startswith(f"moderate: dropped, distance {d[i_high]:.4g} above kept band")


def test_random_and_none_selectors():
    y = np.arange(97) % 3
    a = SELECTORS.build("random", {}, ratio=0.3, random_state=1).fit(y)
    b = SELECTORS.build("random", {}, ratio=0.3, random_state=1).fit(y)
    c = SELECTORS.build("random", {}, ratio=0.3, random_state=2).fit(y)
    assert a.keep_.sum() == round(0.3 * 97)
    np.testing.assert_array_equal(a.keep_, b.keep_)
    assert not np.array_equal(a.keep_, c.keep_)
    assert all(r.startswith("random: ") for r in a.reason_)
    full = SELECTORS.build("none", {}, ratio=1.0, random_state=0).fit(y)
    assert full.keep_.all() and full.summary_["counts"] == {"kept": 97, "dropped": 0}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), ratio=st.floats(0.001, 1.0), method=st.sampled_from(
    ["random", "moderate", "moderate_per_class"]), seed=st.integers(0, 2**16))
def test_selectors_keep_round_ratio_n(n, ratio, method, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 4)).astype(np.float32)
    if method == "random":
        sel = RandomSubset(ratio=ratio, random_state=seed).fit(y)
    else:
        sel = ModerateCoreset(ratio=ratio, per_class=method.endswith("per_class")).fit(y, embeddings=z)
    kept = int(sel.keep_.sum())
    assert kept == n_keep(n, ratio) == max(1, round(ratio * n))
    assert abs(kept - ratio * n) <= 1
    assert sel.keep_.shape == (n,) and sel.reason_.shape == (n,)


def test_ratio_outside_unit_interval_is_rejected():
    with pytest.raises(ConfigError, match=r"optimize.ratio must be in \(0, 1\]"):
        RandomSubset(ratio=1.5).fit(np.zeros(5))
    with pytest.raises(DataError, match="no training samples"):
        RandomSubset(ratio=0.5).fit(np.zeros(0))


# ---------------------------------------------------------------- weighters and params

def test_p_clean_and_uniform_weighting():
    p = np.array([0.9, 0.02, 0.5, 1.0])
    w = WEIGHTERS.build("p_clean", {"min_weight": 0.1}).fit(p)
    np.testing.assert_allclose(w.weight_, [0.9, 0.1, 0.5, 1.0])
    assert w.reason_[0] == "p_clean weight 0.900"
    assert w.reason_[1] == "p_clean 0.020, weight floored at 0.100"
    assert w.summary_["counts"]["floored"] == 1
    np.testing.assert_allclose(PCleanWeight().fit(p).weight_, p)
    with pytest.raises(ConfigError, match="min_weight must be in"):
        PCleanWeight(min_weight=2.0).fit(p)
    u = WEIGHTERS.build("none", {}).fit(np.zeros(3))
    np.testing.assert_array_equal(u.weight_, 1.0)
    assert (u.reason_ == "").all()


def test_unknown_kwargs_are_rejected_with_the_valid_names():
    with pytest.raises(ConfigError, match="valid: ratio, score, per_class") as exc:
        SELECTORS.build("moderate", {"bogus": 1})
    assert "bogus" in str(exc.value)
    with pytest.raises(ConfigError, match="valid: min_weight"):
        WEIGHTERS.build("p_clean", {"floor": 0.1})
    with pytest.raises(ConfigError, match="unknown selector method 'bogus'; valid: .*herding, .*moderate"):
        SELECTORS.get("bogus")
    with pytest.raises(ConfigError, match=r"'moderate' got unknown kwargs \['bogus'\]"):
        check_methods(validate({"optimize": {"kwargs": {"bogus": 1}}}))
    with pytest.raises(ConfigError, match="set optimize.ratio instead"):
        validate({"optimize": {"kwargs": {"ratio": 0.5}}})
    with pytest.raises(ConfigError, match="none, p_clean"):
        check_methods(validate({"optimize": {"weighting": "bogus"}}))


# ---------------------------------------------------------------- the stage

def test_optimize_stage_writes_plan(tmp_path):
    paths = make_project(tmp_path)
    run_stage("analyze", Params(), paths)
    params = optimize_params(method="moderate", ratio=0.5, weighting="p_clean",
                             weighting_kwargs={"min_weight": 0.05})
    metrics = run_stage("optimize", params, paths)
    out = paths.artifacts / "optimize"

    table = pq.read_table(out / "plan.parquet")
    assert table.schema.names == list(PLAN_COLUMNS)
    assert [str(t) for t in table.schema.types] == [
        "int64", "bool", "double", "double", "double", "int64", "string"]
    plan = table.to_pandas()
    signals = pd.read_parquet(paths.artifacts / "perceive" / "signals.parquet")
    analysis = pd.read_parquet(paths.artifacts / "analyze" / "analysis.parquet")
    n = len(signals)
    np.testing.assert_array_equal(plan["sample_id"], signals["sample_id"])
    assert plan["keep"].sum() == round(0.5 * n) == metrics["n_kept"]
    np.testing.assert_allclose(plan["weight"], np.maximum(analysis["p_clean"], 0.05))
    assert (plan["sampling_weight"] == 1.0).all() and (plan["augment_magnitude"] == 0.0).all()
    np.testing.assert_array_equal(plan["new_label"], signals["label"])
    assert plan["reason"].str.startswith("moderate: ").all()
    kept_reasons = plan.loc[plan["keep"], "reason"]
    assert kept_reasons.str.match(r"moderate: kept, distance \S+ within \[\S+, \S+\] around median "
                                  r"\S+; p_clean (weight|\S+, weight floored at) \d\.\d{3}$").all()
    assert plan.loc[~plan["keep"], "reason"].str.match(r"moderate: dropped, distance .* kept band").all()

    # the embedding distances are computed on the train rows only (test rows are interleaved)
    samples = pq.read_table(paths.artifacts / "ingest" / "samples.parquet").to_pandas()
    emb = np.load(paths.artifacts / "embed" / "embeddings.npy")[samples["split"] == "train"]
    d = direct_distance(emb.astype(np.float32), signals["label"].to_numpy())
    np.testing.assert_array_equal(np.flatnonzero(plan["keep"]), middle_band(d, round(0.5 * n)))

    summary = read_json(out / "plan.json")
    assert summary["method"] == "moderate" and summary["ratio"] == 0.5
    assert summary["n_train"] == n and summary["n_kept"] == metrics["n_kept"]
    share = plan.groupby(signals["label"])["keep"].mean()
    assert summary["kept_share_per_class"] == {str(k): pytest.approx(v) for k, v in share.items()}
    assert summary["weighting"] == "p_clean"
    assert summary["weight"]["mean"] == pytest.approx(plan.loc[plan["keep"], "weight"].mean())
    assert summary["weight"]["min"] == pytest.approx(plan.loc[plan["keep"], "weight"].min())
    assert summary["steps"][0]["counts"] == {"kept": metrics["n_kept"], "dropped": n - metrics["n_kept"]}
    assert summary["inputs"] == ["embeddings", "labels", "p_clean", "signals"]
    assert metrics["kept_share"] == pytest.approx(metrics["n_kept"] / n)
    assert metrics["mean_weight"] == pytest.approx(summary["weight"]["mean"])
    assert read_json(out / "metrics.json")["n_kept"] == metrics["n_kept"]

    run_stage("optimize", params, paths)  # deterministic: the same plan again
    assert pq.read_table(out / "plan.parquet").equals(table)


def test_optimize_stage_reads_analysis_only_when_weighting_needs_it(tmp_path):
    paths = make_project(tmp_path)
    params = optimize_params(method="random", ratio=0.25, weighting="none")
    metrics = run_stage("optimize", params, paths)  # no analyze stage has run
    plan = pd.read_parquet(paths.artifacts / "optimize" / "plan.parquet")
    assert metrics["n_kept"] == round(0.25 * len(plan)) and metrics["mean_weight"] == 1.0
    assert plan["reason"].str.match(r"random: (kept|dropped), uniform draw \(seed 0\)$").all()
    assert read_json(paths.artifacts / "optimize" / "plan.json")["inputs"] == ["labels"]
    with pytest.raises(MissingArtifactError, match="analyze"):
        run_stage("optimize", optimize_params(method="none", weighting="p_clean"), paths)


def test_optimize_stage_input_errors(tmp_path):
    paths = make_project(tmp_path)
    run_stage("analyze", Params(), paths)
    emb_path = paths.artifacts / "embed" / "embeddings.npy"
    save_npy(emb_path, np.load(emb_path)[:-1])
    with pytest.raises(DataError, match="re-run the embed stage"):
        run_stage("optimize", optimize_params(ratio=0.5), paths)
    ana = paths.artifacts / "analyze" / "analysis.parquet"
    write_parquet(ana, pq.read_table(ana).slice(1))
    with pytest.raises(DataError, match="re-run the analyze stage"):
        run_stage("optimize", optimize_params(method="random", ratio=0.5), paths)
