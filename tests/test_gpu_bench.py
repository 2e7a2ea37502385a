"""bench/gpu.sh: the toy run (every section at tiny size on the CPU) writes every section's JSON with
status ok, a failing or hanging section does not stop the others, and missing data or GPU is one line,
exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["clip", "knn", "patches", "airbench", "selection"]


def gpu_sh(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env}
    return subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def sections(out: Path) -> dict:
    return json.loads((out / "gpu_summary.json").read_text())["sections"]


@pytest.mark.slow  # ~35 s on 2 idle cores: five Python processes, each importing torch
def test_toy_run_writes_every_section_with_status_ok(tmp_path):
    proc = gpu_sh("--toy", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = sections(tmp_path)
    assert list(summary) == SECTIONS
    for name, entry in summary.items():
        assert (entry["status"], entry["exit_code"], entry["json"]) == ("ok", 0, f"{name}.json"), name
    got = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in SECTIONS}
    clip = got["clip"]["clip"]
    assert clip["weights"].startswith("random") and clip["end_to_end"]["images"] == 256
    assert clip["model_only"]["images_per_s"] > 0 and clip["ratio"] > 0
    assert [(c["n"], c["d"]) for c in got["knn"]["knn"]] == [(8000, 64)]
    assert got["patches"]["n"] == 256 and len(got["patches"]["oof_accuracy_per_epoch"]) == 1
    items = got["airbench"]["timing_recipe_items"]
    assert set(items) == {"fp16", "alternating_flip", "whiten_bias_3_epochs", "all_three"}
    assert items["all_three"]["recipe"] == {"precision": "fp16", "flip": "alternating", "whiten_bias_epochs": 3}
    cells = got["selection"]["dynamic"]["clean"]
    assert {f"{m}@{b}" for m in ("random", "infobatch", "density_consistency") for b in (0.3, 0.5, 0.7)} <= set(cells)


FAKE_PYTHON = """#!/usr/bin/env bash
# every section faked: clip fails, knn hangs, patches exits 0 writing nothing, the dynamic.py runs write {}
case "$*" in
  *bench/embed.py*--skip-knn*) exit 3 ;;
  *bench/embed.py*) exec sleep 30 ;;
  *bench/patches.py*) exit 0 ;;
  *bench/dynamic.py*) echo '{}' > "${@: -1}"; exit 0 ;;
  *) exec REAL "$@" ;;
esac
"""


def test_a_failing_or_hanging_section_does_not_stop_the_others(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("REAL", sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = gpu_sh("--toy", "--out", str(out), PYTHON=str(fake), GPU_BENCH_CAP_S="2", timeout=60)
    assert proc.returncode == 1  # not every section ok
    summary = sections(out)
    assert {name: (s["status"], s["exit_code"]) for name, s in summary.items()} == {
        "clip": ("failed", 3), "knn": ("timed out", 124), "patches": ("failed", 0),
        "airbench": ("ok", 0), "selection": ("ok", 0)}
    assert summary["knn"]["seconds"] < 10 and summary["patches"]["json"] is None


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    for args, env in ((["--data", str(tmp_path / "nowhere")], {}), ([], {"GPU_BENCH_DATA": str(tmp_path)})):
        proc = gpu_sh(*args, "--out", str(tmp_path / "out"), timeout=30, **env)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bench/gpu.sh: error: no CIFAR-10 under")
        assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (ROOT.parent / "shared" / "datasets" / "cifar10" / "test.parquet").exists(),
                    reason="needs ../shared/datasets")
def test_no_gpu_is_one_line_and_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = gpu_sh("--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "torch sees no CUDA GPU" in proc.stderr
