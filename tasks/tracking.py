"""MLflow tracking: one run per pipeline execution. The only module of dataopt that imports mlflow.

Used by the Prefect flow (``flows.curate``) after the chain and by ``dataopt track`` (the last DVC
stage), so that ``dataopt run``, ``dvc repro`` and ``dvc exp run`` each record exactly one run with
the params, every stage's metrics, plots and reports, the trained model and the dataset digest.
The run id is written to ``artifacts/track/run.json`` (the ``track`` stage's output).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from dataopt.config import Params
from dataopt.io import file_digest, read_json, write_json
from dataopt.paths import Paths
from dataopt.stages import ORDER

PARAM_VALUE_LIMIT = 500  # MLflow rejects longer param values on some stores
DIGEST_LIMIT = 32  # MLflow's dataset digest column is String(36); the full sha256 goes in a tag
REPORTS = ("report.json", "analysis.json", "plan.json", "history.json", "quarantine.parquet",
           "meta.json", "corpus.json", "metrics.json")
_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


def tracking_uri(params: Params, paths: Paths) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project>/mlflow.db``."""
    uri = params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{paths.root / 'mlflow.db'}"


def entry_point() -> str:
    """Which entry point started this process: ``dvc-exp``, ``dvc`` or ``cli``."""
    if os.environ.get("DVC_EXP_NAME"):
        return "dvc-exp"
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        return "dvc"
    return "cli"


def git_commit(root: Path) -> Optional[str]:
    """HEAD of the git repository at ``root``, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def flat_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries of a stage's metrics.json as ``{"<stage>.<key>": value}`` (nested dicts joined
    with dots; strings, lists and booleans are left out)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if value == value and abs(value) != float("inf"):  # MLflow stores no NaN/inf reliably
                out[_KEY_BAD.sub("_", prefix)] = float(value)

    walk(stage, metrics)
    return out


def collect_metrics(paths: Paths) -> dict[str, float]:
    """Every stage's ``artifacts/<stage>/metrics.json``, flattened and prefixed by the stage name."""
    out: dict[str, float] = {}
    for stage in ORDER:
        f = paths.artifacts / stage / "metrics.json"
        if f.exists():
            out.update(flat_metrics(stage, read_json(f)))
    return out


def _params(params: Params) -> dict[str, str]:
    out = {}
    for k, v in params.flat().items():
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        out[k] = s[: PARAM_VALUE_LIMIT - 3] + "..." if len(s) > PARAM_VALUE_LIMIT else s
    return out


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _experiment_id(client: Any, name: str, paths: Paths) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    (paths.root / "mlruns").mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=(paths.root / "mlruns").as_uri())


def log_run(
    params: Params,
    paths: Paths,
    entry: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    stage_status: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Log the current artifacts as one MLflow run and write ``artifacts/track/run.json``.

    Parameters
    ----------
    params : the validated params the artifacts were produced with.
    paths : project paths.
    entry : entry-point tag (``prefect``, ``dvc``, ``dvc-exp``, ``cli``); default from the environment.
    overrides : ``--set`` overrides of this run (recorded as a tag).
    stage_status : ``{"ingest": "ran" | "cached", ...}`` from the flow (recorded as tags).

    Returns
    -------
    dict with ``run_id``, ``experiment_id``, ``tracking_uri`` (``run_id`` None when tracking is off).
    """
    out_file = paths.stage("track") / "run.json"
    uri = tracking_uri(params, paths)
    if not params.tracking.enabled:
        info = {"run_id": None, "experiment_id": None, "tracking_uri": uri, "enabled": False}
        write_json(out_file, info)
        print("dataopt: tracking.enabled is false: no MLflow run logged")
        return info

    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, params.tracking.experiment, paths)
    entry = entry or entry_point()
    tags = {"dataopt.entry_point": entry, "mlflow.source.name": "dataopt"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dataopt.dvc_exp"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit(paths.root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if overrides:
        tags["dataopt.overrides"] = " ".join(overrides)[:5000]
    for stage, status in (stage_status or {}).items():
        tags[f"dataopt.stage.{stage}"] = status
    run = client.create_run(exp_id, tags=tags, run_name=f"{entry}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        for chunk in _chunks([Param(k, v) for k, v in _params(params).items()], 100):
            client.log_batch(run_id, params=chunk)
        metrics = [Metric(k, v, now, 0) for k, v in collect_metrics(paths).items()]
        for chunk in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=chunk)
        client.log_batch(run_id, tags=[RunTag("dataopt.metrics_logged", str(len(metrics)))])

        art = paths.artifacts
        for stage in ORDER:
            d = art / stage
            if (d / "plots").is_dir():
                client.log_artifacts(run_id, str(d / "plots"), f"plots/{stage}")
            for name in REPORTS:
                if (d / name).is_file():
                    client.log_artifact(run_id, str(d / name), f"reports/{stage}")
        client.log_text(run_id, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
                        "params.yaml")
        model_dir = art / "train" / "model"
        if params.tracking.log_model and model_dir.is_dir():
            client.log_artifacts(run_id, str(model_dir), "model")  # safetensors + config, no pickle

        samples = art / "ingest" / "samples.parquet"
        if samples.exists():
            sha = file_digest(samples)
            with warnings.catch_warnings():  # MLflow registers the local source class twice
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(samples.as_uri())
            ds = MetaDataset(source=source,
                             name=f"{params.ingest.source}:samples", digest=sha[:DIGEST_LIMIT])
            client.log_inputs(run_id, datasets=[DatasetInput(
                ds._to_mlflow_entity(),
                tags=[InputTag("mlflow.data.context", "training"), InputTag("sha256", sha)],
            )])
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    info = {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri, "enabled": True}
    write_json(out_file, info)
    return info
