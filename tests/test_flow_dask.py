"""Scale-out: the embed stage's shards through Prefect's task runner (threads, and a Dask cluster)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dataopt.config import validate
from dataopt.io import load_npy, read_json
from dataopt.paths import Paths
from dataopt.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import json, sys
    from dataopt.config import validate
    from dataopt.paths import Paths
    from flows.curate import task_runner
    from prefect import flow
    from tasks.stages import stage_task

    project, runner, address = sys.argv[1], sys.argv[2], sys.argv[3]
    raw = json.loads(sys.argv[4])
    raw["orchestration"] = {"task_runner": runner, "dask_address": address or None, "cache": False}
    params = validate(raw)

    @flow(name="embed-only")
    def embed_only():
        return stage_task("embed", params).submit(
            "embed", params, project).result()

    embed_only.with_options(task_runner=task_runner(params))()
    print("OK")
""")


def _embed_through_flow(project: Path, raw: dict, runner: str, address: str = "") -> None:
    env = {**os.environ, "PREFECT_HOME": str(project.parent / f"prefect-home-{runner}"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    driver = project.parent / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), str(project), runner, address,
                           json.dumps(raw)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture
def ingested(tmp_path):
    raw = {"embed": {"backend": "pixels", "shard_size": 200, "kwargs": {"dim": 32}}}
    project = tmp_path / "proj"
    project.mkdir()
    run_stage("ingest", validate(raw), Paths.at(project))
    return project, raw


def _local_reference(project: Path, raw: dict) -> np.ndarray:
    run_stage("embed", validate(raw), Paths.at(project))
    return load_npy(project / "artifacts" / "embed" / "embeddings.npy", mmap=False)


@pytest.mark.slow
def test_embed_shards_as_prefect_tasks_on_threads(ingested):
    project, raw = ingested
    reference = _local_reference(project, raw)
    _embed_through_flow(project, raw, "threads")
    got = load_npy(project / "artifacts" / "embed" / "embeddings.npy", mmap=False)
    assert np.array_equal(got, reference)
    meta = read_json(project / "artifacts" / "embed" / "meta.json")
    assert meta["shards"]["n"] == meta["shards"]["computed"] == 9  # 1,797 rows / 200


@pytest.mark.slow
def test_embed_on_a_two_worker_dask_cluster_equals_the_local_run(ingested):
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    project, raw = ingested
    reference = _local_reference(project, raw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        _embed_through_flow(project, raw, "dask", cluster.scheduler_address)
    got = load_npy(project / "artifacts" / "embed" / "embeddings.npy", mmap=False)
    assert np.array_equal(got, reference)
    shards = read_json(project / "artifacts" / "embed" / "meta.json")["shards"]
    assert shards["computed"] == 9
    assert len(shards["workers"]) == 2  # the shards were spread over both Dask workers
