"""Prefect tasks and flow (caching, retries, output checks) and MLflow tracking (real, no mocks)."""
import json
import os
import subprocess
import sys
import textwrap
import time
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


def _with(params: Params, section: str, **values) -> Params:
    return params.model_copy(update={section: getattr(params, section).model_copy(update=values)})


def test_a_stage_differs_only_when_its_own_params_sections_differ():
    from tasks.versioning import differs

    base = Params()
    assert not any(differs(n, base, base) for n in stages.ORDER)
    epochs = _with(base, "train", epochs=1)
    assert [n for n in stages.ORDER if differs(n, epochs, base)] == ["train"]
    seeded = base.model_copy(update={"seed": 7})
    assert [n for n in stages.ORDER if differs(n, seeded, base)] == [
        n for n in stages.ORDER if n != "evaluate"]  # evaluate's outputs do not depend on the seed
    assert all(differs(n, base, None) for n in stages.ORDER)  # no params.yaml: nothing to compare


class FakeCache:
    """DVC's answers by stage (None: up to date) and the stages committed to dvc.lock."""

    def __init__(self, stale: dict):
        self.answers, self.committed = stale, []

    def stale(self, name):
        return self.answers.get(name)

    def commit(self, name):
        self.committed.append(name)


def test_a_stage_plan_runs_what_is_stale_forced_or_overridden_and_records_only_the_projects_params():
    from tasks.versioning import StagePlan

    base = Params()

    def walk(plan):
        out = {}
        for n in stages.ALL:
            d = plan.decide(n, beside=n not in stages.ORDER)
            out[n] = (d.status, d.reason)
            if d.run:
                plan.ran(n)
        return out

    cache = FakeCache({"train": "changed deps: plan.parquet modified", "evaluate": "not in dvc.lock",
                       "drift": "changed deps: data modified"})
    got = walk(StagePlan(cache, base, base))
    assert got["optimize"] == ("cached", "dvc.lock up to date")
    assert got["train"] == ("run", "changed deps: plan.parquet modified")
    assert got["drift"] == ("run", "changed deps: data modified")  # beside the chain: stale, recorded
    assert cache.committed == ["train", "evaluate", "drift"]

    cache = FakeCache({})  # an override of train's params: train and what follows run, nothing recorded
    plan = StagePlan(cache, _with(base, "train", epochs=1), base)
    got = walk(plan)
    assert [n for n, (s, _) in got.items() if s == "run"] == ["train"] and plan.tainted
    assert got["train"] == ("run", "params differ from params.yaml") and got["drift"][0] == "skipped"
    assert cache.committed == []

    got = walk(StagePlan(FakeCache({}), base, base, force="--no-cache"))
    assert all(got[n] == ("run", "--no-cache") for n in stages.ORDER) and got["drift"][0] == "cached"
    got = walk(StagePlan(None, base, base))  # outside a DVC project: the chain runs, nothing beside it
    assert all(got[n] == ("run", "no DVC project") for n in stages.ORDER)
    assert got["drift"] == ("skipped", "no DVC project")


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
    now = time.time()
    ran = {"status": "ran", "why": "changed deps: artifacts/optimize/plan.parquet modified",
           "started_at": now - 3, "ended_at": now - 1.5, "metrics": {"samples_seen": 100, "seconds": 1.5}}
    cached = {"status": "cached", "why": "dvc.lock up to date", "started_at": now - 1.5, "ended_at": now - 1.4,
              "metrics": {"accuracy": 0.93, "per_class_accuracy": {"0": 0.9}, "ece": float("nan")}}
    info = log_run(p, paths, overrides=["train.epochs=1"], stages={"train": ran, "evaluate": cached})

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

    # each stage of the execution is a run nested under it, spanning the stage's own time
    assert d.tags["dataopt.stage.train"] == "ran" and d.tags["dataopt.stage.evaluate"] == "cached"
    nested = {r.info.run_name: r for r in client.search_runs(
        [info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['run_id']}'")}
    assert set(nested) == {"train", "evaluate"}
    for name, rec in (("train", ran), ("evaluate", cached)):
        r = nested[name]
        assert r.info.status == "FINISHED" and r.data.tags["dataopt.kind"] == "stage"
        assert r.data.tags["dataopt.stage"] == name and r.data.tags["dataopt.stage_status"] == rec["status"]
        assert r.data.tags["dataopt.stage_reason"] == rec["why"]
        assert r.info.start_time == int(rec["started_at"] * 1000) and r.info.end_time == int(rec["ended_at"] * 1000)
    assert nested["train"].data.metrics == {"samples_seen": 100, "seconds": 1.5}
    assert nested["evaluate"].data.metrics == {"accuracy": pytest.approx(0.93)}  # headline, finite only

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
        mod = types.SimpleNamespace()
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
def test_flow_outside_dvc_runs_everything_and_retries_only_transient_errors(tmp_path):
    """Outside a DVC project there is no cache (DVC is the one cache) and the summary says so; a
    UserError fails at once, a transient error is retried. Caching itself: tests/test_e2e.py."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(
        "seed: 0\ntracking:\n  enabled: false\norchestration:\n  retries: 1\n"
        "  retry_delay_seconds: 0\n")
    (tmp_path / "driver.py").write_text(DRIVER)
    steps = [
        {},                                   # 1: everything runs
        {},                                   # 2: again: no DVC project, so no cache
        {"set": ["seed=2"], "fail": "user"},  # 3: a UserError fails at once, not retried
        {"set": ["seed=3"], "fail": "transient"},  # 4: a transient error is retried
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(project),
                           json.dumps(steps)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    r = json.loads(line[len("RESULTS "):])
    order = list(stages.ORDER)

    assert set(r[0]["status"].values()) == {"ran"} and r[0]["calls"] == order
    assert "not a DVC project" in r[0]["dvc"] and "every stage runs" in r[0]["dvc"]
    assert r[1]["calls"] == order
    assert r[2]["error"] == "DataError" and "row 3" in r[2]["message"]
    assert r[2]["calls"] == ["ingest", "embed", "perceive"]
    assert r[3]["calls"].count("perceive") == 2 and r[3]["status"]["perceive"] == "ran"
    assert not (project / ".prefect" / "results").exists()  # no second cache
