"""train stage: the model trained on what the optimisation plan keeps, weights, draws, augments and
relabels, with plan.json's training directives (loss) and augmentation policy.

``train.mode: head`` trains a classifier on the embed stage's embeddings instead of the images (fast CPU
runs); ``train.dynamic`` re-selects the samples of every epoch (``DYNAMIC_SELECTORS``; density_consistency
reads ``perceive/signals.parquet``); ``train.adaaugment`` sets every sample's augmentation magnitude with
AdaAugment.

Writes ``artifacts/train/model/{model.safetensors,config.json}`` and ``artifacts/train/history.json``
(one row per epoch: epoch, loss, samples_seen, steps, seconds, lr, and the dynamic methods' statistics).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from dataopt import artifacts as art
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.paths import Paths
from dataopt.stages import machine_defaults
from dataopt.registry import DYNAMIC_SELECTORS
from dataopt.train import loop
from dataopt.train.checkpoint import save_model
from dataopt.train.head import train_head
from dataopt.train.trainer import train_model, train_set_from_plan


def _kept_signals(paths: Paths, plan: pd.DataFrame) -> pd.DataFrame:
    """perceive/signals.parquet rows of the samples the plan keeps (plan and signals share the order)."""
    signals = art.read_frame(paths, "perceive/signals.parquet")
    if len(signals) != len(plan) or not (signals["sample_id"].to_numpy() == plan["sample_id"].to_numpy()).all():
        raise DataError("perceive/signals.parquet: rows do not match optimize/plan.parquet; re-run 'perceive' and 'optimize'")
    return signals.loc[plan["keep"].to_numpy(bool)].reset_index(drop=True)



def run(params: Params, paths: Paths) -> dict[str, Any]:
    params, _ = machine_defaults(params, paths)  # a direct call (run_stage has filled them)
    samples = art.read_frame(paths, "ingest/samples.parquet", ["sample_id", "split", "label", "label_name"])
    images = art.read_images(paths, len(samples))
    plan_path = art.locate(paths, "optimize/plan.parquet")
    # plan.json carries the `train` / `augment` directives; a plan written without it trains as before
    has_json = (paths.artifacts / "optimize/plan.json").exists()
    plan_json = art.read_json(paths, "optimize/plan.json") if has_json else None
    plan = art.read_frame(paths, "optimize/plan.parquet")
    ts = train_set_from_plan(samples, plan, plan_path, plan_json)

    tp = params.train
    device = loop.resolve_device(tp.device)
    needs_signals = tp.dynamic.method != "none" and "signals" in DYNAMIC_SELECTORS.get(tp.dynamic.method).requires
    signals = _kept_signals(paths, plan) if needs_signals else None
    if tp.mode == "head":
        embeddings = art.load_npy(paths, "embed/embeddings.npy")
        if len(embeddings) != len(samples):
            raise DataError(f"embed/embeddings.npy: {len(embeddings)} rows but samples.parquet has {len(samples)}")
        model, history, config = train_head(embeddings, ts, tp, params.seed, device, signals=signals)
    else:
        model, history, config = train_model(images, ts, tp, params.seed, device, signals=signals)

    save_model(art.locate(paths, "train/model", "w"), model, config)
    art.write_json(paths, "train/history.json", history)
    last = history[-1]
    return {
        "epochs": len(history),
        "samples_seen": last["samples_seen"],
        "steps": last["steps"],
        "train_seconds": last["seconds"],
        "final_loss": last["loss"],
        "n_train_kept": ts.n_kept,
        "n_train_total": ts.n_total,
        "n_classes": ts.n_classes,
        "n_augmented": 0 if ts.augment_magnitudes is None else int((ts.augment_magnitudes > 0).sum()),
        "sampling": "uniform" if ts.sampling_weights is None else "weighted",
        "augment_policy": "+".join(v["policy"] for k, v in ts.augment.items() if k in ("image", "mix"))
        or "none",
        "train_directives": ",".join(sorted(ts.train_directives)) or "none",
        "device": device.type,
        "mode": tp.mode,
        "model": config["model"],
        "dynamic_method": tp.dynamic.method,
        "dynamic_budget": config["train"]["dynamic"]["budget"],
        "adaaugment": bool(tp.adaaugment.enabled),
    }
