"""The ``retrain`` flow: re-curate the reference plus the accepted batches and the new ones with the
current ``params.yaml``, register the trained model as the ``challenger``, and promote it to
``champion`` only by the rule of ``params.yaml``'s ``promotion`` section, judged on the frozen
evaluation set.

The training set is declared where DVC sees it: the flow sets ``ingest.batches`` in ``params.yaml``
(one line; comments kept) and runs the ``curate`` flow, which records every stage in ``dvc.lock``. A
promoted challenger keeps it, so ``dvc repro`` reproduces the champion's pipeline and ``dvc status``
stays clean. A rejected challenger is rolled back: params.yaml and dvc.lock as they were, the artifacts
back from DVC's cache (``dvc checkout``). Its new batches are rejected for good when the challenger did
harm (significantly worse overall, or a class dropping significantly more than allowed: :func:`harm`); otherwise they
were only not enough to prove a gain and are deferred: the next retrain pools them with newer ones. A
journal (``.dataopt/retrain.json``) makes a retrain killed midway roll back the same way when the next
loop flow starts.

The frozen evaluation set is the reference's held-out split: batches never add rows to it, so it never
contains training data, and its sample ids' digest is recorded with every decision. Champion and
challenger are both loaded from the MLflow registry and scored on the same images; the rule is judged
on this set alone. Beside it, both are scored on each new batch's held-out part (split ``holdout``,
``ingest.batch_holdout`` of each class, never trained on): accuracy and rows per batch, against the
batch's own labels (so a noisy-labels batch is scored against its noisy labels), recorded with the
decision as ``numbers["batch_holdout"]`` (the decision log, the registry version's tags, the flow's
result) and as the run's ``dataopt.batch_holdout`` tag, but never deciding it.

With no champion yet, the model of the last ``dataopt run`` (``artifacts/track/run.json``) becomes the
first one, so the first challenger has something to beat. One writer at a time: the flow holds the
workspace lock (a second trigger waits up to ``schedule.lock_timeout`` seconds, then is skipped with its
reason).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from prefect import flow, get_run_logger

from dataopt import batches, loop
from dataopt.artifacts import ARTIFACTS
from dataopt.config import Params, load_params, set_value_text
from dataopt.errors import UserError
from dataopt.evaluate.compare import decide_promotion, harm
from dataopt.io import atomic_path, read_json, write_json
from dataopt.lock import WorkspaceLock, process_alive
from dataopt.paths import Paths
from dataopt.schema import TEST
from flows.curate import curate
from tasks import registry
from tasks.tracking import flow_run, tag_run, tracking_uri
from tasks.versioning import checkout


def frozen_eval_set(paths: Paths) -> tuple[np.ndarray, np.ndarray, str]:
    """``(images, labels, digest)`` of the reference's held-out rows (batches never add test rows)."""
    import pandas as pd

    samples = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet",
                              columns=["sample_id", "split", "label", "batch"])
    rows = np.flatnonzero((samples["split"] == TEST).to_numpy() & (samples["batch"] == batches.REFERENCE).to_numpy())
    images = np.load(paths.artifacts / "ingest" / "images.npy", mmap_mode="r")
    ids = np.sort(samples["sample_id"].to_numpy()[rows])
    return np.asarray(images[rows]), samples["label"].to_numpy()[rows], hashlib.sha256(ids.tobytes()).hexdigest()


def _model_uri(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    if "dataopt.model_uri" not in tags:
        raise UserError(f"MLflow run {run_id} logged no model (tracking.log_model: false?): nothing to register")
    return tags["dataopt.model_uri"]


def curated(paths: Paths, names: list[str]) -> dict[str, str]:
    """What the curation did to each new batch (``analysis.json`` / ``plan.json``'s ``by_batch``): one line
    per batch, e.g. "289 of 320 rows kept, 52 flagged as label issues, mean weight 0.71, 80 held out"."""
    flags = read_json(paths.artifacts / "analyze" / "analysis.json").get("by_batch", {})
    plan = read_json(paths.artifacts / "optimize" / "plan.json").get("by_batch", {})
    held = read_json(paths.artifacts / "ingest" / "report.json").get("n_holdout", {})
    out = {}
    for b in names:
        p, f = plan.get(b), flags.get(b, {})
        if p:
            out[b] = (f"{int(p['kept_sum'])} of {p['n']} rows kept, {int(f.get('label_issue_sum', 0))} flagged as "
                      f"label issues, {int(p['relabelled_sum'])} relabelled, mean weight {p['weight_mean']:.2f}, "
                      f"{held.get(b, 0)} held out")
    return out


def ensure_champion(params: Params, paths: Paths, logger: Any) -> Optional[str]:
    """The champion's version; with none yet, the model of the last `dataopt run` becomes it."""
    uri, name = tracking_uri(params, paths), params.promotion.registered_model
    current = registry.champion(uri, name)
    run_file = paths.artifacts / "track" / "run.json"
    if current is not None or not run_file.exists() or not read_json(run_file).get("run_id"):
        return current
    run_id = read_json(run_file)["run_id"]
    version = registry.register(uri, name, _model_uri(uri, run_id), run_id, {"dataopt.origin": "dataopt run"})
    registry.promote(uri, name, version, "baseline: the model of the last `dataopt run` (no champion yet)")
    loop.record(paths, "promoted", version=version, reason="baseline: no champion yet", mlflow_run=run_id)
    logger.info("champion: version %s (the last `dataopt run`, no champion before)", version)
    return version


# outputs dvc.yaml declares with cache: false (metrics, the track stage's run.json): a rollback restores
# them from the journal, `dvc checkout` restores the rest
UNCACHED = (*(p for p, a in ARTIFACTS.items() if a.role == "metric"), "track/run.json")


def _journal(paths: Paths) -> Path:
    return paths.root / ".dataopt" / "retrain.json"


def begin(paths: Paths) -> None:
    """Remember what to restore if the challenger is rejected or the retrain dies: params.yaml and
    dvc.lock as they were (the champion's pipeline; its outputs are in DVC's cache)."""
    lock = paths.root / "dvc.lock"
    uncached = {rel: (paths.artifacts / rel).read_text() for rel in UNCACHED if (paths.artifacts / rel).exists()}
    write_json(_journal(paths), {"pid": os.getpid(), "started": time.time(), "params": paths.params.read_text(),
                                 "dvc_lock": lock.read_text() if lock.exists() else None, "uncached": uncached})


def rollback(paths: Paths) -> None:
    """params.yaml, dvc.lock and the artifacts back to the champion's (``dvc checkout``); idempotent."""
    j = read_json(_journal(paths))
    with atomic_path(paths.params) as tmp:
        tmp.write_text(j["params"])
    if j["dvc_lock"] is not None:
        with atomic_path(paths.root / "dvc.lock") as tmp:
            tmp.write_text(j["dvc_lock"])
        checkout(paths.root)
    for rel, text in j.get("uncached", {}).items():  # DVC keeps no copy of these (cache: false)
        with atomic_path(paths.artifacts / rel) as tmp:
            tmp.write_text(text)
    _journal(paths).unlink()


def recover(paths: Paths, logger: Any) -> bool:
    """A retrain whose process died (``kill``, a crash) is rolled back before anything else runs."""
    f = _journal(paths)
    if not f.exists() or process_alive(read_json(f).get("pid", -1)) and read_json(f)["pid"] != os.getpid():
        return False
    rollback(paths)
    loop.record(paths, "retrain_recovered", why="a retrain died midway: params.yaml, dvc.lock and the "
                "artifacts were restored to the champion's")
    logger.warning("a retrain died midway: restored params.yaml, dvc.lock and the artifacts (dvc checkout)")
    return True


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", reason: str = "scheduled full retrain",
            parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """Re-curate with the accepted batches plus the new ones, train a challenger, promote it only if it
    is better; a rejected challenger's batches are not used again and its artifacts are rolled back."""
    logger = get_run_logger()
    paths = Paths.at(project)
    params = load_params(paths.params)
    try:
        lock = WorkspaceLock(paths.root, "retrain", timeout=params.schedule.lock_timeout).__enter__()
    except UserError as err:
        loop.record(paths, "retrain_skipped", why=f"workspace busy: {err}")
        logger.warning("retrain skipped: %s", err)
        return {"skipped": str(err)}
    try:
        recover(paths, logger)
        params = load_params(paths.params)
        accepted = list(params.ingest.batches)
        refused = {d["batch"] for d in loop.decisions(paths, ["batch_rejected"])}
        new = [e["name"] for e in batches.read_manifest(paths) if e["name"] not in accepted + sorted(refused)]
        uri, name = tracking_uri(params, paths), params.promotion.registered_model
        champion = ensure_champion(params, paths, logger)
        loop.record(paths, "retrain_started", reason=reason, accepted=accepted, new=new, champion=champion)
        begin(paths)
        with atomic_path(paths.params) as tmp:  # one line of params.yaml: every comment stays
            tmp.write_text(set_value_text(paths.params.read_text(), "ingest", "batches", accepted + new))
        with flow_run(params, paths, "retrain", parent_run_id, **{"dataopt.trigger": reason}) as run:
            summary = curate(params_path=str(paths.params), overrides=[], project=str(paths.root),
                             parent_run_id=run)
        run_id = summary["tracking"]["run_id"]
        if run_id is None:
            raise UserError("retrain needs MLflow tracking (tracking.enabled: true) to register the challenger")
        challenger = registry.register(uri, name, _model_uri(uri, run_id), run_id,
                                       {"dataopt.origin": "retrain", "dataopt.trigger": reason[:5000],
                                        "dataopt.batches": json.dumps(accepted + new)[:5000]})
        curation = curated(paths, new)
        images, labels, digest = frozen_eval_set(paths)
        n_classes = int(labels.max()) + 1
        models = {"champion": None if champion is None else registry.load(uri, name, champion),
                  "challenger": registry.load(uri, name, challenger)}
        new_pred = loop.predict_classes(models["challenger"], images)
        old_pred = None if models["champion"] is None else loop.predict_classes(models["champion"], images)
        decision = decide_promotion(old_pred, new_pred, labels, n_classes, **params.promotion.rule(),
                                    random_state=params.seed)
        # reported beside the rule, never deciding it; scored now: a rollback removes these rows
        held_out = loop.holdout_scores(models, loop.holdout_sets(paths, new))
        decision.numbers["batch_holdout"] = held_out
        registry.record_decision(uri, name, challenger, decision)  # and moves `champion` when promoted
        event = "promoted" if decision.promote else "rejected"
        if decision.promote:
            _journal(paths).unlink()
        else:  # the champion's pipeline back; harmful new data is never tried again, data that was not
            rollback(paths)  # enough to prove a gain waits, pooled with the next batches
            harmful = harm(decision)
            for b in new:
                loop.record(paths, "batch_rejected" if harmful else "batch_deferred", batch=b, version=challenger,
                            why=harmful or f"not enough to prove a gain yet, retried with the next batches: "
                                           f"{decision.reason}")
        loop.record(paths, event, version=challenger, champion_before=champion, reason=decision.reason,
                    numbers=decision.numbers, eval_set=digest, batches=accepted + new, curation=curation,
                    mlflow_run=run_id)
        loop.record(paths, "retrain_done", batches=accepted + new if decision.promote else accepted,
                    version=challenger, outcome=event)
        tag_run(params, paths, run, **{"dataopt.decision": event, "dataopt.reason": decision.reason,
                                       "dataopt.version": challenger, "dataopt.curation": json.dumps(curation),
                                       "dataopt.batch_holdout": json.dumps(held_out)})
        logger.info("challenger version %s %s: %s; curation: %s; new batches' held-out rows (their own labels): %s",
                    challenger, event, decision.reason, "; ".join(curation.values()) or "no new batch",
                    "; ".join(f"{b} ({v['n']} rows): champion {v['champion_accuracy']}, challenger "
                              f"{v['challenger_accuracy']}" for b, v in held_out.items()) or "none")
        return {"curation": curation, "version": challenger, "champion_before": champion, "promoted": decision.promote,
                "reason": decision.reason, "numbers": decision.numbers, "eval_set": digest, "run_id": run_id,
                "new_batches": new}
    finally:
        lock.__exit__(None, None, None)
