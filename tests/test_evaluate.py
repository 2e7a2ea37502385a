"""Evaluation metrics against hand and scikit-learn computations, and the evaluate stage end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss
from sklearn.model_selection import train_test_split

from dataopt.config import Params
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.evaluate import metrics as M
from dataopt.io import save_npy, write_parquet
from dataopt.paths import Paths
from dataopt.schema import PLAN_COLUMNS, SAMPLES_COLUMNS
from dataopt.stages import evaluate as evaluate_stage
from dataopt.stages import HEADLINE, run_stage
from dataopt.stages import train as train_stage
from conftest import identity_plan


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- metrics (pure functions)


def test_ece_hand_computed():
    # confidences 0.9 (right) | 0.75 (wrong), 0.65 (right) | 0.5 (right), in 5 bins of width 0.2:
    # bin (0.8, 1]: acc 1, conf 0.9 -> gap 0.1, n 1; bin (0.6, 0.8]: acc 0.5, conf 0.7 -> gap 0.2, n 2;
    # bin (0.4, 0.6]: acc 1, conf 0.5 -> gap 0.5, n 1.  ECE = (0.1 + 2 * 0.2 + 0.5) / 4 = 0.25
    probs = np.array([[0.9, 0.1, 0.0], [0.75, 0.25, 0.0], [0.35, 0.65, 0.0], [0.5, 0.3, 0.2]])
    y = np.array([0, 1, 1, 0])
    assert M.ece(probs, y, n_bins=5) == pytest.approx(0.25)
    r = M.reliability(probs, y, n_bins=5)
    assert r["count"].tolist() == [0, 0, 1, 2, 1]
    assert r["accuracy"][3] == pytest.approx(0.5) and r["confidence"][3] == pytest.approx(0.7)
    assert np.isnan(r["accuracy"][0]) and r["upper"][-1] == 1.0
    # a perfectly calibrated, fully confident model has no calibration error
    assert M.ece(np.eye(3), np.arange(3)) == 0.0


def test_ece_bin_edges_are_right_closed():
    # 0.5 falls in (0, 0.5], not (0.5, 1]: with 2 bins its gap is |0 - 0.5| on its own
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    r = M.reliability(probs, np.array([1, 0]), n_bins=2)
    assert r["count"].tolist() == [1, 1]
    assert M.ece(probs, np.array([1, 0]), n_bins=2) == pytest.approx(0.25)


def test_nll_hand_and_sklearn():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
    y = np.array([0, 2, 2])
    assert M.nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3)
    assert M.nll(probs, y) == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]))
    assert math.isfinite(M.nll(np.array([[1.0, 0.0]]), np.array([1])))  # log(0) guarded


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_confusion_based_scores_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    y[y == 4] = 3  # class 4 absent from y_true ...
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))  # ... but predicted
    cm = M.confusion_matrix(y, pred, 6)  # class 5: neither true nor predicted
    assert cm.sum() == 300 and cm[4].sum() == 0 and cm[:, 5].sum() == 0
    assert M.balanced_accuracy(cm) == pytest.approx(balanced_accuracy_score(y, pred))
    assert M.macro_f1(cm) == pytest.approx(f1_score(y, pred, average="macro"))
    acc = M.per_class_accuracy(cm)
    assert np.isnan(acc[4]) and np.isnan(acc[5])
    assert acc[0] == pytest.approx((pred[y == 0] == 0).mean())


def test_classification_report_keys():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    rep = M.classification_report(probs, np.array([0, 1, 1]), n_bins=4)
    assert rep["accuracy"] == pytest.approx(2 / 3) and rep["n"] == 3
    assert rep["balanced_accuracy"] == pytest.approx(0.75)
    assert rep["confusion"].tolist() == [[1, 0], [1, 1]]


# ---------------------------------------------------------------- the stage on digits


def digits_project(root) -> Paths:
    """samples.parquet + images.npy of scikit-learn digits (uint8 RGB 8x8, stratified 80/20 split)."""
    d = load_digits()
    n = len(d.target)
    images = np.repeat(np.round(d.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    _, test_idx = train_test_split(np.arange(n), test_size=0.2, stratify=d.target, random_state=0)
    split = np.full(n, "train", dtype=object)
    split[test_idx] = "test"
    text = np.array([str(i) for i in range(n)])
    cols = {
        "sample_id": np.arange(n, dtype=np.int64), "split": split.astype(str), "label": d.target.astype(np.int64),
        "label_name": np.array([f"d{v}" for v in d.target]), "label_clean": d.target.astype(np.int64),
        "source": text, "source_id": text, "orig_height": np.full(n, 8), "orig_width": np.full(n, 8),
        "orig_mode": np.full(n, "L"), "note": np.full(n, ""), "content_hash": text,
        "duplicate_of": pa.nulls(n, pa.int64()),
        "batch": np.full(n, "reference"),
    }
    paths = Paths.at(root)
    write_parquet(paths.stage("ingest") / "samples.parquet", pa.table({k: cols[k] for k in SAMPLES_COLUMNS}))
    save_npy(paths.stage("ingest") / "images.npy", images)
    return paths


def plan_keeping(paths: Paths, keep: np.ndarray | None = None) -> None:
    plan = identity_plan(pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet"), keep)
    write_parquet(paths.stage("optimize") / "plan.parquet", plan[list(PLAN_COLUMNS)])


EPOCHS = 6


def params(**evaluate) -> Params:
    p = Params()
    return p.model_copy(update={
        "train": p.train.model_copy(update={"epochs": EPOCHS, "batch_size": 64, "width": 16, "device": "cpu"}),
        "evaluate": p.evaluate.model_copy(update={"device": "cpu", "batch_size": 100, **evaluate}),
    })


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Train on a random half of the training rows, then evaluate through run_stage."""
    paths = digits_project(tmp_path_factory.mktemp("eval"))
    n_train = int((pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")["split"] == "train").sum())
    keep = np.zeros(n_train, bool)
    keep[np.random.default_rng(0).permutation(n_train)[: n_train // 2]] = True
    plan_keeping(paths, keep)
    train_stage.run(params(), paths)
    return paths, run_stage("evaluate", params(), paths), n_train



def test_metrics_and_cost_of_half_the_data(evaluated):
    paths, flat, n_train = evaluated
    assert all(not isinstance(v, (dict, list)) for v in flat.values())
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll", "n_test", "samples_seen",
              "steps", "train_seconds", "full_data_samples", "cost_ratio"):
        assert k in flat, k
    assert flat["accuracy"] >= 0.85  # half the data, a few epochs
    assert 0 <= flat["ece"] <= 1 and flat["nll"] > 0
    assert flat["n_test"] == 360
    assert flat["full_data_samples"] == n_train * EPOCHS
    assert flat["samples_seen"] == (n_train // 2) * EPOCHS
    assert flat["cost_ratio"] == pytest.approx(0.5, abs=0.01)

    # metrics.json holds the headline scalars only (dvc exp show columns); stage.json all of them
    on_disk = json.loads((paths.artifacts / "evaluate" / "metrics.json").read_text())
    assert set(on_disk) == set(HEADLINE["evaluate"])
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll", "cost_ratio", "samples_seen"):
        assert on_disk[k] == pytest.approx(flat[k]), k
    stage = json.loads((paths.artifacts / "evaluate" / "stage.json").read_text())
    assert stage["metrics"] == json.loads(json.dumps(flat))
    assert stage["started_at"] <= stage["ended_at"] and stage["stage"] == "evaluate"
    rows = json.loads((paths.artifacts / "evaluate" / "report.json").read_text())["per_class"]
    per_class = {r["class"]: r["accuracy"] for r in rows}
    assert list(per_class) == [f"d{i}" for i in range(10)]
    # balanced accuracy is the mean of the per-class accuracies (every class has test samples)
    assert np.mean(list(per_class.values())) == pytest.approx(flat["balanced_accuracy"])


def test_plots_written(evaluated):
    paths = evaluated[0]
    plots = paths.artifacts / "evaluate" / "plots"
    assert {p.name for p in plots.iterdir()} == {
        "confusion_matrix.png", "per_class_accuracy.png", "reliability.png", "training_curve.png"}
    for f in plots.iterdir():
        png = f.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, f.name
    report = json.loads((paths.artifacts / "evaluate" / "report.json").read_text())
    rows = report["per_class"]
    assert [r["class"] for r in rows] == [f"d{i}" for i in range(10)]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert np.asarray(report["confusion"]).sum() == 360
    rel = report["reliability"]
    assert len(rel) == Params().evaluate.ece_bins
    assert sum(r["count"] for r in rel) == 360


def test_metrics_match_sklearn_on_the_saved_model(evaluated):
    from dataopt.train import loop
    from dataopt.train.checkpoint import load_model

    paths, flat, _ = evaluated
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    test = (s["split"] == "test").to_numpy()
    y = s.loc[test, "label"].to_numpy()
    model, _ = load_model(paths.artifacts / "train" / "model")
    x = loop.images_to_tensor(np.load(paths.artifacts / "ingest" / "images.npy")[test], torch.device("cpu"))
    probs = torch.softmax(loop.predict_logits(model, x).double(), 1).numpy()
    pred = probs.argmax(1)
    assert flat["accuracy"] == pytest.approx((pred == y).mean())
    assert flat["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert flat["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert flat["nll"] == pytest.approx(log_loss(y, probs, labels=list(range(10))), rel=1e-6)


def test_batch_held_out_rows_are_scored_apart_from_the_headline(evaluated, tmp_path):
    """Rows of batches held out (split "holdout") get holdout_accuracy.<batch>; the headline stays the
    test rows'."""
    import shutil

    from dataopt.train import loop
    from dataopt.train.checkpoint import load_model

    src, flat, _ = evaluated
    paths = Paths.at(tmp_path)
    shutil.copytree(src.artifacts, paths.artifacts)
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    unseen = s.index[s["split"] == "train"][~pd.read_parquet(paths.artifacts / "optimize" / "plan.parquet")["keep"]]
    s.loc[unseen, "split"] = "holdout"  # rows the model never trained on, as two batches
    s.loc[unseen, "batch"] = np.where(np.arange(len(unseen)) % 3 == 0, "b1", "b2")
    write_parquet(paths.artifacts / "ingest" / "samples.parquet", pa.Table.from_pandas(s, preserve_index=False))
    out = evaluate_stage.run(params(), paths)
    assert out["accuracy"] == flat["accuracy"] and out["n_test"] == flat["n_test"]
    model, _ = load_model(paths.artifacts / "train" / "model")
    images = np.load(paths.artifacts / "ingest" / "images.npy")
    for b in ("b1", "b2"):
        rows = ((s["split"] == "holdout") & (s["batch"] == b)).to_numpy()
        pred = loop.predict_logits(model, loop.images_to_tensor(images[rows], torch.device("cpu"))).argmax(1)
        assert out[f"n_holdout.{b}"] == rows.sum() > 100
        assert out[f"holdout_accuracy.{b}"] == pytest.approx((pred.numpy() == s["label"].to_numpy()[rows]).mean())
    assert "holdout_accuracy.b1" not in flat  # no held-out rows, no such key


def test_dropped_class_shows_in_per_class_accuracy(tmp_path):
    paths = digits_project(tmp_path)
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    y = s.loc[s["split"] == "train", "label"].to_numpy()
    plan_keeping(paths, y != 5)
    train_stage.run(params(), paths)
    evaluate_stage.run(params(), paths)
    rows = json.loads((paths.artifacts / "evaluate" / "report.json").read_text())["per_class"]
    per_class = {r["class"]: r["accuracy"] for r in rows}
    assert per_class["d5"] <= 0.05
    assert min(v for k, v in per_class.items() if k != "d5") >= 0.7


def test_missing_model_and_missing_test_split(tmp_path):
    paths = digits_project(tmp_path)
    with pytest.raises(MissingArtifactError, match=r"artifacts/train/\S+ is missing: run the 'train' stage"):
        evaluate_stage.run(params(), paths)
    plan_keeping(paths)
    train_stage.run(params(), paths)
    (paths.artifacts / "train" / "model" / "model.safetensors").unlink()
    with pytest.raises(MissingArtifactError, match="model.safetensors"):
        evaluate_stage.run(params(), paths)
    train_stage.run(params(), paths)
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet").assign(split="train")
    write_parquet(paths.artifacts / "ingest" / "samples.parquet", s)
    with pytest.raises(DataError, match="no row with split 'test'"):
        evaluate_stage.run(params(), paths)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_names_the_key(evaluated):
    with pytest.raises(ConfigError, match="evaluate.device"):
        evaluate_stage.run(params(device="cuda"), evaluated[0])
