"""MLflow tracking (real store, sqlite in tmp_path): the run spans the pipeline's wall time, and the
trained model is an MLflow pyfunc model that predicts like the evaluate stage and can be registered."""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataopt import stages
from dataopt.config import Params
from dataopt.io import read_json, write_json
from dataopt.paths import Paths
from dataopt.stages import STAGE_FILE, launcher, run_stage
from dataopt.stages import train as train_stage
from test_evaluate import digits_project, params as eval_params, plan_keeping

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def no_model() -> Params:
    p = Params()
    return p.model_copy(update={"tracking": p.tracking.model_copy(update={"log_model": False})})


def sleeping_stages(monkeypatch, seconds: float) -> None:
    """Every stage a module whose run sleeps ``seconds`` (run_stage writes the real records)."""
    def fake(name):
        return types.SimpleNamespace(INPUTS=(), OUTPUTS=(), PARAMS=(),
                                     run=lambda p, paths, **h: time.sleep(seconds) or {"n": 1})
    monkeypatch.setattr(stages, "module", fake)


def span(info) -> tuple[float, float]:
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"])
    return run.info.start_time / 1000, run.info.end_time / 1000


def test_run_spans_the_stages_of_this_execution(tmp_path, monkeypatch):
    from tasks.tracking import log_run, pipeline_start

    paths = Paths.at(tmp_path)
    sleeping_stages(monkeypatch, 0.15)
    before = time.time()
    for name in stages.ORDER:
        run_stage(name, Params(), paths)
    records = {n: read_json(paths.artifacts / n / STAGE_FILE) for n in stages.ORDER}
    assert all(r["launcher"] == launcher() and r["ended_at"] >= r["started_at"] for r in records.values())
    summed = sum(r["metrics"]["seconds"] for r in records.values())
    assert summed >= 7 * 0.15
    # metrics.json keeps only the headline (here: seconds), stage.json everything the stage returned
    assert read_json(paths.artifacts / "train" / "metrics.json") == {"seconds": records["train"]["metrics"]["seconds"]}
    assert records["train"]["metrics"]["n"] == 1

    start, end = span(log_run(no_model(), paths))
    assert start == pytest.approx(records["ingest"]["started_at"], abs=0.002)
    assert before - 0.002 <= start and end - start >= summed
    assert pipeline_start(paths) == records["ingest"]["started_at"]

    # a stage of an earlier execution (another launcher, as DVC leaves a skipped stage) is not counted
    old = {**records["ingest"], "launcher": "1@1", "started_at": before - 3600}
    write_json(paths.artifacts / "ingest" / STAGE_FILE, old)
    assert pipeline_start(paths) == records["embed"]["started_at"]
    # the flow says which stages ran; a start it passes wins
    assert pipeline_start(paths, {"train": "ran", "evaluate": "ran", "ingest": "cached"}) == \
        records["train"]["started_at"]
    assert pipeline_start(paths, {n: "cached" for n in stages.ORDER}) is None
    start, end = span(log_run(no_model(), paths, started_at=before - 60))
    assert start == pytest.approx(before - 60, abs=0.002) and end >= time.time() - 5

    # nothing ran in this execution: the run is the logging itself
    for name in stages.ORDER:
        write_json(paths.artifacts / name / STAGE_FILE, {**records[name], "launcher": "1@1"})
    t0 = time.time()
    info = log_run(no_model(), paths)
    start, end = span(info)
    assert t0 - 0.002 <= start <= end
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"]).data.tags[
        "dataopt.run_start"] == "track"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on digits and evaluated through run_stage (metrics, stage.json, report)."""
    paths = digits_project(tmp_path_factory.mktemp("tracked"))
    plan_keeping(paths)
    p = eval_params()
    train_stage.run(p, paths)
    metrics = run_stage("evaluate", p, paths)
    return paths, p, metrics


def test_model_is_a_registrable_pyfunc_model_predicting_like_evaluate(trained):
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking import log_run

    paths, p, evaluated = trained
    t0 = time.perf_counter()
    info = log_run(p, paths)
    seconds = time.perf_counter() - t0
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert len(run.outputs.model_outputs) == 1  # the run's Models column
    model_id = run.outputs.model_outputs[0].model_id
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == info["run_id"] and logged.name == "model"
    assert run.data.tags["dataopt.model_uri"] == f"models:/{model_id}"
    assert run.data.metrics["track.log_model_seconds"] < seconds < 60
    assert run.data.metrics["evaluate.accuracy"] == pytest.approx(evaluated["accuracy"])
    assert run.data.metrics["evaluate.per_class_accuracy.d3"] >= 0.0

    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    test = (s["split"] == "test").to_numpy()
    images = np.load(paths.artifacts / "ingest" / "images.npy")[test]
    y = s.loc[test, "label"].to_numpy()
    mlflow.set_tracking_uri(info["tracking_uri"])
    try:
        # the logged files: the safetensors and config, the model's source; no pickle anywhere
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
        files = {f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file()}
        assert {"artifacts/model/model.safetensors", "artifacts/model/config.json", "MLmodel"} <= files
        assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
        assert any(f.endswith("mlflow_model.py") for f in files), files

        for uri in (f"runs:/{info['run_id']}/model", f"models:/{model_id}"):
            model = mlflow.pyfunc.load_model(uri)
            probs = model.predict(images)
            assert probs.shape == (len(y), 10)
            assert (probs.argmax(1) == y).mean() == pytest.approx(evaluated["accuracy"])
        version = mlflow.register_model(f"runs:/{info['run_id']}/model", "dataopt-digits")
        assert int(version.version) == 1
        client.set_registered_model_alias("dataopt-digits", "champion", version.version)
        champion = mlflow.pyfunc.load_model("models:/dataopt-digits@champion")
        assert (champion.predict(images[:20]).argmax(1) == probs[:20].argmax(1)).all()
    finally:
        mlflow.set_tracking_uri(None)
    print(f"log_run with the model: {seconds:.2f} s")


def test_head_model_is_logged_with_its_embedder_and_predicts_from_images(tmp_path):
    """A head (train.mode head) scores images like the evaluate stage: the registry compares champion and
    challenger on the same images even when each retrain refitted the embedder."""
    import mlflow

    from tasks.tracking import log_run

    paths = digits_project(tmp_path)
    plan_keeping(paths)
    p = eval_params()
    p = p.model_copy(update={"train": p.train.model_copy(update={"mode": "head", "epochs": 3})})
    run_stage("embed", p, paths)
    run_stage("train", p, paths)
    evaluated = run_stage("evaluate", p, paths)
    info = log_run(p, paths)
    s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
    test = (s["split"] == "test").to_numpy()
    images = np.load(paths.artifacts / "ingest" / "images.npy")[test]
    mlflow.set_tracking_uri(info["tracking_uri"])
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{info['run_id']}/model")
        probs = model.predict(images)
        assert (probs.argmax(1) == s.loc[test, "label"].to_numpy()).mean() == pytest.approx(evaluated["accuracy"])
        emb = np.load(paths.artifacts / "embed" / "embeddings.npy")[test].astype(np.float32)
        np.testing.assert_allclose(model.predict(emb), probs, atol=1e-6)
    finally:
        mlflow.set_tracking_uri(None)
