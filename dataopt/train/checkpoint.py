"""Save and load a trained model as ``model.safetensors`` + ``config.json`` (never a pickle)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dataopt.errors import ConfigError, DataError
from dataopt.io import atomic_path, write_json
from dataopt.registry import MODELS
from dataopt.schema import require
from dataopt.train import loop
from dataopt.train.nets import Head

# models built outside MODELS: a head needs the embedding dim, so it is no `train.model` choice
UNREGISTERED = {"head": Head}

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_model(model_dir: str | Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Write ``model_dir/model.safetensors`` (the state dict, on the CPU) and ``model_dir/config.json``.

    ``config`` must hold ``model`` (a MODELS name, or ``"head"``) and ``kwargs`` (what rebuilds it), see
    :func:`dataopt.train.trainer.train_model`. Both files are written atomically.
    """
    model_dir = Path(model_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / WEIGHTS, suffix=".safetensors") as tmp:
        # one metadata key only: safetensors stores metadata as a hash map, whose order (and so the
        # file's bytes) would vary from run to run with several keys
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(model_dir / CONFIG, config)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by ``model_dir/config.json`` and load its safetensors weights.

    Returns
    -------
    model : in eval mode, on ``device``
    config : the parsed ``config.json``

    Raises
    ------
    MissingArtifactError
        A file is missing.
    DataError
        A file is corrupt, or the weights do not fit the model the config describes.
    """
    model_dir = Path(model_dir)
    cfg_path = require(model_dir / CONFIG, "train")
    weights_path = require(model_dir / WEIGHTS, "train")
    try:
        config = json.loads(cfg_path.read_text())
        name, kwargs = config["model"], dict(config["kwargs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{cfg_path}: not a model config with 'model' and 'kwargs' ({exc})") from None
    try:
        cls = UNREGISTERED[name] if name in UNREGISTERED else MODELS.get(name)
    except ConfigError as exc:
        raise DataError(f"{cfg_path}: {exc}") from None
    try:
        # the weights overwrite every parameter; seeding only keeps the global RNG untouched
        with loop.seeded(0):
            model = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{cfg_path}: cannot build model {name!r} from kwargs {kwargs} ({exc})") from None
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise DataError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DataError(
            f"{weights_path}: weights do not match model {name!r} of {cfg_path.name} ({' '.join(first)[:300]})"
        ) from None
    return model.to(device).eval(), config
