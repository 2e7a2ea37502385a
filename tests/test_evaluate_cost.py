"""The evaluate stage's cost ratios (full data, a reference run), many/medium/few-shot accuracy, and
head models evaluated on embeddings."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from dataopt.config import Params, validate
from dataopt.errors import ConfigError, DataError, MissingArtifactError
from dataopt.evaluate.metrics import shot_accuracy, shot_bands
from dataopt.io import save_npy, write_json
from dataopt.paths import Paths
from dataopt.stages import evaluate as evaluate_stage
from dataopt.stages import run_stage
from dataopt.train.checkpoint import save_model
from dataopt.train.head import train_head
from dataopt.train.nets import build_model
from dataopt.train.trainer import train_set_from_plan
from conftest import identity_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
N = 1797  # all digits: ~144 training images per class, so the default bands (20, 100) all fill
# a fixed training history (2 epochs), so that the cost metrics are known numbers
HISTORY = [
    {"epoch": 1, "loss": 1.0, "samples_seen": 500, "steps": 8, "seconds": 1.5, "lr": 0.05},
    {"epoch": 2, "loss": 0.5, "samples_seen": 1000, "steps": 16, "seconds": 3.0, "lr": 0.0},
]


def params(**evaluate) -> Params:
    p = Params()
    return p.model_copy(update={
        "train": p.train.model_copy(update={"mode": "head", "epochs": 8, "batch_size": 64, "device": "cpu"}),
        "evaluate": p.evaluate.model_copy(update={"device": "cpu", **evaluate}),
    })


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_writer) -> Paths:
    """All digits ingested, plus standardised pixels as the embed stage's float16 embeddings."""
    paths = digits_writer(tmp_path_factory.mktemp("cost"), n=N, test_fraction=0.2)
    x = load_digits().data[:N]
    save_npy(paths.stage("embed") / "embeddings.npy",
             ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float16))
    return paths


def samples(paths: Paths) -> pd.DataFrame:
    return pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")


def train_labels(paths: Paths) -> np.ndarray:
    s = samples(paths)
    return s.loc[s["split"] == "train", "label"].to_numpy(np.int64)


def train_saved_head(paths: Paths, keep: np.ndarray | None = None, history: list | None = None,
                     drop: tuple = ()) -> dict:
    """Train a head on the plan ``keep`` through train_head; save it (config keys in ``drop`` left
    out) and a history (``history``, else the real one) as the train stage would."""
    s = samples(paths)
    plan = identity_plan(s, keep)
    ts = train_set_from_plan(s, plan, "plan.parquet")
    emb = np.load(paths.artifacts / "embed" / "embeddings.npy", mmap_mode="r")
    model, real_history, config = train_head(emb, ts, params().train, 0, CPU, progress=False)
    config = {k: v for k, v in config.items() if k not in drop}
    save_model(paths.stage("train") / "model", model, config)
    write_json(paths.stage("train") / "history.json", history or real_history)
    return config


def on_disk_headline(paths: Paths) -> dict:
    return json.loads((paths.artifacts / "evaluate" / "metrics.json").read_text())


def on_disk(paths: Paths) -> dict:
    """Every metric run_stage recorded (stage.json) and the per-class accuracy of report.json."""
    out = json.loads((paths.artifacts / "evaluate" / "stage.json").read_text())["metrics"]
    rows = json.loads((paths.artifacts / "evaluate" / "report.json").read_text())["per_class"]
    return {**out, "per_class_accuracy": {r["class"]: r["accuracy"] for r in rows}}


# ---------------------------------------------------------------- shot bands (pure functions)


def test_shot_bands_follow_the_oltr_convention():
    # few < 20 <= medium <= 100 < many; a class without training images is few
    counts = np.array([0, 19, 20, 100, 101, 500])
    assert shot_bands(counts, (20, 100)).tolist() == ["few", "few", "medium", "medium", "many", "many"]
    acc = np.array([0.0, 0.5, 0.6, 0.8, 0.9, np.nan])  # the last class has no test sample
    out = shot_accuracy(acc, counts, (20, 100))
    assert out["few_shot_accuracy"] == pytest.approx(0.25)
    assert out["medium_shot_accuracy"] == pytest.approx(0.7)
    assert out["many_shot_accuracy"] == pytest.approx(0.9)
    assert (out["n_few"], out["n_medium"], out["n_many"]) == (2, 2, 2)
    # an empty band is None, not NaN; equal class sizes say nothing about bands
    out = shot_accuracy(np.array([0.5, 1.0]), np.array([150, 30]), (20, 100))
    assert out["few_shot_accuracy"] is None and out["n_few"] == 0
    assert shot_accuracy(np.array([0.5, 1.0]), np.array([40, 40])) == {"shot_bands": "balanced"}


# ---------------------------------------------------------------- cost against full data and a reference


def test_reference_ratios(project, tmp_path, monkeypatch):
    config = train_saved_head(project, history=HISTORY)
    ref = {"samples_seen": 10000, "steps": 200, "train_seconds": 4.0, "accuracy": 0.5, "other": "x"}
    write_json(project.root / "ref" / "metrics.json", ref)
    monkeypatch.chdir(tmp_path)  # a relative reference is read from the project root, not the cwd
    flat = run_stage("evaluate", params(reference="ref/metrics.json"), project)

    n_train = len(train_labels(project))
    assert (flat["samples_seen"], flat["steps"], flat["train_seconds"]) == (1000, 16, 3.0)
    assert flat["full_data_samples"] == n_train * 2 and flat["cost_ratio"] == pytest.approx(1000 / (2 * n_train))
    assert config["train"] == {"batch_size": 64, "epochs": 8, "n_train_total": n_train, "n_train_kept": n_train,
                               "mode": "head", "dynamic": {"method": "none", "budget": 1.0}, "adaaugment": False}
    assert flat["full_data_steps"] == math.ceil(n_train / 64) * 8
    assert flat["steps_ratio"] == pytest.approx(16 / flat["full_data_steps"])
    assert (flat["reference_samples_seen"], flat["reference_steps"]) == (10000, 200)
    assert (flat["reference_train_seconds"], flat["reference_accuracy"]) == (4.0, 0.5)
    assert flat["samples_seen_ratio"] == pytest.approx(0.1)
    assert flat["steps_ratio_vs_reference"] == pytest.approx(0.08)
    assert flat["seconds_ratio"] == pytest.approx(0.75)
    assert flat["accuracy_delta"] == pytest.approx(flat["accuracy"] - 0.5)
    saved = on_disk(project)
    for k in ("full_data_steps", "steps_ratio", "samples_seen_ratio", "steps_ratio_vs_reference",
              "seconds_ratio", "accuracy_delta", "cost_ratio"):
        assert saved[k] == pytest.approx(flat[k]), k

    # a headline-only metrics.json (what run_stage writes) is completed from the stage.json beside it
    flat2 = run_stage("evaluate", params(reference=str(project.artifacts / "evaluate" / "metrics.json")),
                      project)
    assert set(evaluate_stage.REFERENCE_KEYS) - set(on_disk_headline(project)), "the headline must lack some keys"
    assert flat2["reference_steps"] == 16 and flat2["reference_train_seconds"] == 3.0
    assert flat2["reference_accuracy"] == pytest.approx(flat["accuracy"])
    assert flat2["samples_seen_ratio"] == 1.0

    # an absolute path works as well; a reference of 0 seconds gives no ratio rather than a crash
    write_json(tmp_path / "abs.json", {**ref, "train_seconds": 0})
    flat = evaluate_stage.run(params(reference=str(tmp_path / "abs.json")), project)
    assert flat["seconds_ratio"] is None and flat["samples_seen_ratio"] == pytest.approx(0.1)


def test_bad_reference_names_the_file_and_the_key(project, tmp_path):
    train_saved_head(project, history=HISTORY)
    missing = tmp_path / "nowhere" / "metrics.json"
    with pytest.raises(DataError, match=r"evaluate\.reference.*nowhere.*does not exist"):
        evaluate_stage.run(params(reference=str(missing)), project)
    (tmp_path / "garbled.json").write_text("{not json")
    with pytest.raises(DataError, match=r"evaluate\.reference.*garbled\.json.*not a readable JSON"):
        evaluate_stage.run(params(reference=str(tmp_path / "garbled.json")), project)
    write_json(tmp_path / "partial.json", {"accuracy": 0.9, "steps": 10})
    with pytest.raises(DataError, match=r"evaluate\.reference.*partial\.json.*samples_seen"):
        evaluate_stage.run(params(reference=str(tmp_path / "partial.json")), project)


def test_no_train_section_no_step_ratio_and_image_models_still_evaluate(project):
    # an image model whose config predates `train` / `class_counts`: steps ratios are left out and
    # shot bands come from the train split of samples.parquet
    model, kwargs = build_model("small_cnn", 0, 10, 3, 8, 8)
    save_model(project.stage("train") / "model", model,
               {"model": "small_cnn", "kwargs": kwargs, "class_names": [str(i) for i in range(10)]})
    write_json(project.stage("train") / "history.json", HISTORY)
    flat = evaluate_stage.run(params(), project)
    assert "full_data_steps" not in flat and "steps_ratio" not in flat and "samples_seen_ratio" not in flat
    counts = np.bincount(train_labels(project), minlength=10)
    assert counts.min() > 100  # every digit is many-shot
    assert (flat["n_many"], flat["n_medium"], flat["n_few"]) == (10, 0, 0)
    assert flat["medium_shot_accuracy"] is None and flat["few_shot_accuracy"] is None
    rows = json.loads((project.artifacts / "evaluate" / "report.json").read_text())["per_class"]
    assert [r["train_count"] for r in rows] == counts.tolist() and {r["shot"] for r in rows} == {"many"}


# ---------------------------------------------------------------- many / medium / few-shot accuracy


def test_shot_bands_on_an_imbalanced_plan(project):
    y = train_labels(project)
    keep = np.ones(len(y), bool)
    rank = np.zeros(len(y), np.int64)  # position of each row within its class
    for c in range(10):
        rank[y == c] = np.arange((y == c).sum())
    keep[(np.isin(y, [7, 8, 9])) & (rank >= 10)] = False  # few: 10 images
    keep[(np.isin(y, [4, 5, 6])) & (rank >= 50)] = False  # medium: 50 images
    config = train_saved_head(project, keep)              # many: 0..3 keep all (~144)
    counts = np.array(config["class_counts"])
    assert counts[7:].tolist() == [10] * 3 and counts[4:7].tolist() == [50] * 3 and counts[:4].min() > 100

    flat = run_stage("evaluate", params(), project)
    assert (flat["n_many"], flat["n_medium"], flat["n_few"]) == (4, 3, 3)
    assert "shot_bands" not in flat
    per_class = on_disk(project)["per_class_accuracy"]
    acc = np.array([per_class[str(c)] for c in range(10)])
    assert flat["many_shot_accuracy"] == pytest.approx(acc[:4].mean())
    assert flat["medium_shot_accuracy"] == pytest.approx(acc[4:7].mean())
    assert flat["few_shot_accuracy"] == pytest.approx(acc[7:].mean())
    for k in ("many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy", "n_few"):
        assert on_disk(project)[k] == pytest.approx(flat[k]), k
    rows = json.loads((project.artifacts / "evaluate" / "report.json").read_text())["per_class"]
    assert [r["shot"] for r in rows] == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3

    # other thresholds move the bands: with (5, 40) the 10-image classes are medium, none is few
    flat = evaluate_stage.run(params(shot_thresholds=(5, 40)), project)
    assert (flat["n_many"], flat["n_medium"], flat["n_few"]) == (7, 3, 0) and flat["few_shot_accuracy"] is None
    with pytest.raises(ConfigError, match="evaluate.shot_thresholds"):
        validate({"evaluate": {"shot_thresholds": [100, 20]}})  # refused when params load, before any stage


def test_balanced_plan_reports_balanced(project):
    y = train_labels(project)
    rank = np.zeros(len(y), np.int64)
    for c in range(10):
        rank[y == c] = np.arange((y == c).sum())
    config = train_saved_head(project, rank < 60)
    assert set(config["class_counts"]) == {60}
    flat = run_stage("evaluate", params(), project)
    assert flat["shot_bands"] == "balanced" and on_disk(project)["shot_bands"] == "balanced"
    assert not any(k.endswith("_shot_accuracy") for k in flat)


# ---------------------------------------------------------------- head models read the embeddings


def test_head_model_is_evaluated_on_embeddings(project, tmp_path):
    train_saved_head(project)
    images = project.artifacts / "ingest" / "images.npy"
    hidden = tmp_path / "images.npy"
    images.rename(hidden)  # a head never reads the images
    try:
        flat = evaluate_stage.run(params(), project)
    finally:
        hidden.rename(images)
    assert flat["accuracy"] > 0.9 and flat["n_test"] == int((samples(project)["split"] == "test").sum())

    emb_path = project.artifacts / "embed" / "embeddings.npy"
    emb = np.load(emb_path)
    try:
        save_npy(emb_path, emb[:, :32])
        with pytest.raises(DataError, match="input dim 64"):
            evaluate_stage.run(params(), project)
        emb_path.unlink()
        with pytest.raises(MissingArtifactError, match="embed"):
            evaluate_stage.run(params(), project)
    finally:
        save_npy(emb_path, emb)


def test_an_image_model_never_opens_the_embeddings(project):
    # embeddings are declared (a head reads them) but an image model must evaluate without them
    from dataopt import artifacts

    model, kwargs = build_model("small_cnn", 0, 10, 3, 8, 8)
    save_model(project.stage("train") / "model", model,
               {"model": "small_cnn", "kwargs": kwargs, "class_names": [str(i) for i in range(10)]})
    write_json(project.stage("train") / "history.json", HISTORY)
    with artifacts.recording() as log:
        run_stage("evaluate", params(), project)
    assert "ingest/images.npy" in log.paths("evaluate", "r")
    assert "embed/embeddings.npy" not in log.paths("evaluate", "r")
