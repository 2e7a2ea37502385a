"""Prefect tasks and flow (caching, retries, output checks) and MLflow tracking (real, no mocks)."""
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataopt import stages
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.io import file_digest, write_json, write_parquet
from dataopt.paths import Paths
from tasks import stages as tstages

ROOT = Path(__file__).resolve().parents[1]


def _fake_module(inputs, outputs, params):
    return types.SimpleNamespace(INPUTS=inputs, OUTPUTS=outputs, PARAMS=params,
                                 run=lambda p, paths, **hooks: {})


@pytest.fixture
def fake_embed(monkeypatch):
    mod = _fake_module(("ingest/samples.parquet",), ("embed/embeddings.npy",), ("seed", "embed"))
    monkeypatch.setattr(stages, "module", lambda name: mod)
    return mod


def test_cache_key_follows_params_inputs_and_nothing_else(tmp_path, fake_embed):
    paths = Paths.at(tmp_path)
    write_json(paths.stage("ingest") / "samples.parquet", {"a": 1})  # content is all that counts
    p = Params()
    k0 = tstages.cache_key("embed", p, paths)
    assert k0 == tstages.cache_key("embed", p, paths)
    assert k0.startswith("embed-")
    # an unrelated section does not change the key; the stage's own section and seed do
    assert tstages.cache_key("embed", p.model_copy(update={"train": p.train.model_copy(
        update={"epochs": 1})}), paths) == k0
    assert tstages.cache_key("embed", p.model_copy(update={"embed": p.embed.model_copy(
        update={"knn_k": 3})}), paths) != k0
    assert tstages.cache_key("embed", p.model_copy(update={"seed": 7}), paths) != k0
    # a new input content changes the key; rewriting the same content does not
    write_json(paths.stage("ingest") / "samples.parquet", {"a": 2})
    k1 = tstages.cache_key("embed", p, paths)
    assert k1 != k0
    write_json(paths.stage("ingest") / "samples.parquet", {"a": 1})
    assert tstages.cache_key("embed", p, paths) == k0


def test_ingest_key_follows_the_raw_source(tmp_path, monkeypatch):
    mod = _fake_module((), ("ingest/samples.parquet",), ("seed", "ingest"))
    monkeypatch.setattr(stages, "module", lambda name: mod)
    paths = Paths.at(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("x\n1\n")
    p = Params().model_copy(update={"ingest": Params().ingest.model_copy(update={"path": "data"})})
    k0 = tstages.cache_key("ingest", p, paths)
    (tmp_path / "data" / "b.csv").write_text("x\n2\n")
    assert tstages.cache_key("ingest", p, paths) != k0


def test_digest_of_files_and_directories(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert tstages.digest(f) == file_digest(f)
    assert tstages.digest(tmp_path / "missing") is None
    d = tmp_path / "model"
    d.mkdir()
    (d / "w.safetensors").write_bytes(b"1")
    d0 = tstages.digest(d)
    (d / "w.safetensors").write_bytes(b"2")
    assert tstages.digest(d) != d0
    # the (path, size, mtime) cache survives a new process through digests.json
    tstages.save_digest_cache(tmp_path)
    rows = json.loads((tmp_path / ".prefect" / "digests.json").read_text())
    assert [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, file_digest(f)] in rows


def test_outputs_match_detects_deleted_and_changed_outputs(tmp_path, fake_embed):
    paths = Paths.at(tmp_path)
    out = paths.stage("embed") / "embeddings.npy"
    out.write_bytes(b"emb")
    write_json(paths.stage("embed") / "metrics.json", {"seconds": 1})
    result = {"metrics": {}, "outputs": tstages.output_digests("embed", paths)}
    assert set(result["outputs"]) == {"embed/embeddings.npy", "embed/metrics.json"}
    assert tstages.outputs_match("embed", paths, result)
    out.write_bytes(b"changed")
    assert not tstages.outputs_match("embed", paths, result)
    out.unlink()
    assert not tstages.outputs_match("embed", paths, result)


def test_user_errors_are_not_retried():
    from prefect.states import Failed

    assert tstages.is_transient(None, None, Failed(data=RuntimeError("disk hiccup")))
    assert not tstages.is_transient(None, None, Failed(data=DataError("bad rows")))


def test_dask_runner_without_prefect_dask_is_a_user_error(monkeypatch):
    from dataopt.errors import UserError
    from flows.curate import task_runner

    p = Params().model_copy(update={"orchestration": Params().orchestration.model_copy(
        update={"task_runner": "dask"})})
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'dataopt\[dask\]'"):
        task_runner(p)
    assert type(task_runner(Params())).__name__ == "ThreadPoolTaskRunner"


# ---------------------------------------------------------------- MLflow (real store, tmp sqlite)

def _fake_artifacts(paths: Paths) -> None:
    write_parquet(paths.stage("ingest") / "samples.parquet",
                  pd.DataFrame({"sample_id": np.arange(5, dtype=np.int64), "label": [0, 1, 0, 1, 0]}))
    write_json(paths.stage("ingest") / "report.json", {"n": 5})
    write_json(paths.stage("ingest") / "metrics.json", {"samples": 5, "source": "digits"})
    write_json(paths.stage("train") / "metrics.json", {"samples_seen": 100, "seconds": 1.5})
    write_json(paths.stage("train") / "history.json", [{"epoch": 1, "loss": 0.5}])
    (paths.stage("train") / "model").mkdir()
    (paths.stage("train") / "model" / "model.safetensors").write_bytes(b"weights")
    write_json(paths.stage("train") / "model" / "config.json", {"model": "small_cnn"})
    write_json(paths.stage("evaluate") / "metrics.json",
               {"accuracy": 0.93, "cost_ratio": 0.5, "per_class_accuracy": {"0": 0.9, "1": 0.96},
                "ece": float("nan"), "flag": True})
    (paths.stage("evaluate") / "plots").mkdir()
    write_json(paths.stage("evaluate") / "plots" / "per_class.json", [{"class": "0", "accuracy": 1}])


def test_tracking_logs_one_complete_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks.tracking import log_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    paths = Paths.at(tmp_path)
    _fake_artifacts(paths)
    long = "x" * 800
    p = Params().model_copy(update={"tracking": Params().tracking.model_copy(
        update={"experiment": long[:20]}), "ingest": Params().ingest.model_copy(
        update={"classes": [long]})})
    info = log_run(p, paths, overrides=["train.epochs=1"])

    assert info["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert json.loads((tmp_path / "artifacts" / "track" / "run.json").read_text()) == info
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    exp = client.get_experiment(info["experiment_id"])
    assert exp.name == long[:20]
    assert exp.artifact_location == (tmp_path / "mlruns").as_uri()
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    d = run.data
    assert d.params["train.epochs"] == str(p.train.epochs)
    assert d.params["ingest.noise.kind"] == "none"
    assert len(d.params["ingest.classes"]) <= 500
    assert d.metrics["evaluate.accuracy"] == pytest.approx(0.93)
    assert d.metrics["evaluate.cost_ratio"] == pytest.approx(0.5)
    assert d.metrics["evaluate.per_class_accuracy.1"] == pytest.approx(0.96)
    assert d.metrics["train.samples_seen"] == 100
    assert "evaluate.ece" not in d.metrics and "evaluate.flag" not in d.metrics
    assert "ingest.source" not in d.metrics
    assert d.tags["dataopt.entry_point"] == "dvc-exp"
    assert d.tags["dataopt.dvc_exp"] == "exp-abc"
    assert d.tags["dataopt.overrides"] == "train.epochs=1"
    (out,) = run.outputs.model_outputs  # the model folder, logged as an MLflow model
    assert client.get_logged_model(out.model_id).name == "model"  # (tests/test_tracking.py loads one)
    assert {f.path for f in client.list_artifacts(info["run_id"], "plots/evaluate")} == {
        "plots/evaluate/per_class.json"}
    reports = {f.path for f in client.list_artifacts(info["run_id"], "reports/train")}
    assert "reports/train/history.json" in reports
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    sha = file_digest(tmp_path / "artifacts" / "ingest" / "samples.parquet")
    assert inputs[0].dataset.digest == sha[:32]
    assert {t.key: t.value for t in inputs[0].tags}["sha256"] == sha

    # a second call is a second run in the same experiment
    info2 = log_run(p, paths)
    assert info2["run_id"] != info["run_id"] and info2["experiment_id"] == info["experiment_id"]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from tasks.tracking import tracking_uri

    paths = Paths.at(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(Params(), paths) == "sqlite:///env.db"
    p = Params().model_copy(update={"tracking": Params().tracking.model_copy(
        update={"tracking_uri": "sqlite:///cfg.db"})})
    assert tracking_uri(p, paths) == "sqlite:///cfg.db"


# ------------------------------------------------- the flow itself, with fake stages, in a subprocess

DRIVER = textwrap.dedent('''
    import json, os, sys, types
    import dataopt.stages as st
    from dataopt.io import write_json
    from dataopt.errors import DataError
    calls = []
    def make(name, prev):
        mod = types.SimpleNamespace(INPUTS=(f"{prev}/out.json",) if prev else (),
                                    OUTPUTS=(f"{name}/out.json",), PARAMS=("seed",))
        def run(params, paths, **hooks):
            calls.append(name)
            fail = os.environ.get("FAIL")
            if name == "perceive" and fail == "user":
                raise DataError("perceive: bad data in row 3")
            if name == "perceive" and fail == "transient" and calls.count(name) == 1:
                raise RuntimeError("flaky")
            write_json(paths.stage(name) / "out.json", {"seed": params.seed})
            if name == "evaluate":
                write_json(paths.stage(name) / "metrics.json", {"accuracy": 0.9})
            return {"value": 1.0}
        mod.run = run
        return mod
    mods, prev = {}, None
    for n in st.ORDER:
        mods[n], prev = make(n, prev), n
    st.module = lambda n: mods[n]
    from flows.curate import run
    project = sys.argv[1]
    results = []
    for step in json.loads(sys.argv[2]):
        calls.clear()
        if step.get("delete"):
            os.remove(os.path.join(project, "artifacts", step["delete"]))
        os.environ["FAIL"] = step.get("fail", "")
        try:
            s = run(os.path.join(project, "params.yaml"), step.get("set", []), project,
                    no_cache=step.get("no_cache", False))
            results.append({"status": {k: v["status"] for k, v in s["stages"].items()},
                            "calls": list(calls), "dvc": s["dvc"]})
        except Exception as e:
            results.append({"error": type(e).__name__, "message": str(e), "calls": list(calls)})
    print("RESULTS " + json.dumps(results))
''')


@pytest.mark.slow
def test_flow_caches_verifies_outputs_and_retries(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(
        "seed: 0\ntracking:\n  enabled: false\norchestration:\n  retries: 1\n"
        "  retry_delay_seconds: 0\n")
    (tmp_path / "driver.py").write_text(DRIVER)
    steps = [
        {},                                   # 1: everything runs
        {},                                   # 2: everything cached
        {"delete": "train/out.json"},         # 3: train's output deleted: train reruns
        {"no_cache": True},                   # 4: --no-cache: everything runs
        {"set": ["seed=1"]},                  # 5: new params: everything runs, no dvc commit
        {"set": ["seed=2"], "fail": "user"},  # 6: a UserError fails at once, not retried
        {"set": ["seed=3"], "fail": "transient"},  # 7: a transient error is retried
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(project),
                           json.dumps(steps)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    r = json.loads(line[len("RESULTS "):])
    order = list(stages.ORDER)

    assert set(r[0]["status"].values()) == {"ran"} and r[0]["calls"] == order
    assert "not a DVC project" in r[0]["dvc"]
    assert set(r[1]["status"].values()) == {"cached"} and r[1]["calls"] == []
    assert r[2]["calls"] == ["train"]
    assert r[2]["status"]["train"] == "ran" and r[2]["status"]["evaluate"] == "cached"
    assert r[3]["calls"] == order and set(r[3]["status"].values()) == {"ran"}
    assert r[4]["calls"] == order and "dvc.lock not updated" in r[4]["dvc"]
    assert r[5]["error"] == "DataError" and "row 3" in r[5]["message"]
    assert r[5]["calls"] == ["ingest", "embed", "perceive"]
    assert r[6]["calls"].count("perceive") == 2 and r[6]["status"]["perceive"] == "ran"
    assert (project / ".prefect" / "results").is_dir()
