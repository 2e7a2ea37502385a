"""The ingest pipeline: read a source, validate every row, decode, split, inject noise, assign ids.

:func:`ingest` returns an :class:`IngestResult` (tables, images, report) and never writes; the stage
module writes the artifacts. A row that fails a check is quarantined with the first failing reason,
in this order: source checks (path escapes root, missing file), missing/unknown label, duplicate id,
header checks (empty, not an image, decompression bomb), decode checks (truncated, corrupt).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from dataopt.batches import REFERENCE, get_batch, source_params, verify
from dataopt.config import IngestParams
from dataopt.ingest import decode as dec
from dataopt.ingest import labels as lab
from dataopt.ingest import sources  # also fills SOURCES
from dataopt.paths import Paths
from dataopt.registry import SOURCES
from dataopt.schema import HOLDOUT, QUARANTINE_COLUMNS, QUARANTINE_REASONS, SAMPLES_COLUMNS, TEST, TRAIN

_ARROW = {"int64": pa.int64(), "string": pa.string(), "float64": pa.float64(), "bool": pa.bool_()}


@dataclass
class IngestResult:
    """Everything the ingest stage writes.

    Attributes
    ----------
    samples : pyarrow.Table with :data:`SAMPLES_COLUMNS`, one row per valid sample
    images : ndarray, shape (len(samples), H, W, 3), uint8; row i = samples row i
    quarantine : pyarrow.Table with :data:`QUARANTINE_COLUMNS`
    report : dict for report.json
    error : str or None
        Why the result must not be used (no valid sample, too many quarantined); the stage writes the
        quarantine table and report first, then raises DataError with this message.
    """

    samples: pa.Table
    images: np.ndarray
    quarantine: pa.Table
    report: dict[str, Any]
    error: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)


def table(columns: dict[str, str], data: dict[str, Any]) -> pa.Table:
    """A pyarrow table with exactly ``columns`` (name -> type) from ``data`` (None = null)."""
    return pa.table({c: pa.array(data[c], type=_ARROW[t]) for c, t in columns.items()})


def with_batches(raw: sources.RawRows, p: IngestParams, paths: Paths) -> tuple[pd.DataFrame, int]:
    """``(frame, n_pixels)``: the source's rows (``batch`` = "reference"), then the rows of every batch
    in ``p.batches`` (verified against the manifest; split "train" until :func:`hold_out` takes its
    share; sources and keys prefixed with ``batches/<name>/`` so that their ids never collide with the
    reference's). The first ``n_pixels`` rows are the source's pre-decoded ``raw.pixels`` (none: 0)."""
    n_pixels = len(raw.pixels) if raw.pixels is not None else 0
    frame = raw.frame.assign(batch=REFERENCE)
    parts = [frame]
    for i, name in enumerate(dict.fromkeys(p.batches)):
        entry = get_batch(paths, name)
        verify(paths, entry)
        part = build_source(source_params(entry, paths, p), paths.root).read().frame
        prefix = f"batches/{name}/"
        parts.append(part.assign(part=2 + i, split=TRAIN, batch=name, source=prefix + part["source"].astype(str),
                                 key=prefix + part["key"].astype(str)))
    return (sources.concat(parts) if len(parts) > 1 else frame), n_pixels


def hold_out(batch: np.ndarray, labels: np.ndarray, keys: np.ndarray, share: float, seed: int) -> np.ndarray:
    """True for the rows each added batch holds out: a seeded, stratified ``share`` of every class of the
    batch (at most all but one row of a class), drawn per batch from its own rows' keys, so adding
    another batch never changes which rows of this one are held out."""
    held = np.zeros(len(batch), dtype=bool)
    for b in dict.fromkeys(batch[batch != REFERENCE].tolist()):
        rows = np.flatnonzero(batch == b)
        held[rows] = lab.stratified_split(labels[rows], keys[rows].tolist(), share, seed)
    return held


def build_source(p: IngestParams, root: Path):
    kwargs = p.model_dump()
    kwargs.pop("source")
    return SOURCES.build(p.source, None, root=str(root), **kwargs)


class _Verdicts:
    """Per-row quarantine reason (None while the row is valid) and detail; the first failing check wins."""

    def __init__(self, frame: pd.DataFrame):
        self.source = frame["source"].to_numpy(dtype=object)
        self.reason = np.full(len(frame), None, dtype=object)
        self.detail = np.full(len(frame), None, dtype=object)
        found = np.flatnonzero(frame["reason"].notna().to_numpy())
        reasons, details = frame["reason"].to_numpy(dtype=object), frame["detail"].to_numpy(dtype=object)
        self.reject(found, reasons[found], details[found])

    def pending(self) -> np.ndarray:
        """Positions of the rows not quarantined so far."""
        return np.flatnonzero(pd.isna(self.reason))

    def reject(self, idx, reasons, details) -> None:
        """Quarantine rows ``idx`` whose reason is not None (and that have no reason yet)."""
        for i, r, d in zip(idx, reasons, details):
            if r is not None and self.reason[i] is None:
                self.reason[i], self.detail[i] = r, sources.shown(f"{self.source[i]}: {d}")


def ingest(p: IngestParams, seed: int, root: Path, workers: Optional[int] = None,
           min_classes: int = 2) -> IngestResult:
    """Read, validate, decode and split the source described by ``p``.

    Parameters
    ----------
    p : the ``ingest`` section of params.yaml
    seed : params.yaml ``seed`` (train/test split)
    root : folder that relative ``ingest.path`` / ``eval_path`` are resolved against
    workers : decoding threads (default: number of CPUs, at most 8)
    min_classes : train classes needed (a training set: 2; a batch of new data may hold one class)
    """
    raw = build_source(p, root).read()
    frame, n_pixels = with_batches(raw, p, Paths.at(root))  # rows < n_pixels: in raw.pixels
    n_read = len(frame)
    verdict = _Verdicts(frame)

    # --- labels: class names from the rows the source did not already reject
    ok = pd.isna(verdict.reason)
    kind = lab.label_kind(frame["label"][ok].tolist(), p.classes)
    names_col = frame["label_name"][ok].tolist() if frame["label_name"].notna().any() else None
    clean_col = frame["label_clean"][ok].tolist() if frame["label_clean"].notna().any() else None
    column = p.label_column if not p.eval_label_column else f"{p.label_column}' / '{p.eval_label_column}"
    names = lab.class_names(frame["label"][ok].tolist(), kind, p.classes, names_col, clean_col,
                            p.max_classes, column)
    codes = lab.encode(frame["label"].tolist(), kind, names)
    clean_kind = lab.label_kind(frame["label_clean"].tolist(), p.classes)
    clean = lab.encode(frame["label_clean"].tolist(), clean_kind, names)
    missing = np.flatnonzero(codes == lab.MISSING)
    verdict.reject(missing, ["missing_label"] * len(missing), ["no label"] * len(missing))
    unknown = np.flatnonzero(codes == lab.UNKNOWN)
    valid_names = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raw_labels = frame["label"].to_numpy(dtype=object)
    verdict.reject(unknown, ["unknown_label"] * len(unknown),
                   [f"label {raw_labels[i]!r} is not a known class (classes: {valid_names})" for i in unknown])

    # --- duplicate ids (or the same source listed twice): later occurrences within one file
    pend = verdict.pending()
    ident = frame["source_id"].where(frame["source_id"].notna(), frame["key"]).astype(str)
    sub = pd.DataFrame({"part": frame["part"].to_numpy()[pend], "ident": ident.to_numpy()[pend]}, index=pend)
    dup = sub.duplicated(["part", "ident"], keep="first")
    first = sub.groupby(["part", "ident"]).head(1)
    first_src = {(pt, i): verdict.source[r] for r, pt, i in zip(first.index, first["part"], first["ident"])}
    dup_rows = sub.index[dup.to_numpy()]
    verdict.reject(dup_rows, ["duplicate_id"] * len(dup_rows), [
        f"id {sub.at[r, 'ident']!r} already used by "
        f"{first_src[(sub.at[r, 'part'], sub.at[r, 'ident'])]}" for r in dup_rows])

    # --- images: header probe (bombs rejected before decoding), then decode into the target size
    files, data = frame["file"].tolist(), frame["data"].tolist()
    orig_h = np.full(n_read, -1, dtype=np.int64)
    orig_w = np.full(n_read, -1, dtype=np.int64)
    orig_mode = np.array([""] * n_read, dtype=object)
    note = np.array([""] * n_read, dtype=object)
    resized = np.zeros(n_read, dtype=bool)
    hashes = np.array([""] * n_read, dtype=object)
    pend = verdict.pending()
    target, decoded = None, []
    if raw.pixels is not None:  # a built-in data set, already decoded to one size
        pend, ready = pend[pend >= n_pixels], pend[pend < n_pixels]
        h, w = raw.pixels.shape[1:3]
        orig_h[:n_pixels], orig_w[:n_pixels] = h, w
        orig_mode[:n_pixels], note[:n_pixels] = raw.meta.get("orig_mode", "RGB"), raw.meta.get("note", "")
        target = (p.image_size, p.image_size) if p.image_size else (h, w)
        images = raw.pixels[ready]
        if target != (h, w):
            fitted = [dec.fit_size(im, target) for im in images]
            images = np.stack([f[0] for f in fitted]) if fitted else np.zeros((0, *target, 3), np.uint8)
            resized[ready] = True
            note[ready] = [f"{note[i]}; {f[1]}" if note[i] else f[1] for i, f in zip(ready, fitted)]
        hashes[ready] = [hashlib.sha1(im.tobytes()).hexdigest() for im in images]
        decoded.append(images)
    if raw.pixels is None or len(pend):  # files and bytes (a batch beside a built-in set: decoded to its size)
        r, d, hh, ww, mm = dec.probe_all(files, data, pend, p.max_pixels, workers)
        orig_h[pend], orig_w[pend], orig_mode[pend] = hh, ww, mm
        verdict.reject(pend, r, d)
        pend = verdict.pending()
        pend = pend[pend >= n_pixels]
        if target is None and p.image_size:
            target = (p.image_size, p.image_size)
        elif target is None and len(pend):
            sizes = Counter(zip(orig_h[pend].tolist(), orig_w[pend].tolist()))
            target = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]  # most common; ties -> larger
        elif target is None:
            target = (0, 0)
        images, r, d, nn, rs, hs = dec.decode_all(files, data, pend, target, workers)
        note[pend], resized[pend], hashes[pend] = nn, rs, hs
        verdict.reject(pend, r, d)
        keep = np.array([x is None for x in r], dtype=bool)
        decoded.append(images[keep] if not keep.all() else images)
    images = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)  # pre-decoded rows come first
    # `images` now holds the valid rows, in frame order
    valid = verdict.pending()
    n_valid, n_quar = len(valid), n_read - len(valid)

    # --- split, ids, noise on the valid rows
    split = frame["split"].to_numpy(dtype=object)[valid]
    label = codes[valid]
    keys = frame["key"].to_numpy(dtype=object)[valid]
    unsplit = np.array([s is None for s in split], dtype=bool)
    if unsplit.any():
        is_test = lab.stratified_split(label[unsplit], keys[unsplit].tolist(), p.test_fraction, seed)
        split[unsplit] = np.where(is_test, TEST, TRAIN)
    batch = frame["batch"].to_numpy(dtype=object)[valid]
    if p.batches:
        split[hold_out(batch, label, keys, p.batch_holdout, seed)] = HOLDOUT
    split = split.astype(str) if n_valid else np.array([], dtype=str)
    sid = lab.sample_ids(split.tolist(), keys.tolist())
    label_clean = clean[valid].copy()
    train = split == TRAIN
    train_classes = np.unique(label[train])
    noisy = label.copy()
    if len(train_classes) >= 2:  # else ingest stops below; noise needs two classes
        noisy[train] = lab.inject_noise(label[train], len(names), p.noise.kind, p.noise.rate, p.noise.seed)
    flipped = noisy != label
    if p.noise.kind != "none" and p.noise.rate > 0:
        # the pre-noise label becomes the clean label unless a clean column already supplied one
        fill = train & (label_clean < 0)
        label_clean[fill] = label[fill]

    # --- exact duplicates: same stored pixels -> sample_id of the first occurrence
    h_valid = hashes[valid]
    first_sid = pd.Series(sid).groupby(pd.Series(h_valid)).transform("first").to_numpy()
    duplicate_of = np.where(first_sid != sid, first_sid, -1)

    names_arr = np.array(names, dtype=object)
    samples = table(SAMPLES_COLUMNS, {
        "sample_id": sid,
        "split": split.tolist(),
        "label": noisy,
        "label_name": names_arr[noisy].tolist() if n_valid else [],
        "label_clean": [int(x) if x >= 0 else None for x in label_clean],
        "source": frame["source"].to_numpy(dtype=object)[valid].tolist(),
        "source_id": frame["source_id"].to_numpy(dtype=object)[valid].tolist(),
        "orig_height": orig_h[valid],
        "orig_width": orig_w[valid],
        "orig_mode": orig_mode[valid].tolist(),
        "note": note[valid].tolist(),
        "content_hash": h_valid.tolist(),
        "duplicate_of": [int(x) if x >= 0 else None for x in duplicate_of],
        "batch": batch.tolist(),
    })
    bad = np.flatnonzero(pd.notna(verdict.reason))
    qsplit = frame["split"].to_numpy(dtype=object)[bad]
    quarantine = table(QUARANTINE_COLUMNS, {
        "source": frame["source"].to_numpy(dtype=object)[bad].tolist(),
        "source_id": frame["source_id"].to_numpy(dtype=object)[bad].tolist(),
        "split": qsplit.tolist(),
        "reason": verdict.reason[bad].tolist(),
        "detail": verdict.detail[bad].tolist(),
        "batch": frame["batch"].to_numpy(dtype=object)[bad].tolist(),
    })

    # --- report: every outcome counted
    by_reason = Counter(verdict.reason[bad].tolist())
    share = n_quar / n_read if n_read else 0.0
    modes = Counter(m for m in orig_mode[valid].tolist() if m != "RGB")
    known_train = train & (label_clean >= 0)
    test = split == TEST
    known_test = test & (label_clean >= 0)
    injected = int(flipped.sum())
    noise_rate = injected / int(train.sum()) if train.any() else 0.0

    def disagreement(mask: np.ndarray) -> Optional[float]:
        return round(float((noisy[mask] != label_clean[mask]).mean()), 6) if mask.any() else None

    report = {
        "source": p.source,
        "path": p.path,
        "eval_path": p.eval_path,
        "n_read": n_read,
        "n_valid": n_valid,
        "n_quarantined": n_quar,
        "quarantined_share": round(share, 6),
        "max_quarantine_fraction": p.max_quarantine_fraction,
        "by_reason": {r: int(by_reason.get(r, 0)) for r in QUARANTINE_REASONS},
        "n_converted": {m: int(c) for m, c in sorted(modes.items())},
        "n_resized": int(resized[valid].sum()),
        "n_exact_duplicates": int((duplicate_of >= 0).sum()),
        "n_train": int(train.sum()),
        "n_test": int(test.sum()),
        "classes": names,
        "n_classes": len(names),
        "class_counts": {
            s: {names[c]: int(n) for c, n in zip(*np.unique(noisy[split == s], return_counts=True))}
            for s in (TRAIN, TEST)
        },
        "image_size": [int(target[0]), int(target[1])],
        "label_noise": {
            "injected": {"kind": p.noise.kind, "rate": p.noise.rate, "seed": p.noise.seed,
                         "n_flipped": injected, "realised_rate": round(noise_rate, 6)},
            "n_label_clean_known": {TRAIN: int(known_train.sum()), TEST: int(known_test.sum())},
            # share of rows whose trained-on label differs from the clean label, where that is known
            "disagreement": {TRAIN: disagreement(known_train), TEST: disagreement(known_test)},
        },
        **raw.meta.get("report", {}),
    }
    if p.batches:  # only then, so a run without batches writes what it always wrote
        report["batch_holdout"] = p.batch_holdout
        report["n_holdout"] = {b: int(((split == HOLDOUT) & (batch == b)).sum()) for b in dict.fromkeys(p.batches)}
    if "n_ignored_hidden" in raw.meta:
        report["n_ignored_hidden"] = int(raw.meta["n_ignored_hidden"])
    top = ", ".join(f"{r} ({c})" for r, c in by_reason.most_common(3))
    error = None
    if n_valid == 0:
        error = (f"ingest: no valid sample remains out of {n_read} rows read from {p.source} "
                 f"({p.path or 'built-in'}); reasons: {top or 'no rows'}; see quarantine.parquet")
    elif len(train_classes) < min_classes:
        found = ", ".join(repr(names[c]) for c in train_classes) or "none"
        n_found = len(train_classes)
        error = (f"ingest: the train split has {n_found} class{'' if n_found == 1 else 'es'} with valid samples "
                 f"({found}) of {len(names)} classes; a classifier needs at least 2; see quarantine.parquet and "
                 f"report.json")
    elif share > p.max_quarantine_fraction:
        error = (f"ingest: {n_quar} of {n_read} rows quarantined (share {share:.3f}) exceeds "
                 f"ingest.max_quarantine_fraction={p.max_quarantine_fraction}; top reasons: {top}; "
                 f"see quarantine.parquet")
    metrics = {
        "n_read": n_read, "n_valid": n_valid, "n_quarantined": n_quar, "n_train": report["n_train"],
        "n_test": report["n_test"], "n_classes": len(names), "quarantined_share": report["quarantined_share"],
        "noise_rate": report["label_noise"]["injected"]["realised_rate"],
        "n_exact_duplicates": report["n_exact_duplicates"], "n_resized": report["n_resized"],
        "n_converted": int(sum(modes.values())), "image_height": int(target[0]), "image_width": int(target[1]),
    }
    if p.batches:
        metrics["n_holdout"] = int(sum(report["n_holdout"].values()))
    if report["label_noise"]["disagreement"][TRAIN] is not None:
        metrics["label_disagreement"] = report["label_noise"]["disagreement"][TRAIN]
    return IngestResult(samples, images, quarantine, report, error, metrics)
