"""MLflow tracking: one run per pipeline execution. The only module of dataopt that imports mlflow.

Used by the Prefect flow (``flows.curate``) after the chain and by ``dataopt track`` (the last DVC
stage), so that ``dataopt run``, ``dvc repro`` and ``dvc exp run`` each record exactly one run with
the params, every stage's metrics, plots and reports, the trained model and the dataset digest.
The run id is written to ``artifacts/track/run.json`` (the ``track`` stage's output). Under the run
of a ``curate`` flow, each stage is a run of its own (:func:`log_stage_runs`), nested under it.

The run spans the pipeline's wall time: it starts when the pipeline started (the flow passes its
start; otherwise the earliest start among the stages of this execution, from their ``stage.json``,
see :func:`pipeline_start`) and ends when logging is done. The model is logged as an MLflow pyfunc
model (``tasks/mlflow_model.py``, models-from-code over the safetensors), so that the run's Models
column shows it and ``mlflow.register_model`` takes it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import yaml

from dataopt.config import Params
from dataopt.io import file_digest, read_json, write_json
from dataopt.lock import process_alive
from dataopt.paths import Paths
from dataopt.profiles import describe
from dataopt.stages import HEADLINE, ORDER, STAGE_FILE, defaults_applied, launcher

PARAM_VALUE_LIMIT = 500  # MLflow rejects longer param values on some stores
DIGEST_LIMIT = 32  # MLflow's dataset digest column is String(36); the full sha256 goes in a tag
REPORTS = ("report.json", "analysis.json", "plan.json", "history.json", "quarantine.parquet",
           "meta.json", "corpus.json", "metrics.json", STAGE_FILE)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
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
    """Every metric of every stage, flattened and prefixed by the stage name: all a stage returned
    (``stage.json``; its ``metrics.json`` when there is none) and evaluate's per-class accuracy
    (``report.json``) as ``evaluate.per_class_accuracy.<class>``."""
    out: dict[str, float] = {}
    for stage in ORDER:
        d = paths.artifacts / stage
        if (d / STAGE_FILE).exists():
            out.update(flat_metrics(stage, read_json(d / STAGE_FILE).get("metrics") or {}))
        elif (d / "metrics.json").exists():
            out.update(flat_metrics(stage, read_json(d / "metrics.json")))
    report = paths.artifacts / "evaluate" / "report.json"
    if report.exists():
        rows = read_json(report).get("per_class") or []
        out.update(flat_metrics("evaluate", {"per_class_accuracy": {
            str(r["class"]): r["accuracy"] for r in rows if r.get("accuracy") is not None}}))
    return out


def stage_records(paths: Paths) -> dict[str, dict[str, Any]]:
    """``{stage: stage.json}`` of the stages that have one (unreadable files left out)."""
    out = {}
    for stage in ORDER:
        with contextlib.suppress(OSError, ValueError):
            rec = read_json(paths.artifacts / stage / STAGE_FILE)
            if isinstance(rec, dict):
                out[stage] = rec
    return out


def pipeline_start(paths: Paths, stage_status: Optional[dict[str, str]] = None) -> Optional[float]:
    """When this pipeline execution started (unix seconds): the earliest ``started_at`` among the
    stages that ran in it, None when none did.

    Which stages ran: those ``stage_status`` marks ``"ran"`` when given (the flow knows), else those
    launched by the same process as this one (:func:`dataopt.stages.launcher`: the ``dvc repro`` /
    ``dvc exp run`` process that runs every stage of dvc.yaml and then ``dataopt track``). A stage
    DVC skipped keeps the record of the execution that produced it, which had another launcher.
    """
    me = launcher()
    starts = [rec["started_at"] for stage, rec in stage_records(paths).items()
              if isinstance(rec.get("started_at"), (int, float))
              and (stage_status.get(stage) == "ran" if stage_status else rec.get("launcher") == me)]
    return min(starts) if starts else None


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


def _requirements() -> list[str]:
    """The logged model's pip requirements, pinned to what runs here: given explicitly so that MLflow
    never infers them (a subprocess that imports the model, and pip look-ups: slow, and offline
    impossible)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("dataopt", "torch", "safetensors", "numpy"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_model(uri: str, run_id: str, model_dir: Path, embedder: Optional[Path] = None) -> str:
    """Log ``model_dir`` (safetensors + config.json) as the pyfunc model ``model`` of run ``run_id``
    (models-from-code, ``tasks/mlflow_model.py``; nothing pickled). A head (trained on embeddings) is
    logged with ``embedder`` (the embed stage's ``embedder.safetensors``) so that it predicts from
    images, as an image model does. Returns its ``models:/`` URI."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from tasks.mlflow_model import ARTIFACT, EMBEDDER

    artifacts = {ARTIFACT: str(model_dir)}
    kind = (json.loads((model_dir / "config.json").read_text()).get("input") or {}).get("kind")
    if kind == "embedding" and embedder is not None and embedder.is_file():
        artifacts[EMBEDDER] = str(embedder)
    # the fluent API gives the logged model the run's experiment and links it to the run; the
    # run's end time is set again by the caller
    with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no signature / input example": a model of raw arrays
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE), artifacts=artifacts,
            pip_requirements=_requirements())
    return info.model_uri



def fail_dead_runs(client: Any, exp_id: str) -> list[str]:
    """Mark FAILED the runs of ``exp_id`` left RUNNING by a dataopt process of this host that has died
    (killed while logging, or a full disk); returns their ids. Runs of live or other hosts' processes,
    and runs not started by dataopt, are left alone."""
    host, closed = socket.gethostname(), []
    for run in client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("dataopt.pid")
        if tags.get("dataopt.host") != host or not (pid or "").isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "dataopt.failed_reason", f"its process (pid {pid}) died while "
                       "logging; marked FAILED by the next dataopt run")
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    return closed


def log_run(
    params: Params,
    paths: Paths,
    entry: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    stages: Optional[dict[str, dict[str, Any]]] = None,
    started_at: Optional[float] = None,
    parent_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Log the current artifacts as one MLflow run and write ``artifacts/track/run.json``.

    Parameters
    ----------
    params : the validated params the artifacts were produced with.
    paths : project paths.
    entry : entry-point tag (``prefect``, ``dvc``, ``dvc-exp``, ``cli``); default from the environment.
    overrides : ``--set`` overrides of this run (recorded as a tag).
    stages : the flow's record of each stage of this execution, ``{"ingest": {"status": "ran" |
        "cached" | "skipped", "why": reason, "started_at": t, "ended_at": t, "metrics": {...}}}``:
        the statuses are tags of the run, and each stage is a run nested under it
        (:func:`log_stage_runs`).
    started_at : when the pipeline started (unix seconds; the flow passes its start); default
        :func:`pipeline_start`, else now. The run starts then and ends when logging is done.
    parent_run_id : the MLflow run of the loop flow this pipeline ran in (nested under it).

    Returns
    -------
    dict with ``run_id``, ``experiment_id``, ``tracking_uri`` (``run_id`` None when tracking is off).
    """
    called = time.time()
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
    closed = fail_dead_runs(client, exp_id)
    if closed:
        print(f"dataopt: marked {len(closed)} MLflow run(s) FAILED whose process died while logging: "
              f"{', '.join(closed)}")
    tags = {"dataopt.entry_point": entry, "mlflow.source.name": "dataopt",
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            "dataopt.pid": str(os.getpid()), "dataopt.host": socket.gethostname()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dataopt.dvc_exp"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit(paths.root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if overrides:
        tags["dataopt.overrides"] = " ".join(overrides)[:5000]
    stage_status = {stage: rec["status"] for stage, rec in (stages or {}).items()}
    for stage, status in stage_status.items():
        tags[f"dataopt.stage.{stage}"] = status
    start, tags["dataopt.run_start"] = started_at, "passed"
    if start is None:
        start, tags["dataopt.run_start"] = pipeline_start(paths, stage_status), "stages"
    if start is None:  # no stage ran in this execution: the run is the logging itself
        start, tags["dataopt.run_start"] = called, "track"
    start = min(float(start), called)
    run = client.create_run(exp_id, start_time=int(start * 1000), tags=tags,
                            run_name=f"{entry}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(start))}")
    run_id = run.info.run_id
    try:
        log_stage_runs(client, exp_id, run_id, stages or {}, tags)
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
        chosen = defaults_applied(paths)
        if chosen:  # what the `auto` keys became on this machine (params show "auto")
            client.log_batch(run_id, tags=[RunTag("dataopt.defaults", describe(chosen)[:5000])],
                             params=[Param(f"resolved.{k}", str(v)) for k, v in chosen["applied"].items()])
        model_dir = art / "train" / "model"
        if params.tracking.log_model and model_dir.is_dir():
            t0 = time.perf_counter()
            model_uri = log_model(uri, run_id, model_dir, art / "embed" / "embedder.safetensors")
            client.set_tag(run_id, "dataopt.model_uri", model_uri)
            client.log_metric(run_id, "track.log_model_seconds", time.perf_counter() - t0)

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
        client.set_terminated(run_id, status="FAILED", end_time=int(time.time() * 1000))
        raise
    client.set_terminated(run_id, status="FINISHED", end_time=int(time.time() * 1000))
    info = {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri, "enabled": True}
    write_json(out_file, info)
    return info


def log_stage_runs(client: Any, exp_id: str, parent_id: str, stages: dict[str, dict[str, Any]],
                   pipeline_tags: dict[str, str]) -> None:
    """One run per stage nested under the pipeline run ``parent_id``, named after the stage and
    spanning the stage's own start and end (the UI's Duration is the stage's), tagged with its status
    and why (``dataopt.kind=stage``, ``dataopt.stage``, ``dataopt.stage_status``,
    ``dataopt.stage_reason``), with its headline metrics (``HEADLINE``; every metric is in the pipeline
    run). Three MLflow calls a stage."""
    from mlflow.entities import Metric

    # the pipeline run's process tags, so that fail_dead_runs closes a stage run its death left open
    process = {k: pipeline_tags[k] for k in ("mlflow.source.name", "dataopt.pid", "dataopt.host")}
    for stage, rec in stages.items():
        tags = {**process, "mlflow.parentRunId": parent_id, "dataopt.kind": "stage", "dataopt.stage": stage,
                "dataopt.stage_status": rec["status"], "dataopt.stage_reason": str(rec["why"])[:5000]}
        start, end = int(rec["started_at"] * 1000), int(rec["ended_at"] * 1000)
        run_id = client.create_run(exp_id, start_time=start, tags=tags, run_name=stage).info.run_id
        headline = {k: rec["metrics"][k] for k in HEADLINE.get(stage, ()) if k in rec["metrics"]}
        metrics = [Metric(k.split(".", 1)[1], v, end, 0) for k, v in flat_metrics(stage, headline).items()]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, status="FINISHED", end_time=end)


def log_drift(params: Params, paths: Paths, started_at: float, parent_run_id: Optional[str] = None) -> Optional[str]:
    """One MLflow run for one drift check (tagged ``dataopt.kind=drift``, ``dataopt.batch=<name>``):
    the verdict, each test's p-value, Holm-adjusted p-value and effect size, drift.json and the plots.
    Returns the run id (None when tracking is off or no batch was checked)."""
    report = read_json(paths.artifacts / "drift" / "drift.json")
    if not params.tracking.enabled or not report.get("batch"):
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = tracking_uri(params, paths)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, params.tracking.experiment, paths)
    name, verdict = report["batch"]["name"], report["verdict"]
    tags = {"dataopt.kind": "drift", "dataopt.batch": name, "dataopt.batch_hash": report["batch"]["content_hash"],
            "dataopt.drift": str(bool(verdict["drift"])).lower(), "dataopt.verdict": verdict["why"][:5000],
            "mlflow.source.name": "dataopt", "dataopt.entry_point": "drift",
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run = client.create_run(exp_id, start_time=int(started_at * 1000), tags=tags, run_name=f"drift-{name}")
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric("drift.verdict", float(bool(verdict["drift"])), now, 0),
                   Metric("drift.n_batch", float(verdict["n_batch"]), now, 0)]
        for test, r in report["tests"].items():
            for key, value in (("p_value", r["p_value"]), ("effect_size", r["effect_size"]),
                               ("holm_p", verdict["adjusted_p"].get(test)),
                               ("decided", float(verdict["decided"].get(test, False)))):
                if value is not None:
                    metrics.append(Metric(f"drift.{test}.{key}", float(value), now, 0))
        client.log_batch(run_id, metrics=metrics, params=[
            Param(f"drift.{k}", json.dumps(v, sort_keys=True)[:PARAM_VALUE_LIMIT])
            for k, v in params.drift.model_dump(mode="json").items()])
        client.log_artifact(run_id, str(paths.artifacts / "drift" / "drift.json"), "drift")
        if (paths.artifacts / "drift" / "plots").is_dir():
            client.log_artifacts(run_id, str(paths.artifacts / "drift" / "plots"), "drift/plots")
    except BaseException:
        client.set_terminated(run_id, status="FAILED", end_time=int(time.time() * 1000))
        raise
    client.set_terminated(run_id, status="FINISHED", end_time=int(time.time() * 1000))
    return run_id


@contextlib.contextmanager
def flow_run(params: Params, paths: Paths, name: str, parent_run_id: Optional[str] = None,
             **tags: Any) -> Iterator[Optional[str]]:
    """One MLflow parent run for one loop flow run (``watch``, ``check_drift``, ``retrain``): the drift
    checks and pipeline executions it starts are nested under it (``mlflow.parentRunId``); its tags
    say what was decided. Yields the run id (None when tracking is off), FAILED if the flow raises."""
    if not params.tracking.enabled:
        yield None
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(params, paths))
    run = client.create_run(_experiment_id(client, params.tracking.experiment, paths),
                            tags={"dataopt.kind": name, "mlflow.source.name": "dataopt",
                                  "dataopt.entry_point": name, **{k: str(v)[:5000] for k, v in tags.items()},
                                  **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})},
                            run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def tag_run(params: Params, paths: Paths, run_id: Optional[str], **tags: Any) -> None:
    """Add tags (a decision and its reason) to a run of :func:`flow_run`."""
    if run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(params, paths))
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])
