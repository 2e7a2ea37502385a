"""Reliability: one writer per workspace, crash-clean runs, disk errors as one line (docs/reliability.md)."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dataopt.errors import UserError
from dataopt.io import DiskError, atomic_path, save_npy
from dataopt.lock import WorkspaceBusy, WorkspaceLock

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from dataopt.lock import WorkspaceLock
    with WorkspaceLock(sys.argv[1], "dataopt run --set optimize.ratio=0.5"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold(root: Path, seconds: float) -> subprocess.Popen:
    """A process that holds the workspace lock of ``root`` for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    proc = hold(tmp_path, 30)
    try:
        t0 = time.perf_counter()
        with pytest.raises(WorkspaceBusy) as err, WorkspaceLock(tmp_path, "dataopt run"):
            pass
        assert time.perf_counter() - t0 < 1.0
        msg = str(err.value)
        assert f"pid {proc.pid}" in msg and "dataopt run --set optimize.ratio=0.5" in msg and "since" in msg
        assert "\n" not in msg and isinstance(err.value, UserError)
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_waits_when_told_to(tmp_path):
    proc = hold(tmp_path, 1.0)
    t0 = time.perf_counter()
    with WorkspaceLock(tmp_path, "dataopt stage train", timeout=30) as lock:
        waited = time.perf_counter() - t0
        assert json.loads(lock.info.read_text())["pid"] == os.getpid()
    proc.wait()
    assert 0.3 < waited < 10
    assert not lock.info.exists()  # released: no holder file left behind


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    proc = hold(tmp_path, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with WorkspaceLock(tmp_path, "dataopt run") as lock:
        assert lock.stale_ and lock.stale_["pid"] == proc.pid


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with WorkspaceLock(tmp_path, "outer"), WorkspaceLock(tmp_path, "inner"):
        assert json.loads((tmp_path / ".dataopt" / "lock.json").read_text())["command"] == "outer"


def test_dataopt_stage_refuses_a_busy_workspace_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    proc = hold(tmp_path, 60)
    try:
        run = subprocess.run([sys.executable, "-m", "dataopt.cli", "stage", "ingest", "--project",
                              str(tmp_path)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        proc.kill()
        proc.wait()
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by pid {proc.pid}" in lines[0], run.stderr
    assert not (tmp_path / "artifacts" / "ingest" / "samples.parquet").exists()


# ---------------------------------------------------------------- disk errors

def _tmpfs(path: Path, size: str = "4m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_write_larger_than_the_free_space_is_one_line_and_leaves_no_temp(small_disk):
    with pytest.raises(DiskError, match=r"not enough space in .*disk: this write needs 40\.0 MB"):
        save_npy(small_disk / "big.npy", np.zeros(10_000_000, np.float32))
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_mid_write_is_one_line_and_leaves_no_temp(small_disk):
    with pytest.raises(DiskError, match=r"cannot write .*x\.bin: the disk is full"):
        with atomic_path(small_disk / "x.bin") as tmp:
            with open(tmp, "wb") as f:
                for _ in range(100):
                    f.write(b"\0" * (1 << 20))
    assert list(small_disk.iterdir()) == []


def test_a_memory_map_on_a_full_disk_is_a_message_not_sigbus(small_disk):
    from dataopt.embed.shards import assemble

    src = small_disk.parent / "shards"
    src.mkdir()
    np.save(src / "s0.npy", np.ones((3_000, 512), np.float16))  # 3 MB in shards, 3 MB to assemble
    (small_disk / "fill").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(DiskError):
        assemble([src / "s0.npy"], small_disk / "embeddings.npy", 3_000)
    assert [p.name for p in small_disk.iterdir()] == ["fill"]


def test_a_read_only_folder_is_one_line(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(DiskError, match=r"cannot write .*a\.json: the file system is read-only"):
        with atomic_path(small_disk / "a.json"):
            pass


# ---------------------------------------------------------------- MLflow runs left RUNNING

def test_runs_left_running_by_a_dead_process_are_marked_failed(tmp_path):
    import socket

    from mlflow import MlflowClient

    from tasks.tracking import fail_dead_runs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("dataopt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = client.create_run(exp, tags={"dataopt.pid": str(dead.pid), "dataopt.host": host})
    alive = client.create_run(exp, tags={"dataopt.pid": str(os.getpid()), "dataopt.host": host})
    foreign = client.create_run(exp, tags={"dataopt.pid": str(dead.pid), "dataopt.host": "elsewhere"})
    assert fail_dead_runs(client, exp) == [orphan.info.run_id]
    status = {r: client.get_run(r.info.run_id).info.status for r in (orphan, alive, foreign)}
    assert list(status.values()) == ["FAILED", "RUNNING", "RUNNING"]
    assert "died" in client.get_run(orphan.info.run_id).data.tags["dataopt.failed_reason"]


# ---------------------------------------------------------------- whole runs (slow)

def _digest_data_artifacts(project: Path) -> dict[str, str]:
    from dataopt.artifacts import ARTIFACTS

    out = {}
    for rel, art in ARTIFACTS.items():
        f = project / "artifacts" / rel
        if art.kind == "parquet" or art.kind == "npy":
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif art.kind == "npz":
            with np.load(f) as z:
                out[rel] = hashlib.sha256(b"".join(z[k].tobytes() for k in sorted(z.files))).hexdigest()
    return out


def _uvicorn_children() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"uvicorn" in cmd and b"prefect.server.api.server:create_app" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_artifacts_and_no_leftovers(tmp_path, prefect_server):
    from test_e2e import BIN, make_project, project_env

    reference = make_project(tmp_path / "ref")  # the expected artifacts (the shared server: quicker)
    subprocess.run([str(BIN / "dataopt"), "run"], cwd=reference, capture_output=True, check=True, timeout=600,
                   env={**project_env(reference), "PREFECT_API_URL": prefect_server})
    expected = _digest_data_artifacts(reference)

    project = make_project(tmp_path / "killed")
    env = project_env(project)
    before = set(_uvicorn_children())
    proc = subprocess.Popen([str(BIN / "dataopt"), "run"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(os.getpid()).uniform(8, 20))  # somewhere inside the chain
    proc.kill()
    proc.wait()
    deadline = time.time() + 15  # the temporary Prefect API dies with the run
    while set(_uvicorn_children()) - before and time.time() < deadline:
        time.sleep(0.5)
    assert not set(_uvicorn_children()) - before, "the run's Prefect server outlived it"

    rerun = subprocess.run([str(BIN / "dataopt"), "run"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _digest_data_artifacts(project) == expected
    leftovers = [p for p in (project / "artifacts").rglob(".*") if p.is_file()]
    assert leftovers == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status != "RUNNING" for r in runs)
    assert subprocess.run([str(BIN / "dvc"), "status", "-q"], cwd=project, env=env).returncode == 0
    # the killed run's Prefect flow run was marked Crashed by the rerun, not left RUNNING
    import sqlite3

    db = Path(env["PREFECT_HOME"]) / "prefect.db"
    with sqlite3.connect(db) as con:
        states = [row[0] for row in con.execute("SELECT state_type FROM flow_run")]
    assert states.count("COMPLETED") >= 1 and "RUNNING" not in states, states


@pytest.mark.slow
def test_two_runs_in_one_checkout_never_mix(tmp_path, shared_prefect):
    from test_e2e import BIN, make_project, project_env

    project = make_project(tmp_path / "proj")
    env = project_env(project)
    first = subprocess.Popen([str(BIN / "dataopt"), "run"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = project / ".dataopt" / "lock.json"
    deadline = time.time() + 120
    while not lock_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([str(BIN / "dataopt"), "run", "--set", "optimize.ratio=0.5"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    plan = json.loads((project / "artifacts" / "optimize" / "plan.json").read_text())
    run_info = json.loads((project / "artifacts" / "track" / "run.json").read_text())
    from mlflow import MlflowClient

    runs = [r for r in MlflowClient(tracking_uri=run_info["tracking_uri"]).search_runs([run_info["experiment_id"]])
            if r.data.tags.get("dataopt.kind") != "stage"]  # the pipeline runs, not the stage runs nested in them
    assert len(runs) == 1 and runs[0].data.params["optimize.ratio"] == "1.0"
    assert plan and subprocess.run([str(BIN / "dvc"), "status", "-q"], cwd=project, env=env).returncode == 0


def test_a_failed_dvc_commit_is_a_user_error_with_the_reason():
    from tasks.versioning import StageCache

    class Repo:
        def commit(self, stage, force):
            raise RuntimeError("")

    cache = StageCache.__new__(StageCache)
    cache.root, cache.repo = Path("."), Repo()
    with pytest.raises(UserError, match=r"^dvc commit train failed: RuntimeError$"):
        cache.commit("train")
