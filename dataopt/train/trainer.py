"""The train stage's logic: turn samples + an optimisation plan into a trained model.

The plan (``optimize/plan.parquet``) decides, per training sample, whether it is trained on (``keep``),
with which label (``new_label``), which loss weight (``weight``), how often it is drawn
(``sampling_weight``, a weighted sampler with replacement) and how strongly it is augmented
(``augment_magnitude``). plan.json adds two directives: ``train`` (loss directives from perturbers
and weighters, turned into the loss by :func:`dataopt.train.losses.make_loss`) and ``augment`` (the
policy: ``image`` - a torchvision v2 policy applied per batch on the device, with the per-sample
magnitude; ``mix`` - MixUp/CutMix, trained with the mixup criterion ``lam L(y_i) + (1 - lam)
L(y_{i-1})``, i.e. cross-entropy on the soft targets; ``features`` - for head-only training, not
applied to images). Without an ``augment`` policy, ``augment_magnitude`` is extra random translation
on top of ``train.augment`` (see :func:`dataopt.train.loop.fit`). Dynamic, per-epoch selection
(issue 6) plugs in at :func:`train_model`, which owns the call to the shared loop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from dataopt import image_kernels
from dataopt.errors import ConfigError, DataError, DataWarning
from dataopt.optimize.augment.batch import BatchAugmenter, default_loss
from dataopt.registry import DYNAMIC_SELECTORS
from dataopt.schema import PLAN_COLUMNS, TRAIN
from dataopt.train import dynamic_selection  # noqa: F401  (fills DYNAMIC_SELECTORS)
from dataopt.train import loop
from dataopt.train.adaaugment import AdaAugment
from dataopt.train.losses import make_loss
from dataopt.train.nets import build_model


@dataclass
class TrainSet:
    """What the plan asks to train on, as arrays over the kept training rows.

    Attributes
    ----------
    rows : (n_kept,) int64 row positions in ``samples.parquet`` / ``images.npy``
    labels : (n_kept,) int64 labels trained on (the plan's ``new_label``)
    weights : (n_kept,) float64 loss weights, or None when all are 1
    sampling_weights : (n_kept,) float64 draw weights, or None when all are 1 (plain shuffling)
    augment_magnitudes : (n_kept,) float64 in [0, 1], or None when all are 0
    n_total : number of training rows before the plan's ``keep``
    class_names : names indexed by label
    train_directives : plan.json ``train`` (loss directives; {} = plain cross-entropy)
    augment : plan.json ``augment`` (policy slots ``image``, ``mix``, ``features``; {} = none)
    """

    rows: np.ndarray
    labels: np.ndarray
    weights: Optional[np.ndarray]
    sampling_weights: Optional[np.ndarray]
    augment_magnitudes: Optional[np.ndarray]
    n_total: int
    class_names: list[str]
    train_directives: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return len(self.rows)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def class_names(samples: pd.DataFrame, n_classes: int = 0) -> list[str]:
    """Names indexed by label, from the (label, label_name) pairs of ``samples`` (both splits).

    A label with no sample (or no name) is named by its number; the list covers at least
    ``max(label) + 1`` and ``n_classes`` entries.
    """
    labels = samples["label"].to_numpy(dtype=np.int64)
    n = max(int(labels.max()) + 1 if len(labels) else 0, n_classes)
    names = [str(i) for i in range(n)]
    if "label_name" in samples:
        pairs = samples[["label", "label_name"]].dropna().drop_duplicates("label")
        for lab, name in zip(pairs["label"].to_numpy(np.int64), pairs["label_name"].astype(str)):
            names[int(lab)] = name
    return names


def _finite_in(values: np.ndarray, lo: float, hi: float) -> bool:
    return bool(np.isfinite(values).all() and (values >= lo).all() and (values <= hi).all())


def train_set_from_plan(samples: pd.DataFrame, plan: pd.DataFrame, plan_path: Path | str,
                        plan_json: Optional[dict] = None) -> TrainSet:
    """Check ``plan`` against the training rows of ``samples`` and collect what is trained on.

    Parameters
    ----------
    samples : the samples table (both splits; columns of ``dataopt.schema.SAMPLES_COLUMNS``)
    plan : the plan table (``dataopt.schema.PLAN_COLUMNS``), one row per training sample in
        samples order
    plan_path : named in error messages
    plan_json : the parsed plan.json, optional; its ``train`` and ``augment`` directives are kept

    Raises
    ------
    DataError
        Missing columns, rows not matching the training samples, values out of range, or a plan
        that keeps nothing.
    """
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing:
        raise DataError(f"{plan_path}: missing columns {missing}")
    train_pos = np.flatnonzero((samples["split"] == TRAIN).to_numpy())
    if len(train_pos) == 0:
        raise DataError("samples.parquet has no row with split 'train'")
    train_ids = samples["sample_id"].to_numpy(np.int64)[train_pos]
    plan_ids = plan["sample_id"].to_numpy(np.int64)
    if len(plan_ids) != len(train_ids) or not np.array_equal(plan_ids, train_ids):
        raise DataError(
            f"{plan_path}: its {len(plan_ids)} rows do not match the {len(train_ids)} training samples "
            "of samples.parquet (same sample_id, same order); re-run the 'optimize' stage"
        )
    keep = plan["keep"].to_numpy(bool)
    if not keep.any():
        raise DataError(f"{plan_path}: the plan keeps no training sample")
    sel = plan.loc[keep]
    # copies: arrow-backed columns can be read-only views, which torch.from_numpy warns about
    labels = sel["new_label"].to_numpy(np.int64, copy=True)
    weight = sel["weight"].to_numpy(np.float64, copy=True)
    draw = sel["sampling_weight"].to_numpy(np.float64, copy=True)
    mag = sel["augment_magnitude"].to_numpy(np.float64, copy=True)
    if (labels < 0).any():
        raise DataError(f"{plan_path}: negative new_label {int(labels.min())}")
    if not _finite_in(weight, 0.0, np.inf) or weight.sum() <= 0:
        raise DataError(f"{plan_path}: weight must be finite, >= 0 and not all 0 on kept rows")
    if not _finite_in(draw, 0.0, np.inf) or draw.sum() <= 0:
        raise DataError(f"{plan_path}: sampling_weight must be finite, >= 0 and not all 0 on kept rows")
    if not _finite_in(mag, 0.0, 1.0):
        raise DataError(f"{plan_path}: augment_magnitude must lie in [0, 1]")
    names = class_names(samples, int(labels.max()) + 1)
    present = np.unique(labels)
    if present.size < 2:
        lab = int(present[0])
        named = f" ({names[lab]})" if names[lab] != str(lab) else ""
        raise DataError(f"train needs at least two classes; the plan keeps only class {lab}{named} "
                        f"({plan_path})")
    return TrainSet(
        rows=train_pos[keep],
        labels=labels,
        weights=None if (weight == 1).all() else weight,
        sampling_weights=None if (draw == 1).all() else draw,
        augment_magnitudes=None if (mag == 0).all() else mag,
        n_total=len(train_pos),
        class_names=names,
        train_directives=dict((plan_json or {}).get("train") or {}),
        augment=dict((plan_json or {}).get("augment") or {}),
    )


def plan_training(ts: TrainSet, tp: Any) -> tuple[Optional[Any], Optional[Any], bool]:
    """The ``(loss_fn, augment_fn, magnitudes_in_augment_fn)`` that honour plan.json for ``loop.fit``.

    ``loss_fn``: :func:`dataopt.train.losses.make_loss` on ``ts.train_directives`` (plus
    ``train.label_smoothing`` when the plan sets none; the class prior is the kept label
    frequencies), wrapped in the mixup criterion when the plan mixes batches; None = the loop default.
    ``augment_fn``: a :class:`dataopt.optimize.augment.batch.BatchAugmenter` when the plan has an ``image``
    or ``mix`` policy (it then owns ``train.augment`` and the per-sample magnitudes); None otherwise.
    """
    loss_fn = None
    if ts.train_directives:
        directives = dict(ts.train_directives)
        if tp.label_smoothing and "label_smoothing" not in directives:
            directives["label_smoothing"] = tp.label_smoothing
        prior = np.bincount(ts.labels, minlength=ts.n_classes) / max(1, ts.n_kept)
        loss_fn = make_loss(directives, ts.n_classes, prior.tolist())
    policies = {k: v for k, v in ts.augment.items() if k in ("image", "mix")}
    if not policies:
        return loss_fn, None, False
    mags = None if ts.augment_magnitudes is None else torch.from_numpy(ts.augment_magnitudes)
    if mags is None and "image" in policies:
        mags = torch.zeros(ts.n_kept, dtype=torch.float64)  # the plan says magnitude 0 everywhere
    augmenter = BatchAugmenter(policies, mags, base=tp.augment, n_classes=ts.n_classes,
                               translate=tp.translate)
    if augmenter.mixing is not None:
        loss_fn = augmenter.mixed_loss(loss_fn or default_loss(tp.label_smoothing))
    return loss_fn, augmenter, True


def tensor_or_none(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """``a`` as a CPU tensor sharing its memory (the loop moves it), or None."""
    return None if a is None else torch.from_numpy(a)


def build_selector(ts: TrainSet, tp: Any, seed: int, signals: Optional[pd.DataFrame] = None) -> Optional[Any]:
    """The fitted ``train.dynamic`` selector for ``ts`` (None for method ``none``).

    ``signals``: the perceive signals of the kept training rows, in ``ts.rows`` order (needed by
    selectors whose ``requires`` names ``signals``).
    """
    dp = tp.dynamic
    if dp.method == "none":
        return None
    selector = DYNAMIC_SELECTORS.build(dp.method, dp.kwargs, budget=dp.budget, random_state=seed)
    if ts.sampling_weights is not None:
        raise ConfigError(f"train.dynamic.method={dp.method!r} decides what each epoch draws, and the plan "
                          "has sampling weights (a resampling step) that decide it too; use one of them")
    selector = selector.fit(ts.n_kept, tp.epochs, signals if "signals" in selector.requires else None)
    smallest, n_classes = int(min(selector.epoch_sizes_)), int(np.unique(ts.labels).size)
    if smallest < n_classes:
        warnings.warn(f"train: train.dynamic.budget={dp.budget:g} trains some epochs on {smallest} "
                      f"sample(s) for {n_classes} classes; raise the budget", DataWarning, stacklevel=2)
    return selector


def run_config(ts: TrainSet, tp: Any, selector: Optional[Any]) -> dict[str, Any]:
    """What the evaluate stage needs to put a run's cost next to the full-data run's."""
    return {
        "class_counts": np.bincount(ts.labels, minlength=ts.n_classes).tolist(),
        "train": {"batch_size": tp.batch_size, "epochs": tp.epochs, "n_train_total": ts.n_total,
                  "n_train_kept": ts.n_kept, "mode": tp.mode,
                  "dynamic": {"method": tp.dynamic.method,
                              "budget": tp.dynamic.budget if selector is not None else 1.0},
                  "adaaugment": bool(tp.adaaugment.enabled)},
    }


def train_model(
    images: np.ndarray,
    ts: TrainSet,
    tp: Any,
    seed: int,
    device: torch.device,
    progress: bool = True,
    signals: Optional[pd.DataFrame] = None,
) -> tuple[nn.Module, list[dict], dict[str, Any]]:
    """Train ``tp.model`` on the kept rows of ``images``.

    Parameters
    ----------
    images : (N, H, W, C) uint8, all samples (memory-mapped is fine; only kept rows are read)
    ts : the plan's training set (:func:`train_set_from_plan`)
    tp : the ``train`` params section (:class:`dataopt.config.TrainParams`)
    seed : seeds model initialisation, shuffling, sampling and augmentation
    device : where the data and the model live
    signals : perceive signals of the kept rows (``ts.rows`` order), for ``train.dynamic`` selectors
        that need them (density_consistency)

    Returns
    -------
    model : in eval mode, on ``device``
    history : one dict per epoch (:func:`dataopt.train.loop.fit`)
    config : model config for :func:`dataopt.train.checkpoint.save_model`
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"images.npy must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    _, h, w, c = images.shape
    # one fancy-index read of the kept rows, then one copy to the device (uint8; normalised per batch)
    x = loop.images_to_tensor(images[ts.rows], device)
    y = torch.from_numpy(ts.labels).to(device)
    model, kwargs = build_model(tp.model, seed, ts.n_classes, c, tp.width, min(h, w),
                                flip_tta=tp.augment == "flip_crop")
    model.to(device)
    selector = build_selector(ts, tp, seed, signals)

    cfg = loop.FitConfig(
        epochs=tp.epochs, batch_size=tp.batch_size, lr=tp.lr, momentum=tp.momentum,
        weight_decay=tp.weight_decay, label_smoothing=tp.label_smoothing, augment=tp.augment,
        translate=tp.translate, lookahead=tp.lookahead, seed=seed, progress=progress, desc="train",
        lr_key="train.lr", precision=tp.precision, flip=tp.flip, whiten_bias_epochs=tp.whiten_bias_epochs,
    )
    loss_fn, augment_fn, owns_magnitudes = plan_training(ts, tp)
    on_epoch = None
    if tp.adaaugment.enabled:
        ada = adaptive_augmenter(ts, tp, seed, model, y, augment_fn)
        augment_fn, owns_magnitudes, on_epoch = ada, True, lambda epoch, _m: ada.epoch_stats(epoch)
    check_recipe(tp, model, augment_fn)
    history = loop.fit(
        model, x, y, cfg, weights=tensor_or_none(ts.weights), sampling_weights=tensor_or_none(ts.sampling_weights),
        augment_magnitudes=None if owns_magnitudes else tensor_or_none(ts.augment_magnitudes),
        loss_fn=loss_fn, augment_fn=augment_fn, selector=selector, on_epoch=on_epoch,
    )
    config = {
        "model": tp.model,
        "kwargs": kwargs,
        "class_names": ts.class_names,
        "input": {"dtype": "uint8", "layout": "NCHW", "channels": int(c), "height": int(h), "width": int(w)},
        "normalisation": {"scale": 255.0, "mean": image_kernels.MEAN, "std": image_kernels.STD},
        "seed": seed,
        **run_config(ts, tp, selector),
    }
    return model, history, config


def check_recipe(tp: Any, model: nn.Module, augment_fn: Optional[Any]) -> None:
    """ConfigError for airbench recipe params the run cannot honour: alternating flips under an
    augmentation that flips by itself, a whitening-bias freeze on a model without a whitening layer."""
    if tp.flip == "alternating" and augment_fn is not None:
        raise ConfigError("train.flip='alternating' is applied by the built-in flip_crop augmentation; the plan's "
                          "image/mix policy or adaaugment flips by itself: use train.flip='random'")
    if tp.whiten_bias_epochs is not None and getattr(getattr(model, "whiten", None), "bias", None) is None:
        raise ConfigError(f"train.whiten_bias_epochs freezes a whitening layer's bias; train.model={tp.model!r} "
                          "has none (airbench has): set it to null")


def adaptive_augmenter(ts: TrainSet, tp: Any, seed: int, model: nn.Module, y: torch.Tensor,
                       plan_augment: Optional[Any]) -> Any:
    """AdaAugment (``train.adaaugment``) bound to ``model``; refuses a plan that also augments images."""
    if plan_augment is not None:
        raise ConfigError("train.adaaugment.enabled and the plan's image/mix augmentation policy both set "
                          "how samples are augmented; drop the augment step or disable adaaugment")
    if ts.augment_magnitudes is not None:
        raise ConfigError("train.adaaugment.enabled chooses every sample's magnitude itself, but the plan "
                          "sets augment_magnitude; drop that step or disable adaaugment")
    ada = AdaAugment(n=ts.n_kept, n_classes=ts.n_classes, feature_dim=model.feature_dim, epochs=tp.epochs,
                     base=tp.augment, seed=seed, **{"translate": tp.translate, **tp.adaaugment.kwargs})
    return ada.bind(model, y)
