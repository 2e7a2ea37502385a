"""The ``open_clip`` embedder: OpenCLIP image embeddings and class-prompt text embeddings.

Weights come from ``pretrained``: an OpenCLIP tag (``open_clip.list_pretrained()``; downloaded where the
user has internet, then cached), a local checkpoint file (``.safetensors``, or ``.pt``/``.pth``/``.bin``
loaded with ``torch.load(weights_only=True)``; relative paths resolve against the project root), or the
explicit word ``random`` (randomly initialised weights, for speed measurements only). A custom
architecture is a JSON model config (OpenCLIP's format: ``embed_dim``, ``vision_cfg``, ``text_cfg``) passed
as ``model_config``; its file name (without ``.json``) is the ``model`` name. Nothing falls back: a missing
or mismatched checkpoint, an unknown model or a tag that cannot be downloaded raise
:class:`dataopt.errors.ConfigError` naming the file and the model.

Images are preprocessed as batched tensor ops on the device (:mod:`dataopt.embed.gpu_preprocess`) with the
model's own ``preprocess_cfg`` (size, mean/std, interpolation, resize mode). On a GPU the encoders run
under bf16 (fp16 where bf16 is unsupported) autocast; on the CPU in fp32 (bf16 autocast on request).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dataopt.embed.base import Embedder, l2_normalise, torch_device
from dataopt.embed.gpu_preprocess import preprocess
from dataopt.errors import ConfigError
from dataopt.io import file_digest
from dataopt.registry import EMBEDDERS

# a few of the CLIP paper's ImageNet prompt templates (Radford et al. 2021, sec. 3.1.4: prompt ensembling)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a good photo of a {}.",
)
RANDOM = "random"  # the explicit `pretrained` value for randomly initialised weights
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _open_clip():
    import open_clip  # why: it pulls in timm/hf helpers that the other backends never need

    return open_clip


def _register_config(model: str, model_config: Optional[str]) -> None:
    """Make ``model`` known to OpenCLIP, registering the user's JSON config when one is given."""
    oc = _open_clip()
    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise ConfigError(f"embed.kwargs.model_config: file {path} not found (model {model!r})")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"embed.kwargs.model_config {path} is not valid JSON: {e}") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ConfigError(f"embed.kwargs.model_config {path} lacks the OpenCLIP keys {missing}")
        if path.stem != model:
            raise ConfigError(f"embed.kwargs.model_config {path} defines model {path.stem!r} "
                              f"(its file name) but embed.model is {model!r}")
        if oc.get_model_config(model) != cfg:
            oc.add_model_config(path)
    if model not in oc.list_models():
        names = oc.list_models()
        close = difflib.get_close_matches(model, names, n=6, cutoff=0.3) or names[:6]
        raise ConfigError(f"unknown OpenCLIP model {model!r} (embed.model); e.g. {', '.join(close)} "
                          f"({len(names)} known: open_clip.list_models()); a custom architecture needs "
                          f"embed.kwargs.model_config=<path to {model}.json>")


def resolve_checkpoint(model: str, pretrained: str, cache_dir: Optional[str] = None) -> tuple[Optional[str], dict]:
    """``pretrained`` -> (checkpoint file or None for ``random``, the tag's preprocess overrides).

    A tag is downloaded (or found in the cache); a path must be an existing file.
    """
    oc = _open_clip()
    if pretrained == RANDOM:
        return None, {}
    tag_cfg = oc.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        model_cfg = oc.get_model_config(model) or {}
        if bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
            raise ConfigError(f"OpenCLIP tag {pretrained!r} was trained with quick_gelu="
                              f"{tag_cfg.get('quick_gelu', False)} but model {model!r} uses the other "
                              f"activation; use model {model + '-quickgelu'!r} or another tag")
        try:
            path = oc.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as e:  # network errors come in many types (requests, hf_hub, urllib)
            raise ConfigError(
                f"could not download the OpenCLIP weights {model!r} / {pretrained!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); without internet, "
                f"download the checkpoint elsewhere and set embed.pretrained to the local file"
            ) from None
        if not path or not os.path.isfile(path):
            raise ConfigError(f"OpenCLIP tag {pretrained!r} of model {model!r} resolved to no file ({path!r})")
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color", "size")
        return str(path), {k: tag_cfg[k] for k in keys if k in tag_cfg}
    if not os.path.isfile(pretrained):
        looks_like_path = os.sep in pretrained or "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)
        if looks_like_path:
            raise ConfigError(f"embed.kwargs.pretrained: checkpoint file {pretrained} not found "
                              f"(OpenCLIP model {model!r})")
        tags = oc.list_pretrained_tags_by_model(model)
        raise ConfigError(f"embed.kwargs.pretrained {pretrained!r} is neither an OpenCLIP tag of model "
                          f"{model!r} (tags: {', '.join(tags) or 'none'}) nor an existing checkpoint file; "
                          f"'{RANDOM}' gives randomly initialised weights")
    return pretrained, {}


def load_model(model: str, checkpoint: Optional[str], preprocess_overrides: dict,
               device: torch.device, cache_dir: Optional[str] = None) -> torch.nn.Module:
    """Build OpenCLIP ``model`` (fp32, eval mode) on ``device`` and load ``checkpoint`` strictly."""
    oc = _open_clip()
    try:
        net = oc.create_model(model, pretrained=checkpoint, device=device, precision="fp32",
                              force_preprocess_cfg=preprocess_overrides or None, cache_dir=cache_dir,
                              weights_only=True)
    except Exception as e:  # strict load_state_dict, safetensors header, torch.load unpickling errors
        if checkpoint is None:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        detail = " ".join(str(e).split())[:400]
        raise ConfigError(f"checkpoint {checkpoint} does not fit OpenCLIP model {model!r} "
                          f"({type(e).__name__}: {detail or first})") from None
    return net.eval()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 (fp16 without bf16 support) on a GPU, fp32 on the CPU; fp16 needs a GPU."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"embed.kwargs.precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("embed.kwargs.precision 'fp16' needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@EMBEDDERS.register("open_clip")
class OpenClipEmbedder(Embedder):
    """OpenCLIP image features (L2-normalised) plus averaged class-prompt text features.

    Parameters
    ----------
    model : str
        OpenCLIP architecture name (``open_clip.list_models()``), or the name of ``model_config``.
    pretrained : str
        OpenCLIP tag, local checkpoint path, or ``"random"``.
    model_config : str, optional
        Path of a custom OpenCLIP model config JSON named ``<model>.json``.
    templates : list of str, optional
        Prompt templates with one ``{}`` for the class name; default :data:`DEFAULT_TEMPLATES`.
    precision : "auto" | "fp32" | "bf16" | "fp16"
    cache_dir : str, optional
        Download cache of tagged weights (OpenCLIP's default when None).
    device : "auto" | "cpu" | "cuda"  (``embed.device``)
    transform_batch_size : int  (``embed.batch_size``)
    random_state : int
        Unused (inference only); kept for the common method signature.
    """

    requires = ("images",)

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str = "laion2b_s34b_b79k",
        model_config: Optional[str] = None,
        templates: Optional[Sequence[str]] = None,
        precision: str = "auto",
        cache_dir: Optional[str] = None,
        device: str = "auto",
        transform_batch_size: int = 512,
        random_state: int = 0,
    ):
        self.model = model
        self.pretrained = pretrained
        self.model_config = model_config
        self.templates = templates
        self.precision = precision
        self.cache_dir = cache_dir
        self.device = device
        self.transform_batch_size = transform_batch_size
        self.random_state = random_state

    @classmethod
    def resolve_kwargs(cls, kwargs: dict[str, Any], resolve: Callable[[str], Any]) -> dict[str, Any]:
        out = dict(kwargs)
        if out.get("model_config"):
            out["model_config"] = str(resolve(out["model_config"]))
        if out.get("cache_dir"):
            out["cache_dir"] = str(resolve(out["cache_dir"]))
        pre = out.get("pretrained")
        if isinstance(pre, str) and pre != RANDOM:
            # a tag stays a tag; anything path-like (or an existing file) is project-relative
            candidate = resolve(pre)
            if os.sep in pre or "/" in pre or pre.endswith(CHECKPOINT_SUFFIXES) or candidate.is_file():
                out["pretrained"] = str(candidate)
        return out

    # ---- loading -------------------------------------------------------------------------------
    def _checkpoint(self) -> tuple[Optional[str], dict]:
        if not hasattr(self, "_resolved"):
            _register_config(self.model, self.model_config)
            self._resolved = resolve_checkpoint(self.model, self.pretrained, self.cache_dir)
        return self._resolved

    def identity(self) -> dict[str, Any]:
        checkpoint, _ = self._checkpoint()
        if not hasattr(self, "_sha256"):
            self._sha256 = file_digest(checkpoint) if checkpoint else None
        cfg = _open_clip().get_model_config(self.model)
        return {"checkpoint_sha256": self._sha256, "model_cfg": cfg, "open_clip": _open_clip().__version__}

    def _templates(self) -> list[str]:
        templates = list(self.templates) if self.templates is not None else list(DEFAULT_TEMPLATES)
        if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
            raise ConfigError(f"embed.kwargs.templates must be a non-empty list of strings with one '{{}}' "
                              f"for the class name; got {templates!r}")
        return templates

    def _load(self) -> "OpenClipEmbedder":
        dev = torch_device(self.device)
        self.precision_ = resolve_precision(self.precision, dev)
        self.templates_ = self._templates()
        checkpoint, overrides = self._checkpoint()
        ident = self.identity()
        self.model_ = load_model(self.model, checkpoint, overrides, dev, self.cache_dir)
        self.preprocess_cfg_ = dict(_open_clip().get_model_preprocess_cfg(self.model_))
        self.dim_ = int(ident["model_cfg"]["embed_dim"])
        self.device_ = str(dev)
        self.info_ = {
            "features": "OpenCLIP image embeddings" + (
                " of RANDOMLY INITIALISED weights (pretrained='random')" if checkpoint is None else ""),
            "fitted_on": "none (pretrained encoder)",
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint": checkpoint,
            "checkpoint_sha256": ident["checkpoint_sha256"],
            "precision": self.precision_,
            "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg_.items()},
            "templates": self.templates_,
        }
        return self

    def fit(self, images: np.ndarray, labels: Optional[np.ndarray] = None,
            n_classes: Optional[int] = None) -> "OpenClipEmbedder":
        """Load the model; the images are not used (the encoder is pretrained)."""
        return self._load()

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"checkpoint_sha256": self.info_["checkpoint_sha256"]}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "OpenClipEmbedder":
        self._load()
        if meta.get("checkpoint_sha256") != self.info_["checkpoint_sha256"]:
            raise ConfigError(f"checkpoint {self.info_['checkpoint']} changed while the embed stage was "
                              f"running (sha256 differs from the first run's); rerun the 'embed' stage")
        return self

    # ---- encoding ------------------------------------------------------------------------------
    def preprocess(self, block: np.ndarray) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 -> ``(B, 3, S, S)`` float32 model input on the model's device."""
        cfg = self.preprocess_cfg_
        return preprocess(block, cfg["size"], cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"),
                          cfg.get("resize_mode", "shortest"), cfg.get("fill_color", 0),
                          device=torch.device(self.device_))

    def _embed(self, block: np.ndarray) -> np.ndarray:
        dev = torch.device(self.device_)
        with torch.inference_mode():
            x = self.preprocess(block)  # in float32: resize/normalise outside autocast
            with autocast(dev, self.precision_):
                feats = self.model_.encode_image(x)
        return feats.float().cpu().numpy()

    def encode_classes(self, names: Sequence[str]) -> np.ndarray:
        """Class-prompt text embeddings: each template filled with each name, encoded, L2-normalised,
        averaged over the templates and normalised again (CLIP's prompt ensembling).

        Parameters
        ----------
        names : C class names, ``names[c]`` is class label c

        Returns
        -------
        (C, dim_) float32 array with unit-norm rows.
        """
        dev = torch.device(self.device_)
        prompts = [t.format(name) for name in names for t in self.templates_]
        tokenizer = _open_clip().get_tokenizer(self.model)
        step = max(1, int(self.transform_batch_size))
        out = []
        with torch.inference_mode(), autocast(dev, self.precision_):
            for s in range(0, len(prompts), step):
                tokens = tokenizer(prompts[s : s + step]).to(dev)
                out.append(self.model_.encode_text(tokens).float().cpu().numpy())
        per_prompt = l2_normalise(np.concatenate(out)).reshape(len(names), len(self.templates_), -1)
        return l2_normalise(per_prompt.mean(axis=1))
