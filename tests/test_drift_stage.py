"""The drift stage and `dataopt drift` on the built-in digits with the ready demo batches: a corrupted
batch is flagged (and the image statistics say how), a clean one is not, a noisy-label batch is flagged
by label-quality drift; the check is recorded in MLflow and leaves `dvc status` clean."""
from __future__ import annotations

import json
import subprocess

import pytest

from dataopt.config import Params
from dataopt.demo import DEMO_COLUMNS, demo_batch
from dataopt.ingest.add import add_batch, remove_batch_files
from dataopt.paths import Paths
from dataopt.stages import run_stage


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    paths = Paths.at(tmp_path_factory.mktemp("drift"))
    params = Params()
    for name in ("ingest", "embed"):
        run_stage(name, params, paths)
    yield paths, params
    for folder in (paths.data / "batches").glob("*"):
        remove_batch_files(folder)


def _check(paths, params, kind):
    add_batch(paths, demo_batch(kind, paths.root / f"{kind}.parquet"), kind, params.ingest, 0, DEMO_COLUMNS)
    metrics = run_stage("drift", params, paths)
    return metrics, json.loads((paths.artifacts / "drift" / "drift.json").read_text())


def test_no_batch_gives_no_verdict(tmp_path):
    paths, params = Paths.at(tmp_path), Params()
    for name in ("ingest", "embed"):
        run_stage(name, params, paths)
    assert run_stage("drift", params, paths)["n_batch"] == 0
    report = json.loads((paths.artifacts / "drift" / "drift.json").read_text())
    assert report["batch"] is None and report["verdict"]["drift"] is None


def test_demo_batches_get_the_right_verdicts(reference):
    paths, params = reference
    metrics, rep = _check(paths, params, "corrupted")
    assert metrics["drift"] == 1 and rep["verdict"]["drift"]
    decided = rep["verdict"]["decided"]
    assert decided["mmd"] and decided["classifier"] and decided["image_stats"]
    assert "contrast" in rep["tests"]["image_stats"]["why"] or "sharpness" in rep["tests"]["image_stats"]["why"]
    assert len(rep["top_new"]) > 0 and rep["n_reference"] == 359  # the held-out split: unseen by the PCA
    assert rep["reference_rows"].startswith("held-out")
    for png in ("projection.png", "class_shift.png", "p_values.png", "new_looking.png"):
        assert (paths.artifacts / "drift" / "plots" / png).stat().st_size > 1000

    metrics, rep = _check(paths, params, "clean")
    assert metrics["drift"] == 0 and not any(rep["verdict"]["decided"].values()), rep["verdict"]["why"]

    metrics, rep = _check(paths, params, "noisy-labels")
    assert rep["verdict"]["decided"]["label_quality"]
    lq = rep["tests"]["label_quality"]["breakdown"]
    assert lq["batch_rate"] - lq["reference_rate"] > 0.2  # 30 % of the labels flipped
    assert not rep["verdict"]["decided"]["classifier"]  # the images are the reference's


@pytest.mark.slow
def test_dataopt_drift_command_records_and_keeps_dvc_clean(tmp_path):
    from mlflow import MlflowClient

    from test_e2e import BIN, make_project, project_env

    project = make_project(tmp_path / "proj")
    env = project_env(project)

    def sh(*cmd, code=0):
        proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == code, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout

    sh(str(BIN / "dataopt"), "batch", "add", "--demo", "corrupted")
    assert "d751713988987e9331980363e24189ce" not in (project / "data.dvc").read_text()  # no longer empty
    out = sh(str(BIN / "dataopt"), "drift")
    assert "batch 'demo-corrupted'" in out and ": DRIFT" in out and "image_stats: drift" in out
    status = sh(str(BIN / "dvc"), "status", "ingest", "embed", "drift", "data.dvc")
    assert "up to date" in status, status
    runs = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").search_runs(
        experiment_ids=["1"], filter_string="tags.`dataopt.batch` = 'demo-corrupted'")
    assert len(runs) == 1 and runs[0].data.tags["dataopt.drift"] == "true"
    assert runs[0].data.metrics["drift.verdict"] == 1.0
    # checked again with the same params: DVC says it is up to date, no second MLflow run
    out = sh(str(BIN / "dataopt"), "drift")
    assert "already checked" in out
    for folder in (project / "data" / "batches").glob("*"):
        remove_batch_files(folder)
