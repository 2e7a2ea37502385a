"""The MLflow model registry (real store, SQLite in tmp): register, promote, reject, rollback, and
``dataopt models``. Each test registers under its own name in one store of three logged models."""
from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import yaml

from dataopt.cli import main
from dataopt.evaluate.compare import decide_promotion

mlflow = pytest.importorskip("mlflow")

MODEL_CODE = """
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class Constant(PythonModel):
    def predict(self, context, model_input, params=None):
        return [{k}] * len(model_input)


set_model(Constant())
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with three runs, each with a logged pyfunc model predicting its own constant
    (1, 2, 3) and an ``evaluate.accuracy`` metric; ``{"uri", "runs": [(run_id, model_uri), ...]}``."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dataopt", artifact_location=(root / "mlruns").as_uri())
    runs = []
    mlflow.set_tracking_uri(uri)
    try:
        for k, acc in ((1, 0.80), (2, 0.85), (3, 0.70)):
            code = root / f"model_{k}.py"
            code.write_text(textwrap.dedent(MODEL_CODE.format(k=k)))
            with mlflow.start_run(experiment_id=exp) as run:
                mlflow.log_metric("evaluate.accuracy", acc)
                info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["mlflow"])
            runs.append((run.info.run_id, info.model_uri))
    finally:
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "runs": runs, "root": root}


def predicts(uri: str, name: str, ref="champion") -> int:
    from tasks.registry import load

    return load(uri, name, ref).predict(np.zeros((1, 1)))[0]


def register_all(store, name: str, n: int = 3) -> list[int]:
    from tasks import registry

    return [registry.register(store["uri"], name, model_uri, run_id) for run_id, model_uri in store["runs"][:n]]


def promotion(promote: bool):
    y = np.arange(200) % 4
    old = np.where(np.arange(200) % 5 == 0, (y + 1) % 4, y)  # 80 % right
    return decide_promotion(old, y if promote else old, y, 4, min_gain=0.0, max_class_drop=0.05,
                            n_boot=500, confidence=0.95, random_state=0)


def test_register_promote_reject_rollback(store, tmp_path, monkeypatch):
    from tasks import registry

    monkeypatch.chdir(tmp_path)  # where MLflow's default store would land (see the last line)

    uri, name = store["uri"], "flow"
    assert registry.champion(uri, name) is None  # no registered model yet
    v1, v2, v3 = register_all(store, name)
    assert (v1, v2, v3) == (1, 2, 3)
    rows = registry.versions(uri, name)
    assert [r["aliases"] for r in rows] == [[], [], ["challenger"]]  # challenger: the newest
    assert [r["accuracy"] for r in rows] == [0.8, 0.85, 0.7]  # from each run's evaluate.accuracy
    assert rows[0]["run_id"] == store["runs"][0][0] and rows[0]["decision"] is None

    # v1: no champion yet -> promoted by the rule
    first = decide_promotion(None, np.zeros(5), np.zeros(5), 2, min_gain=0.0, max_class_drop=0.05,
                             n_boot=100, confidence=0.95, random_state=0)
    registry.record_decision(uri, name, v1, first)
    assert registry.champion(uri, name) == 1
    assert predicts(uri, name) == 1

    # v2 better -> promoted, with its numbers and the champion it replaced
    registry.record_decision(uri, name, v2, promotion(True))
    assert registry.champion(uri, name) == 2
    assert predicts(uri, name) == 2
    r2 = registry.show(uri, name, "champion")
    assert r2["version"] == 2 and r2["decision"] == "promoted" and r2["reason"].startswith("promoted: accuracy")
    assert r2["tags"]["dataopt.previous_champion"] == "1" and r2["tags"]["dataopt.decided_by"] == "rule"
    assert float(r2["tags"]["dataopt.delta"]) == pytest.approx(0.2) and r2["accuracy"] == 1.0

    # v3 no better -> rejected: the champion stays v2, v3 keeps the challenger alias
    registry.record_decision(uri, name, v3, promotion(False))
    assert registry.champion(uri, name) == 2
    r3 = registry.show(uri, name, 3)
    assert r3["decision"] == "rejected" and r3["reason"].startswith("rejected:") and r3["aliases"] == ["challenger"]
    assert predicts(uri, name) == 2

    # rollback: back to the champion v2 replaced, recorded on both
    assert registry.rollback(uri, name, reason="v2 fails in production") == (2, 1)
    assert registry.champion(uri, name) == 1 and predicts(uri, name) == 1
    rows = {r["version"]: r for r in registry.versions(uri, name)}
    assert rows[2]["decision"] == "rolled_back" and "v2 fails in production" in rows[2]["reason"]
    assert rows[1]["decision"] == "promoted" and "rollback from version 2" in rows[1]["reason"]
    # v1 replaced no champion: nowhere further back without --to
    with pytest.raises(registry.RegistryError, match="replaced no earlier champion"):
        registry.rollback(uri, name)
    assert registry.rollback(uri, name, to=3, reason="try v3") == (1, 3)
    assert registry.champion(uri, name) == 3 and predicts(uri, name) == 3 and predicts(uri, name, 2) == 2
    with pytest.raises(registry.RegistryError, match="has no version 9 .versions: 1, 2, 3."):
        registry.promote(uri, name, 9, "x")
    with pytest.raises(registry.RegistryError, match="already the champion"):
        registry.promote(uri, name, 3, "x")
    assert not list(tmp_path.iterdir())  # everything went to the store named, no ./mlflow.db or ./mlruns


def project(store, tmp_path, name: str):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"tracking": {"tracking_uri": store["uri"]}, "promotion": {"registered_model": name}}))
    return ["--project", str(tmp_path)]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_command(store, tmp_path, capsys):
    from tasks import registry

    opts = project(store, tmp_path, "cli")
    code, out, err = run(capsys, *opts)  # an empty registry: one line, exit 2
    assert code == 2 and out == "" and err.strip() == (
        f"dataopt: error: no registered model 'cli' in {store['uri']} (a retrain registers one)")
    register_all(store, "cli")
    registry.record_decision(store["uri"], "cli", 1, promotion(True))

    code, out, _ = run(capsys, *opts)  # `dataopt models` = `dataopt models list`
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:5] == ["version", "aliases", "decision", "accuracy", "created"]
    assert re.match(r"\s+1\s+champion\s+promoted\s+1\.0000\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+promoted: accuracy",
                    lines[2]), lines[2]
    assert re.match(r"\s+3\s+challenger\s+-\s+0\.7000", lines[4]), lines[4]
    assert run(capsys, "list", *opts)[1] == out

    code, out, _ = run(capsys, "show", *opts)  # the champion
    assert code == 0 and out.startswith("cli version 1 (champion)") and "decision:  promoted" in out
    assert f"run:       {store['runs'][0][0]}" in out and "dataopt.delta = 0.2" in out

    code, out, _ = run(capsys, "promote", "3", "--reason", "night images", *opts)
    assert code == 0 and "version 3 of 'cli' is the champion (was version 1" in out
    r3 = registry.show(store["uri"], "cli", 3)
    assert r3["reason"] == "manual override: night images" and r3["tags"]["dataopt.decided_by"].startswith("manual: ")
    assert r3["aliases"] == ["challenger", "champion"]

    code, out, _ = run(capsys, "rollback", *opts)
    assert code == 0 and "rolled back from version 3 to version 1" in out
    assert registry.champion(store["uri"], "cli") == 1
    assert run(capsys, "rollback", "--to", "2", "--reason", "why not", *opts)[0] == 0
    assert registry.show(store["uri"], "cli", 2)["reason"].endswith("rollback from version 1): why not")

    # user errors: one line, exit 2, the champion untouched
    for argv, message in (
            (("show", "7"), "registered model 'cli' has no version 7 (versions: 1, 2, 3)"),
            (("show", "best"), "registered model 'cli' has no alias 'best' (aliases: challenger, champion)"),
            (("promote", "7", "--reason", "x"), "has no version 7"),
            (("promote", "3"), "models promote needs VERSION and --reason TEXT"),
            (("rollback", "--to", "2"), "version 2 of 'cli' is already the champion"),
            (("rollback", "--to", "x"), "version must be a number, got 'x'"),
            (("list", "3"), "models list takes no VERSION")):
        code, out, err = run(capsys, *argv, *opts)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("dataopt: error: ") and message in err, (argv, err)
    assert registry.champion(store["uri"], "cli") == 2

    other = tmp_path / "fresh"
    other.mkdir()
    (other / "params.yaml").write_text("seed: 0\n")
    code, _, err = run(capsys, "--project", str(other))
    assert code == 2 and "no MLflow store at sqlite:///" in err and not (other / "mlflow.db").exists()


def test_models_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["models", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "dataopt models rollback --to 1" in out and "dataopt models promote 3 --reason" in out
