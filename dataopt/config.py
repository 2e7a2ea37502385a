"""``params.yaml`` as pydantic models: one section per stage plus ``tracking`` and ``orchestration``.

Every model forbids unknown keys. Errors are raised as :class:`dataopt.errors.ConfigError` with one
readable line per problem that lists the valid keys.

A pure schema: it imports pydantic and yaml, no method family (so no torch), and does not know which
methods exist. Method names and their kwargs are checked in a second step, after the plug-ins are
loaded: :func:`dataopt.plugins.check_methods`.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dataopt import registry
from dataopt.errors import ConfigError

# a value of the keys listed in dataopt.profiles.AUTO_KEYS: chosen per machine and dataset size. The
# shipped params.yaml writes them `auto`; a params file (or a Params()) that leaves them out gets the
# defaults below, which are the `standard` profile
AUTO = "auto"
AutoFloat = Union[Literal["auto"], Annotated[float, Field(gt=0)]]
AutoDecay = Union[Literal["auto"], Annotated[float, Field(ge=0)]]

STAGE_SECTIONS = ("ingest", "embed", "perceive", "analyze", "optimize", "train", "evaluate")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoiseParams(Section):
    """Synthetic label noise injected into the training split (benchmarks only)."""

    kind: Literal["none", "symmetric", "pair"] = "none"
    rate: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0


class IngestParams(Section):
    source: str = "sklearn_digits"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    image_column: str = "image"
    path_column: Optional[str] = None
    label_column: str = "label"
    eval_label_column: Optional[str] = None
    label_name_column: Optional[str] = "label_name"
    clean_label_column: Optional[str] = None
    id_column: Optional[str] = None
    classes: Optional[list[str]] = None
    max_classes: int = Field(1000, ge=2)  # more classes (declared or inferred) stop ingest with one message
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: Optional[int] = Field(None, ge=4, le=1024)
    max_pixels: int = Field(50_000_000, gt=0)
    max_quarantine_fraction: float = Field(0.5, ge=0.0, le=1.0)
    limit: Optional[int] = Field(None, gt=0)
    batches: list[str] = []  # names of batches in data/manifest.json added to the train split
    batch_holdout: float = Field(0.2, ge=0.0, lt=1.0)  # share of each batch's classes held out (split "holdout")
    noise: NoiseParams = NoiseParams()


class EmbedParams(Section):
    backend: str = "pixels"
    # the two settings every model-based backend has, as first-class keys (e.g. open_clip:
    # `--set embed.model=ViT-B-32 --set embed.pretrained=ckpt.safetensors`); merged into kwargs
    model: Optional[str] = None
    pretrained: Optional[str] = None
    kwargs: dict[str, Any] = {}
    knn_k: int = Field(10, ge=1, le=1000)
    knn_dim: Optional[int] = Field(512, ge=1)  # search among this many principal components of wider embeddings
    knn_exact_max: int = Field(100_000, ge=0)  # exact faiss search up to this many train rows, IVF above
    knn_nlist: Optional[int] = Field(None, ge=1)  # IVF lists; None = ~4 sqrt(n_train)
    knn_nprobe: int = Field(32, ge=1)  # IVF lists visited per query
    knn_device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = a GPU when faiss or torch sees one
    near_duplicate_threshold: float = Field(0.1, ge=0.0)  # Euclidean kNN distance of a near duplicate
    batch_size: int = Field(512, ge=1)  # rows embedded per block (bounds memory), not a training batch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_size: int = Field(4096, ge=1)  # rows per shard file: the unit of resume and of scale-out
    keep_shards: bool = False  # keep artifacts/embed/shards/<fingerprint>/ after the final assembly

    @model_validator(mode="after")
    def _backend(self) -> "EmbedParams":
        for key in ("model", "pretrained"):
            if getattr(self, key) is not None and key in self.kwargs:
                raise ValueError(f"{key} is given twice (embed.{key} and embed.kwargs.{key}); keep one")
        return self

    def backend_kwargs(self) -> dict[str, Any]:
        """``kwargs`` plus ``model`` / ``pretrained`` when set (checked against the backend)."""
        extra = {k: getattr(self, k) for k in ("model", "pretrained") if getattr(self, k) is not None}
        return {**self.kwargs, **extra}


class PerceiveParams(Section):
    model: str = "head"  # head (on embeddings) | cnn (= small_cnn) | a MODELS name (on pixels)
    hidden: int = Field(0, ge=0)  # head: 0 = linear, else one hidden layer of this width
    width: int = Field(16, ge=4)  # image models: width (ignored by models without one)
    folds: int = Field(4, ge=2, le=20)
    epochs: int = Field(12, ge=1)
    early_epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: AutoFloat = 0.05
    weight_decay: AutoDecay = 5e-4
    augment: Literal["none", "crop", "flip_crop"] = "none"  # image models only
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    max_seconds: Optional[float] = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    signals: Optional[list[str]] = None  # null = every registered signal
    signal_kwargs: dict[str, dict[str, Any]] = {}  # signal name -> its hyper-parameters

    @model_validator(mode="after")
    def _early(self) -> "PerceiveParams":
        if self.early_epochs > self.epochs:
            raise ValueError(f"early_epochs ({self.early_epochs}) must be <= epochs ({self.epochs})")
        if self.model == "head" and self.augment != "none":
            raise ValueError(f"augment={self.augment!r} needs an image model; model 'head' trains on "
                             "embeddings (use augment: none)")
        return self


class AnalyzeParams(Section):
    detector: str = "calibrated_confidence"
    kwargs: dict[str, Any] = {}
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # "agreement": a sample whose out-of-fold prediction equals its label is clean (p_clean = 1),
    # the mixture decides the rest; "none": the mixture posterior alone (see dataopt/stages/analyze.py)
    gate: Literal["agreement", "none"] = "agreement"
    outlier_z: float = Field(3.5, gt=0.0)  # robust z-score of kNN density rho above which a sample is an outlier
    duplicate_distance: float = Field(0.1, ge=0.0)  # nearest-neighbour distance at or below which: near duplicate
    plot_points: int = Field(5000, ge=10)  # points in the 2-D projection plot (seeded subsample)

    @model_validator(mode="after")
    def _detector(self) -> "AnalyzeParams":
        if "random_state" in self.kwargs:
            raise ValueError("kwargs.random_state: the detector is seeded from the top-level seed")
        return self


# optimize.steps families -> registry names (dataopt.registry)
OPTIMIZE_FAMILIES = {"resample": "RESAMPLERS", "weight": "WEIGHTERS", "perturb": "PERTURBERS",
                     "augment": "AUGMENTERS", "prune": "SELECTORS"}


class OptimizeStep(Section):
    """One step of ``optimize.steps``: ``{family, method, kwargs}`` (+ ``ratio`` or ``n_keep`` for prune)."""

    family: str
    method: str
    kwargs: dict[str, Any] = {}
    ratio: Optional[float] = Field(None, gt=0.0, le=1.0)  # prune: share of the ORIGINAL train set kept
    n_keep: Optional[int] = Field(None, ge=1)  # prune: count of the original train set kept

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ConfigError(f"optimize.steps: each step is a mapping like {{family: prune, method: "
                              f"moderate, ratio: 0.5}}, got {data!r}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"optimize.steps: unknown step key(s) {unknown}; valid: "
                              f"{', '.join(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _step(self) -> "OptimizeStep":
        where = f"optimize.steps ({self.family} {self.method})"
        if self.family not in OPTIMIZE_FAMILIES:
            raise ConfigError(f"optimize.steps: unknown family {self.family!r}; "
                              f"valid: {', '.join(OPTIMIZE_FAMILIES)}")
        for name in ("ratio", "n_keep", "random_state", "keep"):
            if name in self.kwargs:
                raise ConfigError(f"{where}: kwargs.{name} is not a kwarg; "
                                  + ("give it as the step's own key" if name in ("ratio", "n_keep")
                                     else "it is set by the optimize stage"))
        for name in ("ratio", "n_keep"):
            if getattr(self, name) is None:
                continue
            if self.family != "prune":
                raise ConfigError(f"{where}: {name} is only valid for family 'prune'")
        if self.ratio is not None and self.n_keep is not None:
            raise ConfigError(f"{where}: give ratio or n_keep, not both")
        return self


class OptimizeParams(Section):
    method: str = "moderate"
    ratio: float = Field(1.0, gt=0.0, le=1.0)
    kwargs: dict[str, Any] = {}
    weighting: str = "p_clean"
    weighting_kwargs: dict[str, Any] = {}
    # an ordered list of steps across the five families; when given it REPLACES the simple keys above
    steps: Optional[list[OptimizeStep]] = None

    def plan_steps(self) -> list[OptimizeStep]:
        """The steps the stage runs: ``steps``, or the simple keys as [prune method, weight weighting].

        Needs the filled ``SELECTORS`` registry (import :mod:`dataopt.plugins` first)."""
        if self.steps is not None:
            return list(self.steps)
        takes_ratio = "ratio" in registry.hyperparameters(registry.SELECTORS.get(self.method))
        # ratio 1.0 (the default) is "no budget": a threshold selector (noise_filter,
        # semantic_dedup) then applies its threshold; budget selectors keep every candidate either way
        budget = self.ratio if takes_ratio and self.ratio < 1.0 else None
        return [OptimizeStep(family="prune", method=self.method, kwargs=self.kwargs, ratio=budget),
                OptimizeStep(family="weight", method=self.weighting, kwargs=self.weighting_kwargs)]

    @model_validator(mode="after")
    def _methods(self) -> "OptimizeParams":
        if self.steps is not None and len(self.steps) == 0:
            raise ValueError("steps: give at least one step, or null to use method/ratio/weighting")
        # ratio and the seed come from optimize.ratio and the top-level seed, never from kwargs
        for key, kw in (("kwargs", self.kwargs), ("weighting_kwargs", self.weighting_kwargs)):
            for name, where in (("ratio", "optimize.ratio"), ("random_state", "the top-level seed")):
                if name in kw:
                    raise ValueError(f"{key}.{name}: set {where} instead")
        if self.method == "none" and self.ratio != 1.0:
            raise ValueError(f"method 'none' keeps every sample; ratio={self.ratio} needs a selector")
        return self


class DynamicParams(Section):
    """Dynamic data selection: which samples each epoch trains on (``DYNAMIC_SELECTORS``)."""

    method: str = "none"  # none | uniform_full | random | infobatch | density_consistency
    budget: float = Field(1.0, gt=0.0, le=1.0)  # fraction of full-data sample-steps
    kwargs: dict[str, Any] = {}

    @model_validator(mode="after")
    def _method(self) -> "DynamicParams":
        if self.method != "none":
            for name, where in (("budget", "train.dynamic.budget"), ("random_state", "the top-level seed")):
                if name in self.kwargs:
                    raise ValueError(f"kwargs.{name}: set {where} instead")
        elif self.kwargs:
            raise ValueError("kwargs given but method is 'none'")
        return self


class AdaAugmentParams(Section):
    """Adaptive per-sample augmentation magnitude (AdaAugment, paper 001 part three)."""

    enabled: bool = False
    kwargs: dict[str, Any] = {}  # checked against AdaAugment by dataopt.plugins.check_methods


# the forward pass's precision and the flip scheme of train.augment=flip_crop (dataopt.train.loop.fit)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Flip = Literal["random", "alternating"]


class TrainParams(Section):
    model: str = "small_cnn"
    mode: Literal["auto", "image", "head"] = "image"  # head: a classifier on the embed stage's embeddings
    hidden: int = Field(0, ge=0)  # head: hidden units (0 = linear)
    width: int = Field(32, ge=4)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: AutoFloat = 0.05
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: AutoDecay = 5e-4
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: Literal["none", "flip_crop", "crop"] = "none"
    translate: Optional[int] = Field(None, ge=1)  # crop: largest shift in px; null = image width // 8
    lookahead: bool = False  # airbench's weight EMA every 5 steps, used as the final weights
    # auto: bf16 autocast on a GPU, float32 on the CPU; bf16 / fp16 autocast anywhere (fp16: gradient scaler)
    precision: Precision = "auto"
    flip: Flip = "random"  # flip_crop: random (coin per sample and epoch) | alternating (airbench94)
    whiten_bias_epochs: Optional[int] = Field(None, ge=0)  # airbench: train the whitening bias only this long
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dynamic: DynamicParams = DynamicParams()
    adaaugment: AdaAugmentParams = AdaAugmentParams()

    @model_validator(mode="after")
    def _flip(self) -> "TrainParams":
        if self.flip == "alternating" and self.augment != "flip_crop":
            raise ValueError(f"flip: 'alternating' mirrors under augment 'flip_crop'; augment is {self.augment!r}")
        return self


class EvaluateParams(Section):
    ece_bins: int = Field(15, ge=2)
    batch_size: int = Field(1024, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # many/medium/few-shot bands by training-class size (Liu et al. 2019): few < 20 <= medium <= 100 < many
    shot_thresholds: tuple[int, int] = (20, 100)
    # metrics.json of the full-data run that cost ratios are taken against (null: none named)
    reference: Optional[str] = None

    @field_validator("shot_thresholds")
    @classmethod
    def _shots(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"must be two counts t0 <= t1, got {list(v)}")
        return v


class TrackingParams(Section):
    enabled: bool = True
    experiment: str = "dataopt"
    tracking_uri: Optional[str] = None
    log_model: bool = True


class OrchestrationParams(Section):
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: Optional[str] = None
    # tasks (embed shards) the thread runner runs at once: a shard's torch / BLAS work already uses
    # every core, so more threads only add memory (whitened_patches: ~0.6 GB a shard) and thrash
    threads: int = Field(1, ge=1)
    retries: int = Field(1, ge=0)
    retry_delay_seconds: float = Field(1.0, ge=0)
    cache: bool = True
    # one writer per workspace: seconds a second `dataopt run/stage/track` waits for the lock
    # (0 = fail at once naming the holder, -1 = wait as long as it takes)
    lock_timeout: float = Field(0.0, ge=-1)


class ScheduleParams(Section):
    """The continuous loop (``dataopt serve``): where batches land, what starts a retrain, when."""

    incoming: str = "data/incoming"  # landing folder watched for new batches (not versioned: .dvcignore)
    watch_interval: int = Field(60, ge=1)  # seconds between two looks at the landing folder
    # what makes check_drift start retrain: drift (a drift verdict), new_data (rows added since the
    # last training >= min_new_rows), age (hours since the last training >= max_age_hours)
    triggers: list[Literal["drift", "new_data", "age"]] = ["drift"]
    min_new_rows: int = Field(1000, ge=1)
    max_age_hours: Optional[float] = Field(None, gt=0)
    full_retrain_cron: Optional[str] = None  # e.g. "0 3 * * 0": a scheduled full retrain (cron, UTC)
    lock_timeout: float = Field(3600.0, ge=-1)  # seconds a flow waits for the workspace lock, then skips


class DriftParams(Section):
    """The drift check of a batch against the reference (dataopt/drift)."""

    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # per test, and family-wise (Holm) for the verdict
    permutations: int = Field(500, ge=19)  # MMD null draws: p-values down to 1 / (1 + B)
    max_reference: int = Field(2000, ge=10)  # reference rows per check (MMD, classifier; bounds time)
    min_batch: int = Field(50, ge=1)  # smaller batches get no verdict
    # per test: the smallest effect that counts as drift (each test's own scale, 0 = none; see
    # dataopt/drift/result.py): MMD², AUC - 0.5, KS distance, total variation, rate difference
    effect_floor: dict[str, float] = {"mmd": 0.0, "per_class_mmd": 0.0, "classifier": 0.02, "bbsd_ks": 0.05,
                                      "bbsd_chi2": 0.05, "label_shift": 0.05, "label_quality": 0.03,
                                      "image_stats": 0.05}
    tests: list[str] = ["mmd", "classifier", "bbsd_ks", "bbsd_chi2", "label_shift", "per_class_mmd",
                        "label_quality", "image_stats"]
    kwargs: dict[str, dict[str, Any]] = {}  # per test, hyper-parameters over the shared ones
    batch: Optional[str] = None  # the batch the drift stage checks; null: the newest in data/manifest.json


class PromotionParams(Section):
    """The champion/challenger rule of a retrain (dataopt/evaluate/compare.py) and the registry name."""

    min_gain: float = Field(0.0, ge=-1.0, le=1.0)  # least accuracy gain over the champion to promote
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0)  # largest accuracy loss allowed in any one class
    bootstrap: int = Field(2000, ge=100)  # paired bootstrap draws of the gain's interval
    confidence: float = Field(0.95, gt=0.0, lt=1.0)  # of that interval; its low end must be above 0
    registered_model: str = Field("dataopt", min_length=1)  # MLflow registered model name

    def rule(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dataopt.evaluate.compare.decide_promotion` (seed aside)."""
        return {"min_gain": self.min_gain, "max_class_drop": self.max_class_drop, "n_boot": self.bootstrap,
                "confidence": self.confidence}


class Params(Section):
    """The whole of ``params.yaml``."""

    seed: int = 0
    ingest: IngestParams = IngestParams()
    embed: EmbedParams = EmbedParams()
    perceive: PerceiveParams = PerceiveParams()
    analyze: AnalyzeParams = AnalyzeParams()
    optimize: OptimizeParams = OptimizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    drift: DriftParams = DriftParams()
    schedule: ScheduleParams = ScheduleParams()
    promotion: PromotionParams = PromotionParams()

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """``{"train.epochs": 15, ...}`` for tracking."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = ".".join(loc) or "params"
        if e["type"] == "extra_forbidden":
            model = _model_at(loc)
            valid = ", ".join(model.model_fields) if model else "?"
            kind = "section" if len(loc) == 1 else "key"
            lines.append(f"{where}: unknown {kind}; valid: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            ctx = e.get("ctx", {}).get("error")
            if isinstance(ctx, ConfigError):
                msg = str(ctx)
            lines.append(f"{where}: {msg}")
    return "invalid params:\n  " + "\n  ".join(lines)


def validate(raw: dict[str, Any]) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError("invalid params: the top level of params.yaml must be a mapping")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


# bounds on what a user hands the YAML parser: a params file, one --set value
MAX_PARAMS_BYTES = 1_000_000
MAX_OVERRIDE_BYTES = 10_000


class _AliasFound(Exception):
    def __init__(self, line: int):
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases: an alias repeats a node without copying it,
    so a few hundred bytes (billion laughs) expand to gigabytes once validated, dumped or copied."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasFound(event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _safe_yaml(text: str, where: str) -> Any:
    """``text`` parsed without anchors or aliases; any failure is one ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except _AliasFound as exc:
        raise ConfigError(f"{where}: YAML anchors and aliases (&name, *name) are not allowed "
                          f"(line {exc.line}); write the value out") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> ``(["train", "epochs"], 3)`` (value parsed as YAML, no aliases, <= 10 kB)."""
    if "=" not in text:
        raise ConfigError(f"override {text[:200]!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text[:200]!r} has an empty key")
    where = f"override {'.'.join(parts)}"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_OVERRIDE_BYTES:
        raise ConfigError(f"{where}: value is {size} bytes; a --set value may hold at most "
                          f"{MAX_OVERRIDE_BYTES} (put large values in params.yaml)")
    return parts, _safe_yaml(value, where)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A params file (at most 1 MB, no anchors or aliases) as a dict. Raises ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        with open(path, "rb") as f:  # a bounded read: the path may be a pipe or a device
            data = f.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; a params file is a few kB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return _safe_yaml(text, str(path)) or {}


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path``, apply ``--set`` overrides, validate the schema. Raises ConfigError.

    Method names are not checked here: follow with :func:`dataopt.plugins.check_methods`."""
    return validate(apply_overrides(read_yaml(path), overrides))


def set_value_text(text: str, section: str, key: str, value: Any) -> str:
    """``text`` (a params.yaml) with ``section.key`` set to ``value`` (flow-style YAML), editing that one
    line so that every comment of the file stays; the key is added under the section when absent.
    The result is validated (ConfigError when it no longer reads as params)."""

    rendered = json.dumps(value) if not isinstance(value, list) else \
        "[" + ", ".join(json.dumps(v) if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(v)) else str(v) for v in value) + "]"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(rf"{re.escape(section)}:\s*(#.*)?$", ln)), None)
    if start is None:
        raise ConfigError(f"params.yaml has no {section!r} section to set {section}.{key} in")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\S", lines[i])), len(lines))
    pattern = re.compile(rf"^(\s+){re.escape(key)}:\s*([^#\n]*?)(\s*#.*)?$")
    for i in range(start + 1, end):
        m = pattern.match(lines[i].rstrip("\n"))
        if m:
            head, comment = f"{m.group(1)}{key}: {rendered}", (m.group(3) or "").lstrip()
            # the column of the comments around (the line above), so the file stays aligned edit after edit
            above = lines[i - 1].find("#") if i - 1 > start else -1
            column = above if above > 0 else m.start(3) + len(m.group(3)) - len(comment)
            lines[i] = (head.ljust(column - 1) + " " + comment if comment else head) + "\n"
            break
    else:
        lines.insert(start + 1, f"  {key}: {rendered}\n")
    out = "".join(lines)
    validate(yaml.safe_load(out))
    return out
