"""drift stage: the newest batch (or ``drift.batch``) against the reference -> drift.json and plots.

Reads the reference (``ingest/samples.parquet``, ``ingest/images.npy``, ``embed/embeddings.npy``: the
held-out split when the embedder was fitted on the train split and it is large enough, else the train
split; never the checked batch's rows) and the fitted embedder (``embed/embedder.safetensors``); reads the batch
from ``data/batches/<name>/`` through the same ingest validation as any source (its rows decoded at
the reference's image size; its quarantined rows are counted in the report), embeds only the batch
with the reference's embedder, and calls :func:`dataopt.drift.check.check_drift`. Writes
``artifacts/drift/drift.json`` (the batch, the verdict with one line per test, every test's
statistic, p-value, effect size and breakdown, the proxy, the most new-looking rows) and
``artifacts/drift/plots/``: ``projection.png``, ``class_shift.png``, ``p_values.png``,
``new_looking.png``. With no batch recorded, drift.json says so and the plots folder stays empty.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dataopt import artifacts as art
from dataopt import batches
from dataopt.config import Params
from dataopt.drift import plots
from dataopt.drift.check import check_drift
from dataopt.embed.run import embed_new, load_embedder
from dataopt.errors import DataError
from dataopt.ingest.pipeline import ingest
from dataopt.paths import Paths
from dataopt.schema import TRAIN

TOP_NEW = 24  # rows in new_looking.png and drift.json's top_new


def run(params: Params, paths: Paths) -> dict[str, Any]:
    entries = batches.read_manifest(paths)
    folder = art.out_dir(paths, "drift/plots")
    if not entries:
        art.write_json(paths, "drift/drift.json", {
            "batch": None, "verdict": {"drift": None, "why": "no batch to check: add one with "
                                       "`dataopt batch add SRC` (data/manifest.json has none)"}})
        return {"n_batch": 0, "drift": 0, "n_flagged_tests": 0}
    entry = batches.get_batch(paths, params.drift.batch)
    batches.verify(paths, entry)
    embedder = load_embedder(art.locate(paths, "embed/embedder.safetensors"))
    ref = _reference(paths, entry["name"], embedder.info().get("fitted_on") == "train", params.drift.min_batch)
    bat, quarantined = _batch(params, paths, entry, ref["images"].shape[1:3])
    bat["embeddings"] = embed_new(embedder, bat["images"]).astype(np.float32)
    names, ref_rows = list(ref.pop("class_names")), ref.pop("rows")
    bat["labels"] = _codes(bat.pop("label_names"), names)  # a class the reference lacks gets a new code
    d = params.drift
    result = check_drift(ref, bat, n_classes=len(names), tests=d.tests, alpha=d.alpha,
                         permutations=d.permutations, max_reference=d.max_reference, min_batch=d.min_batch,
                         effect_floor=d.effect_floor, kwargs=d.kwargs, detector=params.analyze.detector,
                         detector_kwargs=params.analyze.kwargs, random_state=params.seed)
    top = _top_new(result, bat)
    report = {"batch": {k: entry[k] for k in ("name", "added_at", "source", "rows", "n_valid", "content_hash")},
              "n_batch_quarantined": quarantined, "n_reference": len(ref["labels"]), "reference_rows": ref_rows,
              "embedder": embedder.info() if hasattr(embedder, "info") else type(embedder).__name__,
              "classes": names, **result.to_dict(), "top_new": top}
    art.write_json(paths, "drift/drift.json", report)
    _plots(folder, ref, bat, result, names, top)
    return {"batch": entry["name"], "n_batch": len(bat["labels"]), "drift": int(result.verdict.drift),
            "n_flagged_tests": sum(result.verdict.decided.values()),
            **{f"p_{n}": r.p_value for n, r in result.results.items()}}


def _reference(paths: Paths, batch: str, embedder_saw_train: bool, min_rows: int) -> dict[str, Any]:
    """The reference rows: the train split, or, when the embedder was fitted on it, the held-out split
    (rows the embedder never saw, like the batch's: its features are more confident on its own training
    rows, so a train-split reference made every batch look new: a 0.20 false-alarm rate on CIFAR-10,
    docs/benchmarks.md) when that has at least ``4 * min_rows`` rows."""
    samples = art.read_frame(paths, "ingest/samples.parquet")
    split = samples["split"].to_numpy()
    other = samples["batch"].to_numpy() != batch if "batch" in samples else np.ones(len(samples), bool)
    held = (split != TRAIN) & other
    use_held = embedder_saw_train and held.sum() >= 4 * min_rows
    rows = np.flatnonzero(held if use_held else (split == TRAIN) & other)  # never the checked batch itself
    if len(rows) < 2:
        raise DataError("drift: the reference has fewer than 2 rows in ingest/samples.parquet")
    images = art.load_npy(paths, "ingest/images.npy", mmap=True)
    emb = art.load_npy(paths, "embed/embeddings.npy", mmap=True)
    labels = samples["label"].to_numpy()
    codes = np.unique(labels)
    names = samples.drop_duplicates("label").set_index("label")["label_name"]
    class_names = [str(names.get(c, c)) for c in range(int(codes.max()) + 1)]
    return {"embeddings": np.asarray(emb[rows], np.float32), "labels": labels[rows],
            "images": np.asarray(images[rows]), "sizes": samples[["orig_height", "orig_width"]].to_numpy()[rows],
            "class_names": class_names, "rows": "held-out split (unseen by the embedder)" if use_held else "train split"}


def _batch(params: Params, paths: Paths, entry: dict, size: tuple[int, int]) -> tuple[dict[str, Any], int]:
    square = size[0] if size[0] == size[1] else None
    result = ingest(batches.source_params(entry, paths, params.ingest, square), params.seed, paths.root,
                    min_classes=1)  # a batch may hold a single (new) class
    if result.error:
        raise DataError(f"drift: batch {entry['name']!r}: {result.error.removeprefix('ingest: ')}")
    if result.images.shape[1:3] != tuple(size):
        raise DataError(f"drift: batch {entry['name']!r} decodes to {result.images.shape[1:3]} pixels, the "
                        f"reference has {tuple(size)}; set ingest.image_size")
    s = result.samples.to_pandas()
    return {"images": result.images, "label_names": s["label_name"].astype(str).to_numpy(),
            "sizes": s[["orig_height", "orig_width"]].to_numpy(), "source": s["source"].to_numpy()}, \
        int(result.report["n_quarantined"])


def _codes(label_names: np.ndarray, names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    for n in dict.fromkeys(label_names):
        index.setdefault(n, len(index))
    return np.array([index[n] for n in label_names], np.int64)


def _top_new(result, bat: dict) -> list[dict[str, Any]]:
    """The batch rows with the highest "looks new" score (classifier test, else MMD witness)."""
    for name in ("classifier", "mmd"):
        r = result.results.get(name)
        if r is not None and r.breakdown and "looks_new" in r.breakdown:
            score = np.asarray(r.breakdown["looks_new"], float)
            order = np.argsort(np.where(np.isfinite(score), -score, np.inf), kind="stable")[:TOP_NEW]
            return [{"row": int(i), "source": str(bat["source"][i]), "score": float(score[i]), "by": name}
                    for i in order if np.isfinite(score[i])]
    return []


def _plots(folder, ref: dict, bat: dict, result, names: list[str], top: list[dict]) -> None:
    looks = None
    if "classifier" in result.results and result.results["classifier"].breakdown:
        looks = np.asarray(result.results["classifier"].breakdown["looks_new"], float)
    plots.projection_png(folder / "projection.png", ref["embeddings"], bat["embeddings"], looks)
    n = max(len(names), int(bat["labels"].max()) + 1 if len(bat["labels"]) else 0)
    shown = names + [f"new-{i}" for i in range(len(names), n)]
    share = lambda y: np.bincount(y, minlength=n)[:n] / max(len(y), 1)  # noqa: E731
    mmd = None
    if "per_class_mmd" in result.results and result.results["per_class_mmd"].breakdown:
        b = result.results["per_class_mmd"].breakdown
        mmd = np.full(n, np.nan)
        for c, v in zip(b["class"], b["mmd2"]):
            if 0 <= int(c) < n:
                mmd[int(c)] = v
    plots.class_shift_png(folder / "class_shift.png", shown, share(ref["labels"]), share(bat["labels"]), mmd)
    plots.p_values_png(folder / "p_values.png", result.verdict.adjusted_p, result.verdict.decided,
                       result.results[next(iter(result.results))].alpha if result.results else 0.05)
    rows = [t["row"] for t in top]
    plots.image_grid_png(folder / "new_looking.png", bat["images"][rows],
                         [f"{t['score']:.2f} {shown[bat['labels'][t['row']]]}" for t in top])
