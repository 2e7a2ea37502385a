"""End to end: ``dataopt run`` on the built-in dataset in a fresh git+DVC project copy.

Asserts every artifact of the contract, the test accuracy, the MLflow run (params, metrics, model,
dataset input), that a second run reuses every stage from the cache and is faster, and that DVC then
has nothing to reproduce (the flow ran ``dvc commit``).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataopt.config import load_params
from dataopt.artifacts import ARTIFACTS
from dataopt.stages import ALL, ORDER

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(dst: Path) -> Path:
    """A project like a fresh clone: params, dvc.yaml, data/, the code DVC depends on; git + dvc."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore", "data.dvc"):
        shutil.copy(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dataopt", "tasks"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    env = project_env(dst)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=dst, check=True, env=env)
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    # data/ is git-ignored (data.dvc versions it): like a fresh clone, the copy has none until a
    # dataopt command creates it (README: `dataopt run`, or here `dataopt batch list`)
    subprocess.run([str(BIN / "dataopt"), "batch", "list"], cwd=dst, check=True, env=env, capture_output=True)
    return dst


def project_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # dvc.yaml runs `dataopt stage ...`
        "PREFECT_HOME": str(project.parent / "prefect-home"),  # hermetic Prefect state
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    })
    return env


def dataopt_run(project: Path, *args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "dataopt"), "run", *args], cwd=project, capture_output=True,
                          text=True, env=project_env(project), timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout, seconds


def statuses(stdout: str) -> dict[str, str]:
    rows = re.findall(r"^\s+(\w+)\s+(ran|cached)\s+[\d.]+$", stdout, flags=re.M)
    return dict(rows)


@pytest.mark.slow
def test_dataopt_run_end_to_end(tmp_path, shared_prefect):
    project = make_project(tmp_path / "proj")

    out1, t1 = dataopt_run(project)
    assert statuses(out1) == {n: "ran" for n in ORDER}, out1
    for rel, art in ARTIFACTS.items():  # the chain's (drift runs beside it, with `dataopt drift`)
        assert (project / "artifacts" / rel).exists() or art.stage not in ORDER, f"{rel} missing"
    metrics = json.loads((project / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.90
    assert "test accuracy:" in out1 and "dataopt ui" in out1 and "dvc metrics show" in out1

    run_info = json.loads((project / "artifacts" / "track" / "run.json").read_text())
    assert run_info["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "dataopt"
    assert run.data.params["train.epochs"] == str(load_params(project / "params.yaml").train.epochs)
    assert run.data.params["tracking.experiment"] == "dataopt"
    assert run.data.metrics["evaluate.accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.tags["dataopt.entry_point"] == "prefect"
    (model,) = run.outputs.model_outputs  # the trained model as an MLflow model (Models column)
    assert client.get_logged_model(model.model_id).source_run_id == run.info.run_id
    # the run spans the pipeline: from the first stage's start to after the last stage
    records = [json.loads((project / "artifacts" / n / "stage.json").read_text()) for n in ORDER]
    assert run.info.start_time / 1000 <= min(r["started_at"] for r in records)
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(r["metrics"]["seconds"] for r in records)
    assert len(run.inputs.dataset_inputs) == 1
    # one run per stage nested under it, spanning the stage's own time, with its headline metrics
    nested = stage_runs(client, run)
    assert {n: r.data.tags["dataopt.stage_status"] for n, r in nested.items()} == {
        n: "ran" for n in ALL}
    for n in ORDER:
        duration = (nested[n].info.end_time - nested[n].info.start_time) / 1000
        assert duration > 0 and duration >= records[ORDER.index(n)]["metrics"]["seconds"] - 0.002, n
    assert nested["evaluate"].data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert "artifacts/ingest/samples.parquet deleted" in nested["ingest"].data.tags["dataopt.stage_reason"]

    out2, t2 = dataopt_run(project)
    assert statuses(out2) == {n: "cached" for n in ORDER}, out2
    assert t2 < t1, (t1, t2)
    run2 = json.loads((project / "artifacts" / "track" / "run.json").read_text())["run_id"]
    assert run2 != run_info["run_id"]  # one MLflow run per execution, cached or not
    nested = stage_runs(client, client.get_run(run2))
    assert {n: r.data.tags["dataopt.stage_status"] for n, r in nested.items()} == {
        n: "cached" for n in ALL}
    assert nested["ingest"].data.tags["dataopt.stage_reason"] == "dvc.lock up to date"
    assert nested["evaluate"].data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])

    # the flow recorded the outputs in dvc.lock: DVC has nothing to do
    proc = subprocess.run([str(BIN / "dvc"), "status", "-q"], cwd=project, capture_output=True,
                          text=True, env=project_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(BIN / "dvc"), "repro", "--dry"], cwd=project, capture_output=True,
                          text=True, env=project_env(project))
    assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout

    # DVC is the one cache: a deleted output reruns its stage (and what reads it) and nothing else
    (project / "artifacts" / "train" / "history.json").unlink()
    out3, _ = dataopt_run(project)
    s3 = statuses(out3)
    assert s3["train"] == s3["evaluate"] == "ran", out3
    assert {n for n, v in s3.items() if v == "cached"} == set(ORDER[:5]), out3
    assert dvc_clean(project)

    # an override reruns its stage and what follows, and is not recorded in dvc.lock ...
    out4, _ = dataopt_run(project, "--set", "train.epochs=1")
    s4 = statuses(out4)
    assert s4["train"] == s4["evaluate"] == "ran" and s4["optimize"] == "cached", out4
    assert "not recorded in dvc.lock" in out4 and not dvc_clean(project)
    # ... so the next plain run puts back what params.yaml says, and DVC agrees again
    out5, _ = dataopt_run(project)
    assert statuses(out5)["train"] == "ran" and dvc_clean(project), out5


def stage_runs(client, run) -> dict:
    """The stage runs nested under pipeline run ``run``, by stage name."""
    nested = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert all(r.data.tags["dataopt.kind"] == "stage" and r.info.status == "FINISHED" for r in nested)
    return {r.info.run_name: r for r in nested}


def dvc_clean(project: Path) -> bool:
    proc = subprocess.run([str(BIN / "dvc"), "status", "-q"], cwd=project, capture_output=True,
                          text=True, env=project_env(project))
    return proc.returncode == 0


@pytest.mark.slow
def test_dataopt_run_with_a_local_openclip_checkpoint(tmp_path, tiny_openclip_checkpoint, shared_prefect):
    # the command: dataopt run --set embed.backend=open_clip --set embed.pretrained=<ckpt>,
    # offline, on the CPU, with a tiny randomly initialised OpenCLIP model saved by the test
    name, config_path, checkpoint = tiny_openclip_checkpoint
    project = make_project(tmp_path / "proj")
    out, _ = dataopt_run(
        project, "--set", "embed.backend=open_clip", "--set", f"embed.model={name}",
        "--set", f"embed.kwargs.model_config={config_path}", "--set", f"embed.pretrained={checkpoint}",
        "--set", "train.epochs=3", "--set", "perceive.epochs=3", "--set", "perceive.early_epochs=2")
    assert statuses(out) == {n: "ran" for n in ORDER}, out
    meta = json.loads((project / "artifacts" / "embed" / "meta.json").read_text())
    assert meta["backend"] == "open_clip" and meta["model"] == name and meta["text_embeddings"]
    assert meta["pretrained"] and meta["checkpoint_sha256"] and meta["device"] == "cpu"
    import numpy as np

    emb = np.load(project / "artifacts" / "embed" / "embeddings.npy", mmap_mode="r")
    text = np.load(project / "artifacts" / "embed" / "text_embeddings.npy")
    assert emb.dtype == np.float16 and text.shape == (10, emb.shape[1])
    corpus = json.loads((project / "artifacts" / "perceive" / "corpus.json").read_text())
    assert corpus["semantic_consistency_source"].startswith("text")  # image-text cosine was used
    assert "not recorded in dvc.lock" in out  # dvc.lock is not updated for a one-off run
    assert "Updating lock file" not in out  # DVC's own chatter stays out of the summary
