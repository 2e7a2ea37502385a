"""Head-only training: a linear or one-hidden-layer classifier on the embed stage's frozen embeddings.

The plan is honoured as for images (:mod:`dataopt.train.trainer`): kept rows, relabels, loss weights,
sampling weights and plan.json's loss directives. Of plan.json's ``augment`` policies only the
``features`` slot applies to embeddings (``image`` and ``mix`` act on pixels):

- ``gaussian_noise``: isotropic noise added to every batch, drawn from the loop's generator
  (feature-space augmentation, survey 000 §VI-B);
- ``smote``: synthetic minority rows interpolated between same-class neighbours (Chawla et al. 2002,
  §4.2), appended to the training rows once, before training, with loss and draw weight 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from dataopt.errors import ConfigError, DataError
from dataopt.optimize.augment.features import gaussian_noise, smote, smote_targets
from dataopt.train import loop
from dataopt.train.nets import Head
from dataopt.train.trainer import TrainSet, build_selector, plan_training, run_config, tensor_or_none

FEATURE_POLICIES = ("gaussian_noise", "smote")


def _features_policy(ts: TrainSet) -> Optional[dict]:
    """plan.json ``augment.features``, checked; None when the plan has none."""
    policy = ts.augment.get("features")
    if not policy:
        return None
    name = policy.get("policy") if isinstance(policy, dict) else None
    if name not in FEATURE_POLICIES:
        raise ConfigError(f"plan.json augment.features: unknown policy {name!r}; "
                          f"valid: {', '.join(FEATURE_POLICIES)}")
    return policy


def _append_smote(x: np.ndarray, ts: TrainSet, policy: dict, seed: int):
    """SMOTE rows for the kept labels -> (x, labels, weights, sampling_weights, n_synthetic).

    Synthetic rows get loss weight 1 and draw weight 1 (arrays stay None when they were None).
    """
    targets = smote_targets(ts.labels, policy.get("target", "max"))
    z, zy = smote(x, ts.labels, int(policy.get("k", 5)), targets, np.random.default_rng(seed))
    m = len(z)

    def extend(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if a is None or m == 0 else np.concatenate([a, np.ones(m)])

    return (np.concatenate([x, z]) if m else x, np.concatenate([ts.labels, zy]),
            extend(ts.weights), extend(ts.sampling_weights), m)


def train_head(
    embeddings: np.ndarray,
    ts: TrainSet,
    tp: Any,
    seed: int,
    device: torch.device,
    progress: bool = True,
    signals: Optional[pd.DataFrame] = None,
    **fit_kwargs: Any,
) -> tuple[nn.Module, list[dict], dict[str, Any]]:
    """Train a :class:`~dataopt.train.nets.Head` on the kept rows of ``embeddings``.

    Parameters
    ----------
    embeddings : (N, d) float16 or float32, all samples (memory-mapped is fine; only kept rows are
        read); row i is ``samples.parquet`` row i
    ts : the plan's training set (:func:`dataopt.train.trainer.train_set_from_plan`)
    tp : the ``train`` params section (:class:`dataopt.config.TrainParams`); uses ``hidden``,
        ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``label_smoothing``
    seed : seeds initialisation, shuffling, sampling, noise and SMOTE
    device : where the data and the model live
    signals : perceive signals of the kept rows (``ts.rows`` order), for ``train.dynamic`` selectors
        that need them (density_consistency)
    **fit_kwargs : passed on to :func:`dataopt.train.loop.fit`; positions they see index the training
        rows, SMOTE rows (if any) last. A ``selector`` given here replaces the one ``tp.dynamic`` names.

    Returns
    -------
    model : in eval mode, on ``device``
    history : one dict per epoch (:func:`dataopt.train.loop.fit`)
    config : model config for :func:`dataopt.train.checkpoint.save_model`; ``input.kind`` is
        ``"embedding"``, ``class_counts`` and ``train`` as :func:`dataopt.train.trainer.run_config`
        (class counts before SMOTE), ``features_augment`` the feature policy with ``n_synthetic`` rows
        (when the plan has one)

    Raises
    ------
    DataError
        ``embeddings`` is not 2-D, has too few rows, or holds values that are not finite.
    ConfigError
        plan.json names an unknown feature policy, or SMOTE adds rows that a ``selector`` in
        ``fit_kwargs`` (fitted on the kept rows, its ``n_``) would never draw.
    """
    if embeddings.ndim != 2:
        raise DataError(f"embeddings.npy must be (N, d); got shape {embeddings.shape}")
    if len(ts.rows) and int(ts.rows.max()) >= len(embeddings):
        raise DataError(f"embeddings.npy has {len(embeddings)} rows but the plan trains on row "
                        f"{int(ts.rows.max())}; re-run the 'embed' stage")
    d = int(embeddings.shape[1])
    x = np.asarray(embeddings[ts.rows], dtype=np.float32)  # one fancy-index read of the kept rows
    if not np.isfinite(x).all():
        raise DataError("embeddings.npy: kept training rows hold values that are not finite")
    if "selector" not in fit_kwargs:
        fit_kwargs["selector"] = build_selector(ts, tp, seed, signals)
    labels, weights, draws = ts.labels, ts.weights, ts.sampling_weights
    policy = _features_policy(ts)
    augment_fn = None
    features_augment = None
    if policy is not None and policy["policy"] == "smote":
        x, labels, weights, draws, m = _append_smote(x, ts, policy, seed)
        selector = fit_kwargs.get("selector")
        if m and selector is not None and getattr(selector, "n_", len(x)) != len(x):
            # a selector fitted on the kept rows would never draw the synthetic ones
            raise ConfigError(f"plan.json augment.features smote adds {m} rows to the {ts.n_kept} kept ones, "
                              f"but the train.dynamic selector was fitted on {selector.n_} rows; "
                              "use one of them")
        features_augment = {**policy, "n_synthetic": int(m)}
    elif policy is not None:
        sigma = float(policy.get("sigma", 0.05))
        if not sigma >= 0:
            raise ConfigError(f"plan.json augment.features.sigma must be >= 0, got {sigma}")

        def add_noise(xb: torch.Tensor, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> torch.Tensor:
            return gaussian_noise(xb, sigma, gen)

        augment_fn = add_noise

        features_augment = {**policy, "sigma": sigma}

    # the loss only: image / mix policies act on pixels, which a head never sees
    loss_fn = plan_training(dataclasses.replace(ts, augment={}), tp)[0]
    with loop.seeded(seed):
        model = Head(d, ts.n_classes, hidden=tp.hidden, standardise=True)
    model.fit_standardiser(torch.from_numpy(x)).to(device)

    cfg = loop.FitConfig(
        epochs=tp.epochs, batch_size=tp.batch_size, lr=tp.lr, momentum=tp.momentum,
        weight_decay=tp.weight_decay, label_smoothing=tp.label_smoothing, augment="none",
        seed=seed, progress=progress, desc="train head", lr_key="train.lr",
    )
    history = loop.fit(
        model, torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device), cfg,
        weights=tensor_or_none(weights), sampling_weights=tensor_or_none(draws), loss_fn=loss_fn,
        augment_fn=augment_fn,
        **fit_kwargs,
    )
    config: dict[str, Any] = {
        "model": "head",
        "kwargs": {"dim": d, "n_classes": ts.n_classes, "hidden": int(tp.hidden), "standardise": True},
        "class_names": ts.class_names,
        "input": {"kind": "embedding", "dim": d, "dtype": "float32"},
        "seed": seed,
        **run_config(ts, tp, fit_kwargs["selector"]),
    }
    if features_augment is not None:
        config["features_augment"] = features_augment
    return model, history, config
