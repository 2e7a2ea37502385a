"""PERCEIVE stage: out-of-fold dynamics, signals, class/corpus summaries, determinism, errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dataopt.config import validate
from dataopt.errors import ConfigError, DataError, DivergedError, MissingArtifactError
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.perceive.dynamics import Dynamics, OOFDynamics
from dataopt.perceive.run import perceive, signal_catalogue
from dataopt.perceive.signals import SignalInputs, compute_signals, out_of_fold_signals
from dataopt.perceive import dynamics as dynamics_mod
from dataopt.plugins import check_methods
from dataopt.registry import SIGNALS
from dataopt.stages import run_stage

FAST = {"epochs": 4, "early_epochs": 2, "folds": 3}


def _signals(paths: Paths) -> pd.DataFrame:
    return pq.read_table(paths.artifacts / "perceive" / "signals.parquet").to_pandas()


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, digits_writer):
    """Digits with 15% of the train labels flipped, embedded and perceived with the default params."""
    paths = digits_writer(tmp_path_factory.mktemp("noisy"), noise_rate=0.15)
    params = validate({})
    run_stage("embed", params, paths)
    metrics = run_stage("perceive", params, paths)
    return paths, metrics


def test_artifacts_shapes_dtypes_and_catalogue(noisy):
    paths, metrics = noisy
    out = paths.artifacts / "perceive"
    samples = pq.read_table(paths.artifacts / "ingest" / "samples.parquet").to_pandas()
    train = samples[samples.split == "train"]
    n = len(train)

    dyn = Dynamics.load(out / "dynamics.npz")
    assert dyn.epochs_completed == 12 and dyn.epochs_per_fold.tolist() == [12] * 4
    assert np.array_equal(dyn.sample_id, train.sample_id.to_numpy())
    assert sorted(np.unique(dyn.fold)) == [0, 1, 2, 3]
    for name in ("loss", "p_label", "margin", "logit_margin", "error_norm", "feature_norm",
                 "center_distance"):
        assert getattr(dyn, name).shape == (12, n) and getattr(dyn, name).dtype == np.float32
    assert dyn.correct.shape == (12, n) and dyn.correct.dtype == bool
    assert dyn.probs.shape == (n, 10) and dyn.probs.dtype == np.float32
    np.testing.assert_allclose(dyn.probs.sum(1), 1.0, atol=1e-5)
    labels = train.label.to_numpy()
    np.testing.assert_allclose(dyn.probs[np.arange(n), labels], dyn.p_label[-1], atol=1e-6)
    np.testing.assert_allclose(dyn.loss, -np.log(dyn.p_label), rtol=1e-3, atol=1e-4)
    onehot = np.eye(10)[labels]
    np.testing.assert_allclose(dyn.error_norm[-1], np.linalg.norm(dyn.probs - onehot, axis=1), atol=1e-5)
    assert np.array_equal(dyn.logit_margin > 0, dyn.margin > 0)  # same argmax test, logits or probs
    assert (dyn.feature_norm > 0).all()
    # a linear head reads the standardised embedding: mean squared norm = d (unit variance per coordinate)
    d = np.load(paths.artifacts / "embed" / "embeddings.npy", mmap_mode="r").shape[1]
    assert 0.5 * d < (dyn.feature_norm[0] ** 2).mean() < 1.5 * d
    assert np.array_equal(dyn.feature_norm[0], dyn.feature_norm[-1])  # fixed features for hidden=0
    assert (np.abs(dyn.margin) <= 1).all()
    assert np.array_equal(dyn.correct[-1], dyn.probs.argmax(1) == labels)

    sig = _signals(paths)
    assert list(sig.columns[:2]) == ["sample_id", "label"]
    assert set(sig.columns[2:]) == set(SIGNALS.names())
    assert np.array_equal(sig.sample_id, train.sample_id) and np.array_equal(sig.label, labels)
    assert sig.select_dtypes("number").notna().all().all()
    assert sig.correct_last.dtype == bool and sig.forgetting.dtype == np.int64
    assert sig.pred_label.dtype == np.int64 and sig.loss_early.dtype == np.float64
    assert np.array_equal(sig.pred_label, dyn.probs.argmax(1))
    np.testing.assert_allclose(sig.loss_early, dyn.loss[:3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(sig.margin_last, dyn.margin[-1], rtol=1e-6)
    with np.load(paths.artifacts / "embed" / "knn.npz") as z:
        np.testing.assert_allclose(sig.knn_density, z["distances"].mean(1), rtol=1e-5)
    meta = pq.read_schema(paths.artifacts / "perceive" / "signals.parquet").metadata
    cat = json.loads(meta[b"dataopt.signals"])
    assert set(cat) == set(SIGNALS.names())
    assert cat["loss_early"]["direction"].startswith("higher")
    assert cat["margin_last"]["direction"].startswith("lower")
    assert all(set(c) == {"granularity", "type", "direction", "dtype", "description"} for c in cat.values())
    assert all(cat[k]["dtype"] == str(sig[k].dtype) for k in cat)

    classes = pq.read_table(out / "classes.parquet").to_pandas()
    assert list(classes.columns) == ["label", "label_name", "count", "share", "oof_accuracy", "compactness",
                                     "diversity"]
    assert ((classes.diversity > 1) & (classes.diversity <= classes["count"])).all()
    assert classes.label.tolist() == list(range(10)) and classes["count"].sum() == n
    assert classes.label_name.tolist() == [str(i) for i in range(10)]
    np.testing.assert_allclose(classes.share.sum(), 1.0)
    np.testing.assert_allclose(classes.compactness, sig.groupby("label").class_center_distance.mean())

    corpus = read_json(out / "corpus.json")
    assert corpus["n_train"] == n and corpus["n_classes"] == 10 and corpus["epochs_completed"] == 12
    assert corpus["duplicate_rate"] == 0.0 and corpus["model"] == "head" and corpus["folds"] == 4
    assert corpus["known_noise_rate"] == pytest.approx(0.15, abs=0.005)
    assert corpus["estimated_noise_rate"] == pytest.approx(0.15, abs=0.06)
    assert corpus["estimated_noise_rate_method"].startswith("confident joint")
    assert corpus["semantic_consistency_source"] == "oof_probability"  # the pixels embedder has no text
    assert "no text embeddings" in cat["semantic_consistency"]["description"]
    assert 0 < corpus["signal_seconds"] < corpus["seconds"]
    counts = train.label.value_counts()
    assert corpus["imbalance_ratio"] == pytest.approx(counts.max() / counts.min())
    assert corpus["oof_accuracy"] == pytest.approx(sig.correct_last.mean())
    assert set(corpus["signals"]) == set(SIGNALS.names())
    assert set(metrics) >= {"oof_accuracy", "mean_loss_early", "epochs_completed", "seconds"}
    assert metrics["mean_loss_early"] == pytest.approx(float(dyn.loss[:3].mean()), rel=1e-5)


def test_flipped_labels_have_higher_early_loss_and_lower_margin(noisy):
    """Documented directions: loss_early higher = more likely mislabeled; margin_last lower = more likely."""
    paths, _ = noisy
    sig = _signals(paths)
    samples = pq.read_table(paths.artifacts / "ingest" / "samples.parquet").to_pandas().set_index("sample_id")
    clean_label = samples.loc[sig.sample_id, "label_clean"].to_numpy()
    flipped = sig.label.to_numpy() != clean_label
    assert 60 <= flipped.sum() <= 80
    assert sig.loss_early[flipped].mean() > 1.5 * sig.loss_early[~flipped].mean()
    assert sig.margin_last[flipped].mean() < 0 < sig.margin_last[~flipped].mean()
    # rank separation: a random flipped row scores worse than a random clean row most of the time
    auc = (sig.loss_early[flipped].to_numpy()[:, None] > sig.loss_early[~flipped].to_numpy()[None]).mean()
    assert auc > 0.9
    assert sig.correct_last[~flipped].mean() > 0.85  # OOF accuracy on the clean labels
    assert (sig.pred_label[flipped] == clean_label[flipped]).mean() > 0.6  # predictions recover the truth
    assert sig.knn_label_agreement[flipped].mean() < sig.knn_label_agreement[~flipped].mean()
    assert sig.class_center_distance[flipped].mean() > sig.class_center_distance[~flipped].mean()
    # out of fold, a flipped row sits near its true class, far from the centre of its given one
    auc = (sig.oof_center_distance[flipped].to_numpy()[:, None]
           > sig.oof_center_distance[~flipped].to_numpy()[None]).mean()
    assert auc > 0.8


def test_deterministic_on_cpu(noisy, tmp_path, digits_writer):
    paths, _ = noisy
    again = digits_writer(tmp_path, noise_rate=0.15)
    params = validate({"perceive": {"device": "cpu"}})
    run_stage("embed", params, again)
    run_stage("perceive", params, again)
    pd.testing.assert_frame_equal(_signals(paths), _signals(again), check_exact=True)
    a = Dynamics.load(paths.artifacts / "perceive" / "dynamics.npz")
    b = Dynamics.load(again.artifacts / "perceive" / "dynamics.npz")
    assert np.array_equal(a.loss, b.loss) and np.array_equal(a.probs, b.probs)


def test_time_budget_truncates_to_the_epochs_every_fold_completed(monkeypatch):
    """A fold cut short by max_seconds limits every fold's recorded epochs to the same count."""
    real_fit, calls = dynamics_mod.fit, []

    def budgeted_fit(model, x, y, cfg, weights=None, on_epoch=None):
        calls.append(cfg.max_seconds)
        cfg.epochs = 2 if len(calls) == 2 else cfg.epochs  # the second fold "runs out of time"
        return real_fit(model, x, y, cfg, weights=weights, on_epoch=on_epoch)

    monkeypatch.setattr(dynamics_mod, "fit", budgeted_fit)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 5)).astype(np.float32) + y[:, None]
    oof = OOFDynamics(folds=3, epochs=5, batch_size=16, max_seconds=1e6).fit(x, y, 3)
    d = oof.dynamics_
    assert calls == [1e6] * 3
    assert d.epochs_per_fold.tolist() == [5, 2, 5] and d.epochs_completed == 2
    assert d.loss.shape == (2, 60) and d.correct.shape == (2, 60)
    # the probabilities are those of epoch 2 for every row, consistent with p_label
    np.testing.assert_allclose(d.probs[np.arange(60), y], d.p_label[-1], atol=1e-6)
    assert (d.p_label > 0).all()  # every row was scored at every kept epoch


def test_keep_features_and_the_recipe_options_change_nothing_by_default(monkeypatch):
    """keep_features adds the first fold model's features of every row and leaves the dynamics alone;
    momentum, translate and lookahead reach the training loop and default to what perceive ran before."""
    real_fit, cfgs = dynamics_mod.fit, []

    def spy(model, x, y, cfg, **kw):
        cfgs.append(cfg)
        return real_fit(model, x, y, cfg, **kw)

    monkeypatch.setattr(dynamics_mod, "fit", spy)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 5)).astype(np.float32) + y[:, None]
    kw = {"folds": 3, "epochs": 3, "batch_size": 16, "device": "cpu"}
    base = OOFDynamics(**kw).fit(x, y, 3)
    assert [(c.momentum, c.translate, c.lookahead) for c in cfgs] == [(0.9, None, False)] * 3
    kept = OOFDynamics(keep_features=True, **kw).fit(x, y, 3)
    assert not hasattr(base, "features_")
    for name in ("loss", "probs", "fold", "center_distance"):
        np.testing.assert_array_equal(getattr(kept.dynamics_, name), getattr(base.dynamics_, name))
    # a linear head's features are its inputs, centred and scaled by fold 0's training rows as it saw them
    tr = x[kept.dynamics_.fold != 0]
    mu = tr.mean(0)
    np.testing.assert_allclose(kept.features_, (x - mu) / np.sqrt(((tr - mu) ** 2).mean()), rtol=1e-4, atol=1e-5)
    cfgs.clear()
    other = OOFDynamics(momentum=0.5, translate=3, lookahead=True, **kw).fit(x, y, 3)
    assert [(c.momentum, c.translate, c.lookahead) for c in cfgs] == [(0.5, 3, True)] * 3
    assert not np.array_equal(other.dynamics_.loss, base.dynamics_.loss)


def test_real_time_budget_and_early_epochs_clip(digits_ingested: Paths):
    params = validate({"perceive": {**FAST, "max_seconds": 1e-6, "early_epochs": 3}})
    run_stage("embed", params, digits_ingested)
    metrics = run_stage("perceive", params, digits_ingested)
    assert metrics["epochs_completed"] == 1
    corpus = read_json(digits_ingested.artifacts / "perceive" / "corpus.json")
    assert corpus["epochs_per_fold"] == [1, 1, 1] and corpus["early_epochs_used"] == 1
    sig = _signals(digits_ingested)
    assert (sig.loss_early_var == 0).all() and (sig.forgetting == 0).all()
    assert sig.select_dtypes("number").notna().all().all()


def test_cnn_model_on_images(digits_ingested: Paths):
    params = validate({"perceive": {"model": "cnn", "width": 4, "epochs": 2, "early_epochs": 1, "folds": 2},
                       "embed": {"kwargs": {"dim": 8}}})
    run_stage("embed", params, digits_ingested)
    metrics = run_stage("perceive", params, digits_ingested)
    dyn = Dynamics.load(digits_ingested.artifacts / "perceive" / "dynamics.npz")
    assert dyn.loss.shape == (2, 480) and dyn.probs.shape == (480, 10)
    assert read_json(digits_ingested.artifacts / "perceive" / "corpus.json")["model"] == "cnn"
    assert 0.0 <= metrics["oof_accuracy"] <= 1.0 and np.isfinite(dyn.loss).all()


def test_signal_subset_and_unknown_signal(digits_ingested: Paths):
    params = validate({"perceive": {**FAST, "signals": ["loss_early", "knn_density"]}})
    run_stage("embed", params, digits_ingested)
    run_stage("perceive", params, digits_ingested)
    assert list(_signals(digits_ingested).columns) == ["sample_id", "label", "loss_early", "knn_density"]
    assert (digits_ingested.artifacts / "perceive" / "classes.parquet").exists()
    with pytest.raises(ConfigError, match="unknown signal method 'grandd'; valid: .*aum.*loss_early"):
        check_methods(validate({"perceive": {"signals": ["grandd"]}}))
    with pytest.raises(ConfigError, match="'knn_shapley' got unknown kwargs \\['K'\\]; valid: k"):
        check_methods(validate({"perceive": {"signal_kwargs": {"knn_shapley": {"K": 3}}}}))
    with pytest.raises(ConfigError, match="unknown signal method 'shapley'"):
        check_methods(validate({"perceive": {"signal_kwargs": {"shapley": {}}}}))


def test_signals_on_hand_made_dynamics():
    correct = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 1, 1]], bool)  # E=4, n=3
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    loss = np.arange(12, dtype=np.float32).reshape(4, 3)
    dyn = Dynamics(sample_id=np.arange(3), fold=np.zeros(3, np.int64), loss=loss,
                   p_label=np.zeros((4, 3), np.float32),
                   margin=np.array([[0.1, 0.2, 0.3]] * 3 + [[0.5, -0.5, 0.0]], np.float32),
                   correct=correct, logit_margin=np.zeros((4, 3), np.float32),
                   error_norm=np.zeros((4, 3), np.float32), feature_norm=np.ones((4, 3), np.float32),
                   center_distance=np.arange(12, dtype=np.float32).reshape(4, 3) / 10,
                   probs=probs, epochs_completed=4, epochs_per_fold=np.array([4]))
    labels = np.array([0, 1, 1])
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32)
    knn_idx = np.array([[1, 2], [0, 2], [1, 0]])
    knn_dist = np.array([[1.0, 3.0], [1.0, 2.0], [2.0, 3.0]], np.float32)
    inputs = SignalInputs(labels=labels, dynamics=dyn, embeddings=emb, knn_indices=knn_idx,
                          knn_distances=knn_dist)
    v, cat = compute_signals(inputs, sample_id=np.array([7, 8, 9]), early_epochs=2)
    np.testing.assert_allclose(v["loss_early"], [1.5, 2.5, 3.5])
    np.testing.assert_allclose(v["loss_early_var"], [2.25, 2.25, 2.25])
    np.testing.assert_allclose(v["loss_last"], [9, 10, 11])
    np.testing.assert_allclose(v["margin_last"], [0.5, -0.5, 0.0])
    np.testing.assert_allclose(v["margin_mean"], [0.2, 0.025, 0.225], rtol=1e-6)
    assert v["forgetting"].tolist() == [2, 0, 1]
    np.testing.assert_allclose(v["el2n"], [np.sqrt(0.09 + 0.04 + 0.01), np.sqrt(0.01 + 0.81 + 0.64),
                                           np.sqrt(1 / 9 + 4 / 9 + 1 / 9)], rtol=1e-6)
    np.testing.assert_allclose(v["entropy"][2], np.log(3), rtol=1e-6)
    assert v["pred_label"].tolist() == [0, 2, 0] and v["correct_last"].tolist() == [False, True, True]
    np.testing.assert_allclose(v["knn_density"], [2.0, 1.5, 2.5])
    np.testing.assert_allclose(v["knn_label_agreement"], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(v["class_center_distance"], [0.0, 1.0, 1.0])  # class 1 centre at x=2
    np.testing.assert_allclose(v["oof_center_distance"], [0.9, 1.0, 1.1], rtol=1e-6)  # the last epoch
    assert cat["forgetting"]["dtype"] == "int64"

    bad = SignalInputs(labels=labels, dynamics=dyn, embeddings=emb, knn_indices=knn_idx,
                       knn_distances=np.array([[1.0, np.nan], [1.0, 2.0], [2.0, 3.0]], np.float32))
    with pytest.raises(DataError, match="'knn_density' is not finite for sample_id 7"):
        compute_signals(bad, ["knn_density"], sample_id=np.array([7, 8, 9]))
    with pytest.raises(DataError, match="needs 'dynamics'"):
        compute_signals(SignalInputs(labels=labels), ["loss_last"])


def test_center_distance_uses_the_centre_of_each_rows_own_label():
    # rows are L2-normalised first: class 0 = {(1, 0), (0, 1)} around (0.5, 0.5); class 2's two rows
    # point the same way (distance 0 whatever their norms); class 1 alone: 0; class 3 absent
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 3.0], [0.0, 5.0], [7.0, 7.0]])
    y = torch.tensor([0, 0, 2, 2, 1])
    d = dynamics_mod.center_distance(h, y, n_classes=4)
    torch.testing.assert_close(d, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5, 0.0, 0.0, 0.0]))


def test_missing_embed_artifacts_name_the_stage(digits_ingested: Paths):
    with pytest.raises(MissingArtifactError, match="'embed' stage"):
        run_stage("perceive", validate({"perceive": FAST}), digits_ingested)


def test_stale_knn_is_a_data_error(digits_ingested: Paths, digits_writer):
    params = validate({"perceive": FAST})
    run_stage("embed", params, digits_ingested)
    digits_writer(digits_ingested.root, test_fraction=0.25)  # a different split after embed ran
    with pytest.raises(DataError, match="knn.npz does not match the train rows.*'embed'"):
        run_stage("perceive", params, digits_ingested)


def test_head_with_hidden_layer_learns_out_of_fold():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = (rng.normal(size=(90, 4)) + 3 * np.eye(3, 4)[y]).astype(np.float32)
    d = OOFDynamics(hidden=8, folds=3, epochs=6, batch_size=16, device="cpu").fit(x, y, 3).dynamics_
    assert d.loss.shape == (6, 90) and d.epochs_per_fold.tolist() == [6, 6, 6]
    assert d.correct[-1].mean() > 0.8 and d.loss[-1].mean() < d.loss[0].mean()
    with pytest.raises(ConfigError, match="unknown perceive model 'mlp'"):
        OOFDynamics(model="mlp").fit(x, y, 3)


def test_perceive_is_a_call_on_arrays():
    """The library call the stage wraps, on arrays only: the signal table carries its catalogue, the
    class table one row per class, the corpus the run's facts."""
    rng = np.random.default_rng(0)
    n, d = 90, 6
    labels = np.arange(n) % 3
    emb = (rng.normal(size=(n, d)) + 3 * np.eye(d)[labels]).astype(np.float32)
    dist = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    idx = np.argsort(dist, axis=1)[:, :5]
    cfg = validate({"perceive": {**FAST, "epochs": 12, "signals": ["loss_early", "knn_density"]}}).perceive
    res = perceive(np.arange(n) + 100, labels, np.array(["a", "b", "c"])[labels], 3, emb, idx,
                   np.take_along_axis(dist, idx, 1).astype(np.float32), cfg, seed=0)
    assert res.signals.column_names == ["sample_id", "label", "loss_early", "knn_density"]
    assert sorted(signal_catalogue(res.signals)) == ["knn_density", "loss_early"]
    assert res.classes.column("label_name").to_pylist() == ["a", "b", "c"]
    assert res.dynamics.epochs_completed == 12 and res.corpus["oof_accuracy"] > 0.6  # chance: 1/3
    assert res.corpus["semantic_consistency_source"] == "oof_probability"


def test_out_of_fold_signals_are_declared_by_the_signals():
    names = SIGNALS.names()
    oof = out_of_fold_signals(names)
    assert {"loss_early", "margin_last", "aum", "forgetting", "oof_center_distance",
            "semantic_consistency"} <= set(oof)
    assert not {"knn_density", "class_center_distance", "knn_label_agreement"} & set(oof)
    assert "semantic_consistency" not in out_of_fold_signals(names, text=True)  # then a text cosine


def test_divergent_proxy_stops_with_one_message():
    """An OOF proxy run that diverges stops at once and names perceive.lr (no NaN dynamics written)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 5)).astype(np.float32) + y[:, None]
    with pytest.raises(DivergedError, match=r"^perceive fold 1/3 diverged at epoch \d+, step \d+: loss is "
                                            r"(nan|inf); lower perceive\.lr \(1e\+30\)$"):
        OOFDynamics(folds=3, epochs=5, batch_size=16, lr=1e30, device="cpu").fit(x, y, 3)
