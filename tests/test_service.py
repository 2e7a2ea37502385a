"""The continuous loop as a service: the deployments `dataopt serve` serves, and the flows watch ->
check_drift -> retrain on the built-in digits with the three demo batches dropped into the landing
folder, including a retrain killed midway."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dataopt.config import Params


def test_deployments_follow_the_schedule_section(tmp_path):
    from flows.serve import deployments

    params = Params.model_validate({"schedule": {"watch_interval": 30, "full_retrain_cron": "0 3 * * 0"}})
    deps = {d.name: d for d in deployments(params, tmp_path)}
    assert set(deps) == {"watch", "check-drift", "retrain"}
    assert all(d.parameters == {"project": str(tmp_path)} for d in deps.values())
    assert all(d.concurrency_limit == 1 for d in deps.values())  # one run of each at a time
    (watch,), (full,) = deps["watch"].schedules, deps["retrain"].schedules
    assert watch.schedule.interval.total_seconds() == 30
    assert full.schedule.cron == "0 3 * * 0"
    assert not deps["check-drift"].schedules
    assert not {d.name: d for d in deployments(Params(), tmp_path)}["retrain"].schedules


def _flow(project: Path, env: dict, code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_dropped_demo_batches_become_the_expected_decisions(tmp_path, shared_prefect):
    from dataopt import loop
    from dataopt.demo import demo_batch
    from dataopt.ingest.add import remove_batch_files
    from dataopt.paths import Paths
    from tasks import registry

    from test_e2e import BIN, ROOT, make_project, project_env

    project = make_project(tmp_path / "proj")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    text = (project / "params.yaml").read_text().replace("  epochs: 15", "  epochs: 6")  # quicker, comments kept
    (project / "params.yaml").write_text(text)
    env = {**project_env(project), "PYTHONPATH": str(ROOT)}
    paths = Paths.at(project)

    def sh(*cmd):
        proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.stdout

    sh(str(BIN / "dataopt"), "run")  # the reference, and the first champion
    incoming = project / raw["schedule"]["incoming"]
    incoming.mkdir(parents=True)
    for kind in ("clean", "corrupted", "noisy-labels"):  # the sender writes the marker last
        demo_batch(kind, incoming / f"{kind}.parquet")
        (incoming / f"{kind}.parquet.ready").touch()
        time.sleep(0.05)
    out = sh(sys.executable, "-c", "import json; from flows.watch import watch; print('RESULT', json.dumps(watch(project='.')))")
    result = json.loads(out.split("RESULT", 1)[1])
    assert result["added"] == ["clean", "corrupted", "noisy-labels"] and not result["refused"]
    checks = {c["batch"]: c for c in result["checks"]}
    assert checks["clean"]["drift"] is False and checks["clean"]["retrain"] is None
    assert checks["corrupted"]["drift"] is True and checks["corrupted"]["retrain"] is not None
    assert checks["noisy-labels"]["drift"] is True
    noisy = checks["noisy-labels"]["retrain"]
    assert "rows kept" in noisy["curation"]["noisy-labels"]  # the decision says what curation did
    # beside the frozen-set rule: champion and challenger on each new batch's held-out rows (its own labels)
    for retrained in (checks["corrupted"]["retrain"], noisy):
        held = retrained["numbers"]["batch_holdout"]
        assert set(held) == set(retrained["new_batches"]), held
        for b, v in held.items():
            assert 60 <= v["n"] <= 100, (b, v)  # 0.2 of each class of 400 rows
            assert 0 <= v["champion_accuracy"] <= 1 and 0 <= v["challenger_accuracy"] <= 1, (b, v)
    assert "noisy-labels" in noisy["numbers"]["batch_holdout"]
    uri = f"sqlite:///{project / 'mlflow.db'}"
    champion = registry.champion(uri, "dataopt")
    events = [d["event"] for d in loop.decisions(paths)]
    assert events.count("batch_accepted") == 3 and events.count("drift_checked") == 3
    assert "promoted" in events  # the baseline, at least
    # the noisy-label batch never makes the champion worse on the frozen evaluation set
    assert noisy["promoted"] is False or noisy["numbers"]["delta"] >= 0, noisy
    if not noisy["promoted"]:
        assert "noisy-labels" not in yaml.safe_load((project / "params.yaml").read_text())["ingest"]["batches"]
    assert champion is not None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tags = client.get_model_version("dataopt", str(noisy["version"])).tags
    assert json.loads(tags["dataopt.batch_holdout"]) == noisy["numbers"]["batch_holdout"]
    logged = [d for d in loop.decisions(paths, ["promoted", "rejected"]) if d.get("version") == noisy["version"]]
    assert logged[-1]["numbers"]["batch_holdout"] == noisy["numbers"]["batch_holdout"]
    parents = client.search_runs(["1"], "tags.`dataopt.kind` = 'check_drift'")
    assert len(parents) == 3  # one MLflow parent run per check_drift flow run, the checks nested
    nested = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert nested and all(r.info.status == "FINISHED" for r in parents + nested)
    assert sorted(p.name for p in (incoming / ".done").iterdir())[0].endswith("clean.parquet")
    status = sh(str(BIN / "dvc"), "status")
    assert "up to date" in status, status

    # a retrain killed midway: the next flow restores params.yaml, dvc.lock and the artifacts
    before = {f: (project / f).read_text() for f in ("params.yaml", "dvc.lock")}
    proc = _flow(project, env, "from flows.retrain import retrain; retrain(project='.', reason='test')",
                 start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (project / ".dataopt" / "retrain.json").exists():
        time.sleep(0.2)
    time.sleep(3)  # into the curate flow
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (project / ".dataopt" / "retrain.json").exists()
    sh(sys.executable, "-c", "from flows.check_drift import check_drift; check_drift(project='.', retrain=False)")
    assert {f: (project / f).read_text() for f in before} == before
    assert registry.champion(uri, "dataopt") == champion
    assert "retrain_recovered" in [d["event"] for d in loop.decisions(paths)]
    assert "up to date" in sh(str(BIN / "dvc"), "status")
    for folder in (project / "data" / "batches").glob("*"):
        remove_batch_files(folder)
