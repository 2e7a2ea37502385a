"""The ``dataopt`` command: help, exit codes and messages, and the library's import hygiene."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataopt import cli
from dataopt.stages import ORDER

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "dataopt"


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [[], ["run"], ["stage"], ["track"], ["ui"], ["models"]])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(command + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "dataopt" in out


def test_unknown_stage_exit_2(project, capsys):
    code, out, err = _run(["stage", "trian", "--project", str(project)], capsys)
    assert code == 2
    assert err.startswith("dataopt: error: unknown stage 'trian'; valid: ingest, embed")
    assert "Traceback" not in err


def test_missing_params_file_exit_2(tmp_path, capsys):
    code, _, err = _run(["stage", "ingest", "--project", str(tmp_path)], capsys)
    assert code == 2
    assert "params file not found" in err and str(tmp_path) in err


def test_missing_project_folder_exit_2(tmp_path, capsys):
    code, _, err = _run(["run", "--project", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert "project folder not found" in err


@pytest.mark.parametrize("override, expected", [
    ("trainepochs", "must look like section.key=value"),
    ("train.epochs=many", "train.epochs"),
    ("trian.epochs=3", "trian: unknown section; valid: seed, ingest"),
    ("train.epoch=3", "train.epoch: unknown key; valid: "),
    ("optimize.method=nope", "'nope'; valid: "),
])
def test_bad_params_exit_2_before_anything_runs(project, capsys, override, expected):
    for command in (["run"], ["stage", "ingest"], ["track"]):
        code, _, err = _run(command + ["--project", str(project), "--set", override], capsys)
        assert code == 2, (command, err)
        assert err.startswith("dataopt: error: ") and expected in err, err
        assert "Traceback" not in err
    assert not (project / "artifacts").exists()  # nothing ran
    assert not (project / ".prefect").exists()


def test_bad_params_file_exit_2(project, capsys):
    (project / "params.yaml").write_text("train:\n  epochs: [1\n")
    code, _, err = _run(["stage", "ingest", "--project", str(project)], capsys)
    assert code == 2 and "not valid YAML" in err


def test_missing_input_artifact_exit_2(project, capsys):
    code, _, err = _run(["stage", "train", "--project", str(project)], capsys)
    assert code == 2
    assert "is missing: run the" in err and "dataopt stage" in err
    assert "Traceback" not in err


def test_params_option_points_at_another_file(project, capsys, tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text("train:\n  epochs: -1\n")
    code, _, err = _run(["stage", "ingest", "--project", str(project), "--params", str(other)],
                        capsys)
    assert code == 2 and "train.epochs" in err


def test_track_with_tracking_disabled_writes_run_json(project, capsys):
    code, out, _ = _run(["track", "--project", str(project), "--set", "tracking.enabled=false"],
                        capsys)
    assert code == 0
    assert "tracking.enabled is false" in out
    info = json.loads((project / "artifacts" / "track" / "run.json").read_text())
    assert info["run_id"] is None and info["enabled"] is False


def test_summary_text_reports_each_stage(tmp_path):
    summary = {
        "stages": {n: {"status": "cached" if i % 2 else "ran", "seconds": 1.5, "metrics": {}}
                   for i, n in enumerate(ORDER)},
        "tracking": {"run_id": "abc", "tracking_uri": "sqlite:///x.db"},
        "dvc": "dvc.lock updated",
    }
    summary["stages"]["evaluate"]["metrics"] = {"accuracy": 0.95, "cost_ratio": 0.5}
    text = cli.summary_text(summary, tmp_path)
    for n in ORDER:
        assert n in text
    assert "cached" in text and "ran" in text
    assert "test accuracy: 0.9500" in text and "cost ratio" in text and "0.5000" in text
    assert "abc" in text and "dataopt ui" in text and "dvc metrics show" in text


def test_entry_point_exit_code_and_no_traceback(project):
    """The installed console script: a user error is one line on stderr and exit code 2."""
    exe = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "dataopt.cli"]
    proc = subprocess.run(exe + ["stage", "embed", "--project", str(project)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dataopt: error: "), proc.stderr
    assert "samples.parquet is missing" in lines[0]


def test_library_and_cli_do_not_import_orchestration():
    mods = ", ".join(f"'dataopt.stages.{n}'" for n in ORDER)
    code = (
        "import importlib, sys\n"
        "import dataopt, dataopt.cli, dataopt.config, dataopt.registry\n"
        f"for m in [{mods}]: importlib.import_module(m)\n"
        "import dataopt.plugins\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'dvc', "
        "'prefect_dask'))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"library imported: {proc.stdout.strip()}"


def test_ui_serves_the_project_store_on_localhost(project, monkeypatch, capsys):
    """``dataopt ui`` replaces itself with ``mlflow ui`` on 127.0.0.1 for the project's store."""
    seen = {}

    def fake_execv(exe, argv):
        seen["argv"] = argv
        raise SystemExit(0)

    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        cli.main(["ui", "--project", str(project), "--port", "5099"])
    argv = seen["argv"]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{project / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5099"
    assert "http://127.0.0.1:5099" in capsys.readouterr().out


def _stderr_lines(text: str) -> list[str]:
    """stderr without the progress bar (tqdm redraws its line with carriage returns)."""
    parts = text.replace("\r", "\n").splitlines()
    return [ln for ln in parts if ln.strip() and not ln.startswith("train")]


@pytest.mark.slow  # two subprocesses that import torch: ~14 s each on 2 busy cores
@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "dataopt: interrupted"),
                                             (signal.SIGTERM, 143, "dataopt: terminated")])
def test_a_signal_during_training_stops_at_once_with_one_line(tmp_path, sig, code, line):
    """Ctrl-C used to print a 37-line traceback (exit 1), SIGTERM to die without a word."""
    from conftest import identity_plan, write_digits_ingested
    import pandas as pd

    from dataopt.io import write_parquet

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    paths = write_digits_ingested(tmp_path, n=300)
    samples = pd.read_parquet(paths.stage("ingest") / "samples.parquet")
    write_parquet(paths.stage("optimize") / "plan.parquet", identity_plan(samples))
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataopt.cli", "stage", "train", "--project", str(tmp_path),
             "--set", "train.epochs=1000", "--set", "train.width=8", "--set", "train.device=cpu"],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)},
            # a shell without job control starts background jobs with SIGINT ignored, and the child
            # inherits it (pytest run as `cmd &`): give the child the default disposition a terminal has
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while "train:" not in err_file.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, err_file.read_text()
                time.sleep(0.1)
            time.sleep(0.5)  # inside the training loop
            t0 = time.monotonic()
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == code
            assert time.monotonic() - t0 < 5
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err_file.read_text()
    assert "Traceback" not in text
    lines = _stderr_lines(text)
    assert lines[-1] == line and len(lines) <= 3, text
    assert not (paths.artifacts / "train" / "model").exists()  # nothing half-written


def test_data_warnings_are_one_line(capsys):
    import warnings

    from dataopt.errors import DataWarning

    with cli._signals_and_warnings():
        warnings.warn("optimize: the plan keeps 1 sample(s) for 10 classes", DataWarning)
    assert capsys.readouterr().err == "dataopt: warning: optimize: the plan keeps 1 sample(s) for 10 classes\n"


def test_a_signal_another_handler_owns_still_stops_worker_threads():
    """Prefect's flow engine swaps in its own SIGTERM handler and then waits for the running task;
    the command still sees the signal (wakeup fd) and asks the training loop to stop."""
    from dataopt import interrupt

    seen = []
    with cli._signals_and_warnings():
        previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("other handler"))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not interrupt.requested() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            signal.signal(signal.SIGTERM, previous)
    assert seen == ["other handler"] and interrupt.requested()
    interrupt.clear()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handlers are gone after it
