"""dvc.yaml is generated from dataopt/artifacts.py, and DVC runs the same chain as `dataopt run`."""
from pathlib import Path

import pytest
import yaml

from dataopt import artifacts
from dataopt.config import Params
from dataopt.stages import ALL, HEADLINE, ORDER, STAGE_FILE

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _names(entries):
    """dvc.yaml list entries are strings or one-key mappings ({path: {cache: false}})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _param_exists(dotted: str) -> bool:
    node = Params().model_dump(mode="json")
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_dvc_yaml_is_the_rendered_declarations():
    assert (ROOT / "dvc.yaml").read_text() == artifacts.dvc_yaml(), "run `dataopt dvc-yaml`"
    assert list(STAGES) == list(ALL) + ["track"]  # the chain, drift beside it, then track


@pytest.mark.parametrize("name", ALL)
def test_stage_runs_the_stage_command_with_its_declarations(name):
    st = STAGES[name]
    assert st["cmd"] == f"dataopt stage {name}"
    assert "dataopt" in _names(st["deps"])  # every stage reruns when the package changes
    assert _names(st["metrics"]) == [f"artifacts/{name}/metrics.json"]
    assert st["metrics"][0][f"artifacts/{name}/metrics.json"]["cache"] is False
    outs = set(_names(st["outs"]))
    assert outs and all(o.startswith(f"artifacts/{name}/") for o in outs)


def test_every_named_param_exists():
    named = {p for st in STAGES.values() for p in _names(st.get("params"))}
    missing = sorted(p for p in named if not _param_exists(p))
    assert not missing, f"dvc.yaml names params that dataopt.config.Params lacks: {missing}"


def test_track_stage_logs_after_everything():
    st = STAGES["track"]
    assert st["cmd"] == "dataopt track"
    deps = set(_names(st["deps"]))
    assert {f"artifacts/{n}/metrics.json" for n in ORDER} <= deps
    assert {f"artifacts/{n}/{STAGE_FILE}" for n in ORDER} <= deps  # timings: the MLflow run's start
    assert "artifacts/train/model" in deps and "artifacts/ingest/samples.parquet" in deps
    assert {"tracking", *ORDER} <= set(_names(st["params"]))
    assert st["outs"] == [{"artifacts/track/run.json": {"cache": False}}]


def test_every_dep_is_produced_by_an_earlier_stage():
    produced: set[str] = set()
    for name in list(ORDER) + ["track"]:
        st = STAGES[name]
        for dep in _names(st["deps"]):
            if dep.startswith("artifacts/"):
                assert any(dep == p or dep.startswith(p + "/") for p in produced), (name, dep)
        produced |= set(_names(st.get("outs"))) | set(_names(st.get("metrics")))


def test_plots_are_static_images_inside_stage_outputs():
    # vega plots need scripts from a CDN (blank offline): every plot is a PNG a stage writes
    outs = {p for st in STAGES.values() for p in _names(st.get("outs"))}
    plots = _names(DVC["plots"])
    assert {"artifacts/evaluate/plots/training_curve.png", "artifacts/evaluate/plots/per_class_accuracy.png",
            "artifacts/evaluate/plots/reliability.png", "artifacts/evaluate/plots/confusion_matrix.png",
            "artifacts/analyze/plots/loss_mixture.png"} <= set(plots)
    for p in plots:
        assert p.endswith(".png"), p
        assert any(p == o or p.startswith(o + "/") for o in outs), p


def test_dvc_plots_output_is_git_ignored():
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


def test_dvcignore_hides_bytecode_from_the_code_dependency():
    lines = (ROOT / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in lines


@pytest.mark.slow
def test_fresh_project_dvc_repro_then_nothing_to_do_then_experiment(tmp_path, shared_prefect):
    """Like a fresh clone with no DVC remote: `dvc repro` runs the chain on the built-in dataset
    (data/ holds only its README), a second `dvc repro` has nothing to do, and `dvc exp run -S`
    records an experiment that `dvc exp show` lists, with one MLflow run per execution."""
    import json
    import re
    import subprocess

    from test_e2e import BIN, make_project, project_env

    project = make_project(tmp_path / "proj")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["epochs"] = 2  # DVC mechanics, not accuracy: keep it quick
    raw["perceive"].update(epochs=2, early_epochs=1)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = project_env(project)

    def sh(*cmd):
        proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout

    out = sh(str(BIN / "dvc"), "repro")
    for name in list(ORDER) + ["track"]:
        assert f"Running stage '{name}'" in out
    assert "Running stage" not in sh(str(BIN / "dvc"), "repro")
    assert "up to date" in sh(str(BIN / "dvc"), "status")
    first = json.loads((project / "artifacts" / "track" / "run.json").read_text())
    records = {n: json.loads((project / "artifacts" / n / "stage.json").read_text()) for n in ORDER}
    assert len({r["launcher"] for r in records.values()}) == 1  # one `dvc repro` process ran them all
    metrics = json.loads((project / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == set(HEADLINE["evaluate"])  # headline only: `dvc exp show` stays readable
    plots = sh(str(BIN / "dvc"), "plots", "show", "--json")
    assert "per_class_accuracy.png" in plots and "vega" not in plots.lower()
    # one cache: after `dvc repro`, `dataopt run` reuses every stage (and logs one more MLflow run)
    out = sh(str(BIN / "dataopt"), "run")
    assert all(re.search(rf"^\s+{n}\s+cached\s", out, re.M) for n in ORDER), out
    assert "up to date" in sh(str(BIN / "dvc"), "status")

    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    out = sh(str(BIN / "dvc"), "exp", "run", "-S", "optimize.ratio=0.5")
    assert "Running stage 'optimize'" in out and "Running stage 'ingest'" not in out
    exps = json.loads(sh(str(BIN / "dvc"), "exp", "show", "--json"))
    names = [e.get("name") for rev in exps for e in (rev.get("experiments") or [])]
    assert len(names) == 1 and names[0], exps

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking_uri"])
    runs = [r for r in client.search_runs([first["experiment_id"]])
            if r.data.tags.get("dataopt.kind") != "stage"]  # the pipeline runs (`dataopt run`'s has its stages nested)
    assert sorted(r.data.tags["dataopt.entry_point"] for r in runs) == ["dvc", "dvc-exp", "prefect"]
    exp_run = next(r for r in runs if r.data.tags["dataopt.entry_point"] == "dvc-exp")
    assert exp_run.data.params["optimize.ratio"] == "0.5"

    # each run spans its own execution: `dvc repro` from ingest's start, the experiment from
    # optimize's (the stages DVC skipped are not counted), both to after evaluate
    repro_run = client.get_run(first["run_id"])
    start, end = repro_run.info.start_time / 1000, repro_run.info.end_time / 1000
    assert start == pytest.approx(records["ingest"]["started_at"], abs=0.002)
    assert end - start >= sum(r["metrics"]["seconds"] for r in records.values())
    assert end >= records["evaluate"]["ended_at"]
    optimize = json.loads((project / "artifacts" / "optimize" / "stage.json").read_text())
    assert exp_run.info.start_time / 1000 == pytest.approx(optimize["started_at"], abs=0.002)
    assert exp_run.data.tags["dataopt.run_start"] == "stages"
