"""Every stage reads only what dataopt/artifacts.py declares, and writes everything it declares.

Three nets, so that a contract drift cannot hide: (1) the readers and writers enforce the declaration
while a stage runs (``ContractError``); (2) every file a stage opens, through any Python API, is recorded
by an audit hook and checked against the declaration; (3) each stage runs again in a project holding
only its declared inputs and must produce the same data, which catches a read the hooks cannot see (a
C++ reader such as pyarrow's) or one skipped because its file was missing.
"""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dataopt import artifacts
from dataopt.artifacts import ARTIFACTS, ContractError, SCRATCH
from dataopt.config import Params
from dataopt.paths import Paths
from dataopt.stages import ALL, run_stage
from dataopt.demo import DEMO_COLUMNS, demo_batch
from dataopt.ingest.add import add_batch

_OPENED: list[str] = []
_AUDIT = {"on": False}


def _audit(event, args):
    if _AUDIT["on"] and event == "open" and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # cannot be removed; records only while _AUDIT["on"]


def traced_run(name: str, params: Params, paths: Paths):
    """Run one stage; return (locate events, files opened under artifacts/ relative to it)."""
    _OPENED.clear()
    _AUDIT["on"] = True
    try:
        with artifacts.recording() as log:
            run_stage(name, params, paths)
    finally:
        _AUDIT["on"] = False
    root = str(paths.artifacts) + "/"
    opened = {p[len(root):] for p in map(str, _OPENED) if p.startswith(root)}
    return log, opened


_TEMP = artifacts.TEMP_FILE


def _artifact_of(rel: str) -> str | None:
    """The declared artifact (or scratch folder) a file under artifacts/ belongs to (its atomic temp
    file counts as the file)."""
    folder, _, base = rel.rpartition("/")
    temp = _TEMP.match(base)
    if temp:
        rel = f"{folder}/{temp.group(1)}"
    for path in list(ARTIFACTS) + list(SCRATCH):
        if rel == path or rel.startswith(path + "/"):
            return path
    return None


def violations(name: str, paths: Paths, log, opened: set[str]) -> list[str]:
    own, reads = set(artifacts.outputs(name)), set(artifacts.inputs(name))
    found = []
    for rel in sorted(log.paths(name, "r") | opened):
        art = _artifact_of(rel)
        if art is None:
            found.append(f"{name} opens {rel}, which is no declared artifact")
        elif art not in own | reads and art not in SCRATCH:
            found.append(f"{name} reads {art}, which it does not declare")
    for art in sorted(own):
        if not (paths.artifacts / art).exists():
            found.append(f"{name} declares {art} but never writes it")
    for f in sorted(p for p in (paths.artifacts / name).rglob("*") if p.is_file()):
        rel = f.relative_to(paths.artifacts).as_posix()
        if _artifact_of(rel) is None:
            found.append(f"{name} writes {rel}, which is no declared artifact")
    return found


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    paths = Paths.at(tmp_path_factory.mktemp("contract"))
    params = Params()
    traces = {}
    for name in ALL:
        if name == "drift":  # a batch to check: the drift stage reads it from data/ (a DVC dep)
            add_batch(paths, demo_batch("corrupted", paths.root / "demo.parquet", rows=120), "demo",
                      params.ingest, 0, DEMO_COLUMNS)
        traces[name] = traced_run(name, params, paths)
    return paths, params, traces


@pytest.mark.parametrize("name", ALL)
def test_stage_reads_only_its_declared_inputs_and_writes_every_output(full_run, name):
    paths, _, traces = full_run
    log, opened = traces[name]
    assert violations(name, paths, log, opened) == []
    assert log.paths(name, "r") or name == "ingest"  # the stage really goes through the readers


def _same_data(a: Path, b: Path) -> bool:
    if a.suffix == ".npz":  # zip members carry timestamps: compare the arrays
        with np.load(a) as x, np.load(b) as y:
            return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    return a.read_bytes() == b.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_stage_runs_from_its_declared_inputs_alone(full_run, tmp_path, name):
    paths, params, _ = full_run
    alone = Paths.at(tmp_path)
    for dep in artifacts.STAGES[name].deps:  # raw-data folders (the code is shared)
        if dep != "dataopt" and (paths.root / dep).exists():
            shutil.copytree(paths.root / dep, alone.root / dep)
    for rel in artifacts.inputs(name):
        src, dst = paths.artifacts / rel, alone.artifacts / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    run_stage(name, params, alone)
    for rel in artifacts.outputs(name):
        if ARTIFACTS[rel].kind in ("parquet", "npy", "npz"):  # JSON files carry timings
            assert _same_data(paths.artifacts / rel, alone.artifacts / rel), rel


def test_an_undeclared_read_through_the_readers_fails_at_once(full_run, monkeypatch):
    paths, params, _ = full_run
    from dataopt.stages import evaluate

    real = evaluate.run

    def sneaky(p, pa, **kw):
        artifacts.read_frame(pa, "analyze/analysis.parquet")  # evaluate does not declare it
        return real(p, pa, **kw)

    monkeypatch.setattr(evaluate, "run", sneaky)
    with pytest.raises(ContractError, match="evaluate.*analyze/analysis.parquet"):
        run_stage("evaluate", params, paths)


def test_an_undeclared_raw_read_is_reported(full_run, monkeypatch):
    paths, params, _ = full_run
    from dataopt.stages import evaluate

    real = evaluate.run

    def sneaky(p, pa, **kw):
        (pa.artifacts / "analyze" / "analysis.json").read_text()  # raw, around the readers
        return real(p, pa, **kw)

    monkeypatch.setattr(evaluate, "run", sneaky)
    log, opened = traced_run("evaluate", params, paths)
    assert violations("evaluate", paths, log, opened) == [
        "evaluate reads analyze/analysis.json, which it does not declare"]


def test_a_declared_output_never_written_is_reported(full_run):
    paths, params, traces = full_run
    log, opened = traces["ingest"]
    victim = paths.artifacts / "ingest" / "report.json"
    kept = victim.read_bytes()
    victim.unlink()
    try:
        assert violations("ingest", paths, log, opened) == [
            "ingest declares ingest/report.json but never writes it"]
    finally:
        victim.write_bytes(kept)


def test_writing_another_stages_artifact_fails():
    with artifacts.stage_context("train"), pytest.raises(ContractError, match="artifact of stage 'ingest'"):
        artifacts.locate(Paths.at("."), "ingest/samples.parquet", "w")
    with pytest.raises(ContractError, match="not declared"):
        artifacts.locate(Paths.at("."), "train/secret.bin")
