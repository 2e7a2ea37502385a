"""Every artifact of the pipeline, declared once, and the typed readers and atomic writers stages use.

An artifact is a file (or folder) under ``artifacts/``, named by its path relative to that folder
(``"embed/embeddings.npy"``); the first path part is the stage that writes it. :data:`STAGES` says what
each stage reads and which ``params.yaml`` sections it depends on. Everything else is derived from these
two tables: a stage's inputs and outputs (:func:`inputs`, :func:`outputs`), ``dvc.yaml``
(:func:`dvc_stages`, written by ``dataopt dvc-yaml``), and the staleness check of ``dataopt run`` (which
asks DVC about the stages rendered from here).

Stages open artifacts only through :func:`locate` (or the readers and writers below, which call it).
Inside :func:`stage_context` a read of an artifact the running stage does not declare, or a write of an
artifact another stage owns, raises :class:`ContractError` at once, so a contract drift cannot reach
``dvc.yaml`` unnoticed.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dataopt import io
from dataopt.errors import DataError, MissingArtifactError
from dataopt.paths import Paths
from dataopt.schema import SAMPLES_COLUMNS, TRAIN, check_columns


class ContractError(RuntimeError):
    """A stage touched an artifact against its declaration (a bug in dataopt, not a user error)."""


@dataclass(frozen=True)
class Artifact:
    """One declared output. ``path`` is relative to ``artifacts/``; its first part is the producing stage.

    ``kind``: parquet | npy | npz | json | safetensors | dir | png. ``role``: ``out`` (versioned by DVC), ``metric``
    (headline numbers for ``dvc metrics`` / ``dvc exp show``, kept in git) or ``plot`` (an image
    ``dvc plots show`` renders; it lives inside a ``dir`` out of the same stage).
    """

    path: str
    kind: str
    doc: str
    role: str = "out"

    @property
    def stage(self) -> str:
        return self.path.split("/", 1)[0]


@dataclass(frozen=True)
class Stage:
    """What a stage reads (artifact paths) and the ``params.yaml`` sections its outputs depend on."""

    reads: tuple[str, ...]
    params: tuple[str, ...]
    deps: tuple[str, ...] = ("dataopt",)  # code and raw-data folders (DVC deps outside artifacts/)
    doc: str = ""


_STAGE_NAMES = ("ingest", "embed", "perceive", "analyze", "optimize", "train", "evaluate")
SIDE_STAGES = ("drift",)  # stages beside the chain: `dvc repro` runs them, `dataopt run` does not
_ALL_STAGES = _STAGE_NAMES + SIDE_STAGES


def _a(path: str, kind: str, doc: str, role: str = "out") -> Artifact:
    return Artifact(path, kind, doc, role)


_DECLARED = (
    _a("ingest/samples.parquet", "parquet", "one row per valid sample of both splits (dataopt.schema)"),
    _a("ingest/images.npy", "npy", "decoded uint8 images (N, H, W, 3), row i = samples row i"),
    _a("ingest/quarantine.parquet", "parquet", "rejected inputs and why"),
    _a("ingest/report.json", "json", "counts of every ingest outcome"),
    _a("embed/embeddings.npy", "npy", "float16 (N, d) L2-normalised, row i = samples row i"),
    _a("embed/text_embeddings.npy", "npy", "float16 (n_classes, d) class-prompt embeddings; (0, d) "
       "when the backend has no text tower"),
    _a("embed/proxy_probs.npz", "npz", "the proxy backend's out-of-fold class probabilities; empty "
       "arrays when the backend gives none"),
    _a("embed/knn.npz", "npz", "k nearest train neighbours of every train row (faiss)"),
    _a("embed/meta.json", "json", "backend, model, dims, shards, timings"),
    _a("embed/embedder.safetensors", "safetensors", "the fitted embedder: its state arrays and what "
       "rebuilds it (backend, kwargs, identity); dataopt.embed.run.load_embedder"),
    _a("embed/duplicates.json", "json", "near- and exact-duplicate groups of the train rows"),
    _a("perceive/signals.parquet", "parquet", "train rows: sample_id, label, one column per signal"),
    _a("perceive/dynamics.npz", "npz", "per-epoch out-of-fold loss, margin, correctness, probs"),
    _a("perceive/classes.parquet", "parquet", "per-class summary"),
    _a("perceive/corpus.json", "json", "corpus summary and the signal catalogue"),
    _a("analyze/analysis.parquet", "parquet", "train rows: p_clean, is_label_issue, suggested label"),
    _a("analyze/analysis.json", "json", "estimated noise rate, per-class summary, detector"),
    _a("analyze/plots", "dir", "analysis plots"),
    _a("analyze/plots/loss_mixture.png", "png", "loss histogram with the fitted mixture", "plot"),
    _a("analyze/plots/class_issues.png", "png", "flagged share per class", "plot"),
    _a("analyze/plots/projection.png", "png", "2-D projection of the embeddings, flagged rows marked",
       "plot"),
    _a("analyze/plots/transition_matrix.png", "png", "estimated label transition matrix", "plot"),
    _a("optimize/plan.parquet", "parquet", "train rows: keep, weight, sampling weight, augment "
       "magnitude, new label, reason"),
    _a("optimize/plan.json", "json", "the composed steps, counts, training directives"),
    _a("train/model", "dir", "model.safetensors + config.json"),
    _a("train/history.json", "json", "one row per epoch: loss, samples seen, seconds"),
    _a("evaluate/report.json", "json", "per-class rows, reliability bins, confusion matrix, class names"),
    _a("evaluate/plots", "dir", "evaluation plots"),
    _a("evaluate/plots/training_curve.png", "png", "training loss per epoch (train/history.json)", "plot"),
    _a("evaluate/plots/per_class_accuracy.png", "png", "accuracy per class on the held-out split", "plot"),
    _a("evaluate/plots/reliability.png", "png", "reliability diagram (calibration)", "plot"),
    _a("evaluate/plots/confusion_matrix.png", "png", "confusion matrix on the held-out split", "plot"),
    _a("drift/drift.json", "json", "the batch checked, the verdict with one line per test, every test's "
       "statistic, p-value, effect size and breakdown"),
    _a("drift/plots", "dir", "projection, class shift, p-values, most new-looking rows (empty: no batch)"),
    # written by dataopt.stages.run_stage for every stage
    *(_a(f"{s}/metrics.json", "json", f"headline metrics of {s} (dvc exp show)", "metric")
      for s in _ALL_STAGES),
    *(_a(f"{s}/stage.json", "json", f"every metric {s} returned, its start, end and launcher")
      for s in _ALL_STAGES),
)

ARTIFACTS: dict[str, Artifact] = {a.path: a for a in _DECLARED}
# work folders a stage may keep between attempts (resume), never read by another stage, not versioned
SCRATCH = ("embed/shards",)

# pipeline order; reads name artifacts of earlier stages only
STAGES: dict[str, Stage] = {
    "ingest": Stage(reads=(), params=("seed", "ingest"), deps=("dataopt", "data"),
                    doc="raw source -> validated samples, images, quarantine"),
    "embed": Stage(reads=("ingest/samples.parquet", "ingest/images.npy"), params=("seed", "embed"),
                   doc="images -> embeddings, class-prompt embeddings, kNN graph, the fitted embedder"),
    "perceive": Stage(reads=("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy",
                             "embed/text_embeddings.npy", "embed/knn.npz"),
                      params=("seed", "perceive"), doc="out-of-fold dynamics and per-sample signals"),
    "analyze": Stage(reads=("ingest/samples.parquet", "embed/embeddings.npy", "embed/knn.npz",
                            "perceive/signals.parquet", "perceive/dynamics.npz"),
                     params=("seed", "analyze"), doc="p_clean and label-issue flags"),
    "optimize": Stage(reads=("ingest/samples.parquet", "embed/embeddings.npy", "embed/text_embeddings.npy",
                             "embed/knn.npz", "perceive/signals.parquet", "perceive/dynamics.npz",
                             "analyze/analysis.parquet"),
                      params=("seed", "optimize"), doc="the plan: keep, weight, augment, relabel"),
    "train": Stage(reads=("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy",
                          "perceive/signals.parquet", "optimize/plan.parquet", "optimize/plan.json"),
                   params=("seed", "train"), doc="a model trained on the plan"),
    "evaluate": Stage(reads=("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy",
                             "train/model", "train/history.json"),
                      params=("evaluate",), doc="the model on the held-out split, and its cost"),
    "drift": Stage(reads=("ingest/samples.parquet", "ingest/images.npy", "embed/embeddings.npy",
                          "embed/embedder.safetensors"),
                   params=("seed", "ingest", "analyze.detector", "analyze.kwargs", "drift"),
                   deps=("dataopt", "data"), doc="the newest batch against the reference: drift tests, verdict"),
}
ORDER = _STAGE_NAMES  # the curation chain, in order
assert tuple(STAGES) == _ALL_STAGES


def outputs(stage: str) -> tuple[str, ...]:
    """Every artifact ``stage`` writes (its metrics.json included), in declaration order."""
    return tuple(p for p, a in ARTIFACTS.items() if a.stage == stage)


def inputs(stage: str) -> tuple[str, ...]:
    return STAGES[stage].reads


def params(stage: str) -> tuple[str, ...]:
    return STAGES[stage].params


# --- access control -------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dataopt_stage", default=None)


@dataclass
class AccessLog:
    """What the stages inside :func:`recording` opened: ``(stage, path, mode)`` triples."""

    events: list[tuple[Optional[str], str, str]] = field(default_factory=list)

    def paths(self, stage: str, mode: str) -> set[str]:
        return {p for s, p, m in self.events if s == stage and m == mode}


_LOG: contextvars.ContextVar[Optional[AccessLog]] = contextvars.ContextVar("dataopt_access", default=None)


@contextlib.contextmanager
def stage_context(stage: str) -> Iterator[None]:
    """Enforce ``stage``'s declaration on every :func:`locate` inside the block."""
    token = _CURRENT.set(stage)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[AccessLog]:
    """Record every :func:`locate` inside the block (the contract test)."""
    log = AccessLog()
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


def locate(paths: Paths, path: str, mode: str = "r") -> Path:
    """The file of artifact ``path`` for reading (``"r"``: must exist) or writing (``"w"``: parent made).

    Raises ContractError for an undeclared artifact or, inside :func:`stage_context`, for a read the stage
    does not declare or a write of another stage's artifact; MissingArtifactError (a user error naming the
    stage to run) when an input is absent.
    """
    art = ARTIFACTS.get(path)
    if art is None:
        raise ContractError(f"{path!r} is not declared in dataopt/artifacts.py")
    stage = _CURRENT.get()
    if stage is not None:
        if mode == "r" and art.stage != stage and path not in STAGES[stage].reads:
            raise ContractError(f"stage {stage!r} reads {path}, which dataopt/artifacts.py does not "
                                f"list among its reads")
        if mode == "w" and art.stage != stage:
            raise ContractError(f"stage {stage!r} writes {path}, an artifact of stage {art.stage!r}")
    log = _LOG.get()
    if log is not None:
        log.events.append((stage, path, mode))
    file = paths.artifacts / path
    if mode == "r":
        if not file.exists():
            raise MissingArtifactError(f"{file} is missing: run the {art.stage!r} stage first "
                                       f"(dataopt stage {art.stage})")
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
    return file


def scratch(paths: Paths, path: str) -> Path:
    """A declared work folder of the running stage (see :data:`SCRATCH`), created on demand."""
    stage = _CURRENT.get()
    if path not in SCRATCH or (stage is not None and path.split("/", 1)[0] != stage):
        raise ContractError(f"{path!r} is not a scratch folder of stage {stage!r} in dataopt/artifacts.py")
    folder = paths.artifacts / path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# temp files of io.atomic_path: .<name>.<random><suffix>
TEMP_FILE = re.compile(r"^\.(.+)\.[^./]+\.[^./]+$")


def remove_stale_temps(paths: Paths, stage: str) -> list[Path]:
    """Delete the temp files a killed run of ``stage`` left beside its artifacts (a writer holding the
    workspace lock is the only one, so no live write owns them); returns what was removed."""
    folder = paths.artifacts / stage
    stale = [f for f in folder.rglob(".*") if f.is_file() and TEMP_FILE.match(f.name)] \
        if folder.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


# --- typed readers --------------------------------------------------------------------------------

def read_table(paths: Paths, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return pq.read_table(locate(paths, path), columns=columns)


def read_schema(paths: Paths, path: str) -> pa.Schema:
    return pq.read_schema(locate(paths, path))


def read_frame(paths: Paths, path: str, columns: Optional[list[str]] = None):
    """A Parquet artifact as a pandas DataFrame."""
    return read_table(paths, path, columns).to_pandas()


def load_npy(paths: Paths, path: str, mmap: bool = True) -> np.ndarray:
    return io.load_npy(locate(paths, path), mmap=mmap)


def load_npz(paths: Paths, path: str) -> dict[str, np.ndarray]:
    with np.load(locate(paths, path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_json(paths: Paths, path: str) -> Any:
    return io.read_json(locate(paths, path))


def read_samples(paths: Paths, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of ``ingest/samples.parquet`` as numpy arrays (nulls -> None objects); DataError naming a
    missing column."""
    file = locate(paths, "ingest/samples.parquet")
    check_columns(file, {c: SAMPLES_COLUMNS.get(c, "") for c in columns})
    table = pq.read_table(file, columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def read_train_signals(paths: Paths, signal_columns: dict[str, str]
                       ) -> tuple[Any, Any, int]:
    """Train rows of samples.parquet and signals.parquet, checked to be aligned row by row.

    Parameters
    ----------
    paths : Paths
    signal_columns : mapping
        Columns signals.parquet must have (a DataError names the missing ones).

    Returns
    -------
    samples : DataFrame (n_train rows): sample_id, label, label_name, label_clean, and ``row``
        (the position in samples.parquet, i.e. the row of embeddings.npy)
    signals : DataFrame (n_train rows), every signal column
    n_samples : int
        Rows of samples.parquet (both splits).
    """
    samples_path = locate(paths, "ingest/samples.parquet")
    signals_path = locate(paths, "perceive/signals.parquet")
    check_columns(signals_path, signal_columns)
    samples = pq.read_table(
        samples_path, columns=["sample_id", "split", "label", "label_name", "label_clean"]
    ).to_pandas()
    n_samples = len(samples)
    samples["row"] = np.arange(n_samples)
    samples = samples[samples["split"] == TRAIN].reset_index(drop=True)
    signals = pq.read_table(signals_path).to_pandas()
    ids, sig_ids = samples["sample_id"].to_numpy(), signals["sample_id"].to_numpy()
    if ids.shape != sig_ids.shape or not np.array_equal(ids, sig_ids):
        n = min(ids.size, sig_ids.size)
        first = np.flatnonzero(ids[:n] != sig_ids[:n])
        where = f"first difference at row {first[0]}" if first.size else "different lengths"
        raise DataError(
            f"{signals_path} does not match the {ids.size} train rows of {samples_path} "
            f"({sig_ids.size} rows, {where}); re-run the perceive stage"
        )
    stale = np.flatnonzero(samples["label"].to_numpy() != signals["label"].to_numpy())
    if stale.size:  # same samples, other labels (e.g. new injected noise): signals are out of date
        raise DataError(
            f"{signals_path}: label differs from {samples_path} for {stale.size} train rows "
            f"(first sample_id {ids[stale[0]]}); re-run the perceive stage"
        )
    return samples, signals, n_samples


def read_aligned(paths: Paths, path: str, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """A per-train-row ``.npz`` artifact (it has a ``sample_id`` array), checked to cover the train rows
    of samples.parquet in order."""
    arrays = load_npz(paths, path)
    if not np.array_equal(arrays["sample_id"], sample_id):
        raise DataError(f"{path} does not match the train rows of samples.parquet: rerun the "
                        f"'{ARTIFACTS[path].stage}' stage")
    return arrays


def read_text_embeddings(paths: Paths) -> Optional[np.ndarray]:
    """``embed/text_embeddings.npy`` as float32 ``(n_classes, d)``, or None when the backend has no text
    tower (the file then holds ``(0, d)``)."""
    text = io.load_npy(locate(paths, "embed/text_embeddings.npy"))
    return np.asarray(text, np.float32) if len(text) else None


def read_images(paths: Paths, n_rows: int) -> np.ndarray:
    """``ingest/images.npy`` memory-mapped, checked against ``samples.parquet``'s row count."""
    file = locate(paths, "ingest/images.npy")
    images = io.load_npy(file)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{file}: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != n_rows:
        raise DataError(f"{file} has {len(images)} rows but samples.parquet has {n_rows}: rerun the "
                        "'ingest' stage")
    return images


# --- atomic writers -------------------------------------------------------------------------------

def write_table(paths: Paths, path: str, table: Any) -> None:
    io.write_parquet(locate(paths, path, "w"), table)


def save_npy(paths: Paths, path: str, array: np.ndarray) -> None:
    io.save_npy(locate(paths, path, "w"), array)


def save_npz(paths: Paths, path: str, **arrays: np.ndarray) -> None:
    io.save_npz(locate(paths, path, "w"), **arrays)


def write_json(paths: Paths, path: str, obj: Any) -> None:
    io.write_json(locate(paths, path, "w"), obj)


def out_dir(paths: Paths, path: str) -> Path:
    """A ``dir`` artifact, created empty (old contents removed) for the stage to fill."""
    folder = locate(paths, path, "w")
    if ARTIFACTS[path].kind != "dir":
        raise ContractError(f"{path} is a {ARTIFACTS[path].kind}, not a dir")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# --- dvc.yaml -------------------------------------------------------------------------------------

DVC_HEADER = """\
# GENERATED from dataopt/artifacts.py by `dataopt dvc-yaml`: edit the declarations there, not this file
# (tests/test_contract.py fails when the two differ). Each stage runs `dataopt stage <name>`, the same
# code as the Prefect flow (`dataopt run`); the last stage, track, logs one MLflow run per
# `dvc repro` / `dvc exp run`.
"""

TRACK_DEPS = ("tasks/tracking.py", "tasks/mlflow_model.py")
# what `dataopt track` logs: every metric, report and folder, and the dataset digest's table
TRACK_READS = tuple(p for p, a in ARTIFACTS.items() if a.kind in ("json", "dir") and a.stage in ORDER) + (
    "ingest/samples.parquet", "ingest/quarantine.parquet")


def dvc_stages() -> dict[str, Any]:
    """The ``stages:`` and ``plots:`` of ``dvc.yaml``, derived from :data:`ARTIFACTS` and :data:`STAGES`."""
    stages: dict[str, Any] = {}
    for name, st in STAGES.items():
        outs = [p for p in outputs(name) if ARTIFACTS[p].role == "out"]
        metrics = [p for p in outputs(name) if ARTIFACTS[p].role == "metric"]
        stages[name] = {
            "cmd": f"dataopt stage {name}",
            "deps": [*st.deps, *(f"artifacts/{p}" for p in st.reads)],
            "params": list(st.params),
            "outs": [f"artifacts/{p}" for p in outs],
            "metrics": [{f"artifacts/{p}": {"cache": False}} for p in metrics],
        }
    stages["track"] = {
        "cmd": "dataopt track",
        "deps": [*TRACK_DEPS, *(f"artifacts/{p}" for p in TRACK_READS)],
        "params": ["seed", *ORDER, "tracking"],
        "outs": [{"artifacts/track/run.json": {"cache": False}}],
    }
    plots = [f"artifacts/{p}" for p, a in ARTIFACTS.items() if a.role == "plot"]
    return {"stages": stages, "plots": plots}


def dvc_yaml() -> str:
    return DVC_HEADER + yaml.safe_dump(dvc_stages(), sort_keys=False, width=110)


def batch_summary(paths: Paths, sample_id: Any, **columns: Any) -> dict[str, dict[str, float]]:
    """Per batch of origin (samples.parquet's ``batch``: "reference" or a batch name) of the rows
    ``sample_id``: their count and, per named column (bool or float array aligned with
    ``sample_id``), the sum and the mean. Empty when samples.parquet has no ``batch`` column."""
    if "batch" not in read_schema(paths, "ingest/samples.parquet").names:
        return {}
    s = read_table(paths, "ingest/samples.parquet", ["sample_id", "batch"]).to_pandas()
    origin = s.set_index("sample_id")["batch"].reindex(np.asarray(sample_id)).to_numpy()
    out: dict[str, dict[str, float]] = {}
    for b in dict.fromkeys(origin.tolist()):
        rows = origin == b
        entry: dict[str, float] = {"n": int(rows.sum())}
        for name, values in columns.items():
            v = np.asarray(values, dtype=np.float64)[rows]
            entry[f"{name}_sum"], entry[f"{name}_mean"] = float(v.sum()), float(v.mean()) if len(v) else 0.0
        out[str(b)] = entry
    return out
