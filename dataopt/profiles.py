"""Defaults that fit the machine: the ``params.yaml`` keys set to ``auto`` take their value from a
profile chosen by the device and the size of the training split.

A CPU cannot train an image network on tens of thousands of images within minutes, and the pixel
embedding's out-of-fold head is nearly blind on natural images (34 % on CIFAR-10, label-issue F1 0.37).
So when no GPU is present and the train split is larger than :data:`LARGE_TRAIN` rows, the ``cpu_large``
profile embeds with the unsupervised ``whitened_patches`` dictionary (no label seen, so no leakage into
the out-of-fold scores), fits the perceive head with the step and weight decay measured on those
features, and trains the final classifier as a head on them (``train.mode: head``) instead of a CNN.
Every other run (small data such as the built-in digits, or a GPU) gets ``standard``: today's values,
so its numbers do not move.

A key written with a value in ``params.yaml`` or ``--set`` is never touched; :func:`resolve` returns
which keys it filled and why, and the run summary prints it. Pure: no torch; the caller says whether a
GPU is there.
"""
from __future__ import annotations

from typing import Any

from dataopt.config import AUTO, Params

# train rows above which a CPU-only run takes the cpu_large profile: on 2 cores the small CNN trained
# 11 of the 12.6 minutes of the 50,000-image CIFAR-10N run; on digits (1,437 rows) it takes seconds
LARGE_TRAIN = 5000

# lr / weight decay of a linear head on 8,192 correlated patch features (docs/methods.md): 0.01 /
# 0.005 gave 63.1 % out of fold at 10k CIFAR-10 images against 60.4 % (NLL 3.2) for 0.05 / 5e-4
CPU_LARGE = {"embed.backend": "whitened_patches", "perceive.lr": 0.01, "perceive.weight_decay": 0.005,
             "train.mode": "head", "train.lr": 0.01, "train.weight_decay": 0.005}
AUTO_KEYS = tuple(CPU_LARGE)  # the keys that may be written `auto`


def value_of(params: Params, key: str) -> Any:
    section, field = key.split(".")
    return getattr(getattr(params, section), field)


# standard: the schema's defaults for those keys (what a params file that leaves them out gets)
PROFILES: dict[str, dict[str, Any]] = {"standard": {k: value_of(Params(), k) for k in AUTO_KEYS},
                                       "cpu_large": CPU_LARGE}


def choose(n_train: int, cuda: bool) -> tuple[str, str]:
    """``(profile name, why)`` for a train split of ``n_train`` rows."""
    if cuda:
        return "standard", "a CUDA GPU is present"
    if n_train > LARGE_TRAIN:
        return "cpu_large", f"no GPU and {n_train:,} train images > {LARGE_TRAIN:,}"
    return "standard", f"{n_train:,} train images <= {LARGE_TRAIN:,}"


def resolve(params: Params, n_train: int, cuda: bool) -> tuple[Params, dict[str, Any]]:
    """``params`` with every ``auto`` key replaced by the chosen profile's value, and a record
    ``{"profile", "why", "applied": {key: value}}`` (``applied`` empty when no key was ``auto``)."""
    name, why = choose(n_train, cuda)
    applied = {k: v for k, v in PROFILES[name].items() if value_of(params, k) == AUTO}
    if not applied:
        return params, {"profile": name, "why": why, "applied": {}}
    raw = params.model_dump(mode="json")
    for key, value in applied.items():
        section, field = key.split(".")
        raw[section][field] = value
    return Params.model_validate(raw), {"profile": name, "why": why, "applied": applied}


def describe(record: dict[str, Any]) -> str:
    """One line for the run summary, e.g. ``cpu_large (no GPU and 50,000 train images > 5,000):
    embed.backend=whitened_patches, ...``; empty when nothing was ``auto``."""
    if not record.get("applied"):
        return ""
    keys = ", ".join(f"{k}={v}" for k, v in record["applied"].items())
    return f"{record['profile']} ({record['why']}): {keys}"

