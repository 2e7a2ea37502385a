"""evaluate stage: the trained model on the held-out (test) split, and what its training cost.

Returns the flat metrics (``run_stage`` writes the headline ones to ``metrics.json`` and all to
``stage.json``) and writes ``artifacts/evaluate/report.json``: ``per_class`` (rows ``{class, accuracy,
train_count, shot}``), ``reliability`` (rows per confidence bin) and ``confusion`` (counts, rows =
true class); and ``artifacts/evaluate/plots/``: ``confusion_matrix.png``, ``per_class_accuracy.png``,
``reliability.png`` and ``training_curve.png`` (from ``train/history.json``).

Inputs. An image model is evaluated on ``ingest/images.npy``; a head (model config ``input.kind ==
"embedding"``, :func:`dataopt.train.head.train_head`) on the test rows of ``embed/embeddings.npy``.
An image model never opens the embeddings, so it evaluates without an embed stage; the embeddings are
still a declared input (and DVC dependency), as a head reads them.

The metrics (accuracy, calibration, per-class and many/medium/few-shot accuracy, training cost and
its ratios to a full-data and to a reference run) are :func:`dataopt.evaluate.run.evaluate`'s. The
reference (``evaluate.reference``: the metrics.json of a full-data run, relative to the project root;
keys it lacks are read from the ``stage.json`` beside it) is read here.

A batch's held-out rows (split ``holdout``, ``ingest.batch_holdout``) are scored apart, never in the
headline: ``holdout_accuracy.<batch>`` and ``n_holdout.<batch>`` (``stage.json``, MLflow), only when
there are some.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch

from dataopt import artifacts as art
from dataopt.config import Params
from dataopt.errors import DataError
from dataopt.evaluate.run import REFERENCE_KEYS, class_names, evaluate, write_plots
from dataopt.io import read_json
from dataopt.paths import Paths
from dataopt.schema import HOLDOUT, TEST, TRAIN
from dataopt.train import loop
from dataopt.train.checkpoint import load_model

__all__ = ["REFERENCE_KEYS", "run"]


def _reference(ep: Any, paths: Paths) -> dict[str, float] | None:
    """The cost and accuracy of the run ``evaluate.reference`` names (None when it names none)."""
    if ep.reference is None:
        return None
    path = paths.resolve(ep.reference)
    try:
        ref = read_json(path)
    except FileNotFoundError:
        problem = "does not exist"
    except (OSError, ValueError) as exc:
        problem = f"is not a readable JSON file ({exc})"
    else:
        beside = path.parent / "stage.json"  # a headline-only metrics.json: the rest is in stage.json
        if isinstance(ref, dict) and beside.is_file() and not set(REFERENCE_KEYS) <= set(ref):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                ref = {**read_json(beside)["metrics"], **ref}
        try:
            return {k: float(ref[k]) for k in REFERENCE_KEYS}
        except (KeyError, TypeError, ValueError, IndexError):
            problem = f"is not an evaluate metrics.json with numbers {', '.join(REFERENCE_KEYS)}"
    raise DataError(f"evaluate.reference: {path} {problem}; name the metrics.json of a full-data "
                    "run, or set evaluate.reference to null")


def _inputs(config: dict, paths: Paths, test: np.ndarray, n_rows: int, device: torch.device) -> torch.Tensor:
    """The test rows as model input: uint8 images, or float32 embeddings for a head."""
    if (config.get("input") or {}).get("kind") == "embedding":
        emb = art.load_npy(paths, "embed/embeddings.npy")
        dim = config["input"].get("dim")
        if emb.ndim != 2 or len(emb) != n_rows or (dim is not None and emb.shape[1] != dim):
            raise DataError(f"embed/embeddings.npy: shape {emb.shape} does not fit samples.parquet's "
                            f"{n_rows} rows and the head's input dim {dim}; re-run the 'embed' and "
                            "'train' stages")
        return torch.from_numpy(np.asarray(emb[test], dtype=np.float32)).to(device)
    return loop.images_to_tensor(art.read_images(paths, n_rows)[test], device)


def batch_accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: np.ndarray, batch: np.ndarray,
                   batch_size: int) -> dict[str, Any]:
    """``holdout_accuracy.<batch>`` and ``n_holdout.<batch>``: ``model`` on each batch's held-out rows,
    against the batch's own labels (noisy where the batch's labels are)."""
    hit = loop.predict_logits(model, inputs, batch_size).argmax(1).cpu().numpy() == labels
    out: dict[str, Any] = {}
    for b in dict.fromkeys(batch.tolist()):
        out[f"holdout_accuracy.{b}"], out[f"n_holdout.{b}"] = float(hit[batch == b].mean()), int((batch == b).sum())
    return out


def run(params: Params, paths: Paths) -> dict[str, Any]:
    t0 = time.perf_counter()
    samples_path = art.locate(paths, "ingest/samples.parquet")
    ep = params.evaluate
    device = loop.resolve_device(ep.device, key="evaluate.device")
    reference = _reference(ep, paths)  # a bad reference fails before any work
    model, config = load_model(art.locate(paths, "train/model"), device)
    n_classes = len(class_names(config))

    samples = art.read_frame(paths, "ingest/samples.parquet", ["split", "label"])
    split = samples["split"].to_numpy()
    labels = samples["label"].to_numpy(np.int64)
    test = np.flatnonzero(split == TEST)
    if len(test) == 0:
        raise DataError(f"{samples_path}: no row with split 'test' to evaluate on")
    bad = labels[test][(labels[test] < 0) | (labels[test] >= n_classes)]
    if len(bad):
        raise DataError(f"{samples_path}: test label {int(bad[0])} is outside the model's {n_classes} classes")
    history = art.read_json(paths, "train/history.json")
    if not history:
        raise DataError("train/history.json: empty training history")

    metrics, report = evaluate(model, _inputs(config, paths, test, len(samples), device), labels[test], config,
                               history, labels[split == TRAIN], ep, reference)

    held = np.flatnonzero(split == HOLDOUT)
    if len(held):  # never part of the headline: that stays the reference's held-out rows
        batch = art.read_frame(paths, "ingest/samples.parquet", ["batch"])["batch"].to_numpy()[held]
        metrics.update(batch_accuracy(model, _inputs(config, paths, held, len(samples), device), labels[held],
                                      batch, ep.batch_size))
    write_plots(art.out_dir(paths, "evaluate/plots"), report, metrics["ece"], history)
    art.write_json(paths, "evaluate/report.json", report)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return metrics
