"""Label-noise detection on CIFAR-10N: every dataopt detector vs cleanlab on the SAME probabilities.

For each label column (CIFAR-10N human labels) and seed, a temporary project runs the project's own
stages ingest -> embed -> perceive (out-of-fold proxy run) on a stratified subset, then the analyze
stage once per registered detector; cleanlab's ``find_label_issues`` (default settings, and
``filter_by='prune_by_noise_rate'`` explicitly) and its noise-rate estimates run on the very same
out-of-fold probabilities (perceive/dynamics.npz). Ground truth: ``label != label_clean`` with
``label_clean`` = CIFAR-10's original label.

The proxy run can be done once on a GPU and the analysis repeated anywhere: ``--save-dynamics DIR``
writes DIR/<label_column>_s<seed>.npz after perceive (see :func:`save_dynamics`: dynamics, out-of-fold
probabilities, every signal, labels, the kNN graph, the run's meta), and ``--from-dynamics DIR`` skips
ingest/embed/perceive, rebuilds each project from those files and runs the same analysis.

Examples
--------
  python bench/noise.py --n 2000 --seeds 1                       # smoke run, a few minutes on CPU
  python bench/noise.py --n 10000 --seeds 2 --label-columns random_label1 aggre_label
  python bench/noise.py --n 0 --seeds 2 --perceive-model airbench --epochs 12 --augment flip_crop \\
      --label-smoothing 0.2 --batch-size 1024 --lr 1.5 --weight-decay 0.00133 --device cuda \\
      --save-dynamics bench/dynamics --skip-analysis              # full 50k on a GPU
  python bench/noise.py --from-dynamics bench/dynamics           # the analysis again, on CPU

Writes bench/results/noise_<label_column>.json (atomic) and prints a markdown table
(with ``--skip-analysis``, only the dynamics files).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import (DYN_FLOAT16, DYNAMICS_FORMAT, REGENERATE_DYNAMICS, argument_parser, dynamics_file,
                    read_dynamics, stratified_subset)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--label-columns", nargs="+", default=["random_label1", "aggre_label"])
    ap.add_argument("--n", type=int, default=10000,
                    help="stratified subset of the 50k training rows (0 = all); fixed across seeds")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (fold split, proxy init)")
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (e.g. to add seeds to saved dynamics)")
    ap.add_argument("--embed-backend", default="pixels", help="embed.backend (pixels | proxy)")
    ap.add_argument("--embed-kwargs", type=json.loads, default={"dim": 128}, help="JSON")
    ap.add_argument("--perceive-model", default="head",
                    help="perceive.model: head | cnn | a train MODELS name (small_cnn, airbench, resnet18)")
    ap.add_argument("--hidden", type=int, default=512, help="perceive.hidden (head)")
    ap.add_argument("--width", type=int, default=16, help="perceive.width (image models)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="perceive.batch_size (default: params)")
    # the values the tables were measured with (params.yaml's `auto` would pick by size and device)
    ap.add_argument("--lr", type=float, default=0.05, help="perceive.lr (whitened_patches: 0.01)")
    ap.add_argument("--weight-decay", type=float, default=5e-4,
                    help="perceive.weight_decay (whitened_patches: 0.005)")
    ap.add_argument("--augment", default="none", choices=["none", "crop", "flip_crop"],
                    help="perceive.augment (image models)")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="perceive.label_smoothing")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--save-dynamics", type=Path, default=None, metavar="DIR",
                    help="after perceive, write DIR/<label_column>_s<seed>.npz (see save_dynamics)")
    ap.add_argument("--from-dynamics", type=Path, default=None, metavar="DIR",
                    help="skip ingest/embed/perceive: analyse the DIR/<label_column>_s<seed>.npz files "
                         "(every seed found; --n, --seeds and the perceive options are ignored)")
    ap.add_argument("--dynamics-mb", type=float, default=MAX_BYTES / 1e6,
                    help="largest saved file (MB); the per-epoch arrays are thinned to fit")
    ap.add_argument("--skip-analysis", action="store_true",
                    help="with --save-dynamics: stop after saving (e.g. on a GPU machine without cleanlab)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args(argv)


def metrics(truth: np.ndarray, flags: np.ndarray, score: np.ndarray, est: float) -> dict[str, float]:
    from dataopt.analyze.report import detection_quality

    return detection_quality(truth, flags, score, est)


def run_cleanlab(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """cleanlab 2.x on the same probabilities: default find_label_issues, prune_by_noise_rate, and
    its noise-rate estimates (num_label_issues / n and 1 - trace(estimate_joint))."""
    from cleanlab.count import estimate_joint, num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    n = len(labels)
    score = 1.0 - get_label_quality_scores(labels, probs)  # self-confidence, cleanlab's default rank
    joint_rate = float(1.0 - np.trace(estimate_joint(labels, probs)))
    count_rate = float(num_label_issues(labels, probs) / n)
    out = {}
    for name, kw in (("cleanlab", {}), ("cleanlab_prune_by_noise_rate",
                                        {"filter_by": "prune_by_noise_rate"})):
        flags = find_label_issues(labels, probs, **kw)
        out[name] = {**metrics(truth, flags, score, joint_rate),
                     "noise_rate_num_label_issues": count_rate}
    return out


def perceive_project(args: argparse.Namespace, label_column: str, seed: int, subset: np.ndarray,
                     train: pa.Table, work: Path) -> tuple[Path, dict[str, Any]]:
    """A temporary project at ``work/<label_column>_s<seed>`` with ingest, embed and perceive run.

    Returns the project root and the meta of the proxy run (what :func:`save_dynamics` stores)."""
    from dataopt.config import validate
    from dataopt.io import read_json
    from dataopt.paths import Paths
    from dataopt.stages import run_stage

    root = work / f"{label_column}_s{seed}"
    root.mkdir(parents=True)
    pq.write_table(train.take(pa.array(subset)), root / "train.parquet")
    test = pq.read_table(args.data / "test.parquet").slice(0, 200)  # ingest needs a test split
    pq.write_table(test, root / "test.parquet")
    perceive = {"model": args.perceive_model, "hidden": args.hidden, "width": args.width,
                "epochs": args.epochs, "early_epochs": min(3, args.epochs), "folds": args.folds,
                "augment": args.augment, "label_smoothing": args.label_smoothing, "device": args.device}
    perceive.update({k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                       ("weight_decay", args.weight_decay)) if v is not None})
    base = {
        "seed": seed,
        "ingest": {"source": "parquet", "path": str(root / "train.parquet"),
                   "eval_path": str(root / "test.parquet"), "label_column": label_column,
                   "eval_label_column": "label", "clean_label_column": "label",
                   "label_name_column": None},
        "embed": {"backend": args.embed_backend, "kwargs": args.embed_kwargs, "device": args.device},
        "perceive": perceive,
        "tracking": {"enabled": False},
    }
    params = validate(base)
    paths = Paths.at(root)
    seconds = {}
    for stage in ("ingest", "embed", "perceive"):
        t0 = time.perf_counter()
        run_stage(stage, params, paths)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        print(f"  {label_column} seed {seed}: {stage} {seconds[stage]} s", flush=True)
    corpus = read_json(paths.artifacts / "perceive" / "corpus.json")
    meta = {
        "source": "perceive", "label_column": label_column, "seed": seed, "n": int(len(subset)),
        "perceive": params.perceive.model_dump(), "embed": params.embed.model_dump(),
        "network": corpus["network"], "device": corpus["device"], "gpu": gpu_name(corpus["device"]),
        "epochs_completed": corpus["epochs_completed"], "epochs_per_fold": corpus["epochs_per_fold"],
        "oof_accuracy": corpus["oof_accuracy"], "seconds": seconds, "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return root, meta


def project_inputs(root: Path) -> dict[str, Any]:
    """What :func:`analyse` reads, from a project at ``root`` that ran ingest, embed and perceive."""
    import pandas as pd

    art = root / "artifacts"
    samples = pd.read_parquet(art / "ingest" / "samples.parquet")
    samples = samples[samples["split"] == "train"]
    with np.load(art / "perceive" / "dynamics.npz") as z:
        probs = z["probs"]
    with np.load(art / "embed" / "knn.npz") as z:
        knn_indices, knn_distances = z["indices"], z["distances"]
    return {"signals": pd.read_parquet(art / "perceive" / "signals.parquet"), "probs": probs,
            "knn_indices": knn_indices, "knn_distances": knn_distances,
            "label_clean": samples["label_clean"].to_numpy(np.int64)}


def analyse(inputs: dict[str, Any], seed: int, meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`dataopt.analyze.analyze` once per detector (and gate), and cleanlab, on the same
    out-of-fold probabilities and signals (``inputs``: :func:`project_inputs` or :func:`saved_inputs`);
    one run record: metrics per method, the true noise rate, the proxy's accuracy and ``dynamics``
    (the meta of the proxy run that produced the probabilities)."""
    from dataopt.analyze.run import analyze
    from dataopt.analyze.confident import check_probs
    from dataopt.config import AnalyzeParams
    from dataopt.registry import DETECTORS

    signals = inputs["signals"]
    labels = signals["label"].to_numpy(np.int64)
    clean = inputs["label_clean"]
    truth = labels != clean
    probs = check_probs(inputs["probs"], labels)[0]
    methods: dict[str, Any] = {}
    for det in DETECTORS.names():
        for gate in ("agreement", "none") if det in ("gmm", "bmm") else ("agreement",):
            t0 = time.perf_counter()
            res = analyze(signals, probs, inputs["knn_distances"], AnalyzeParams(detector=det, gate=gate), seed,
                          knn_indices=inputs["knn_indices"])
            name = det if gate == "agreement" else f"{det}_nogate"
            methods[name] = {**metrics(truth, res.table.column("is_label_issue").to_numpy(),
                                       res.table.column("label_issue_score").to_numpy(),
                                       res.summary["estimated_noise_rate"]),
                             "seconds": round(time.perf_counter() - t0, 2)}
    probs = probs.copy()
    probs /= probs.sum(axis=1, keepdims=True)  # float32 storage: renormalise for cleanlab's checks
    methods.update(run_cleanlab(labels, probs, truth))
    return {"seed": seed, "n": int(len(labels)), "true_noise_rate": float(truth.mean()),
            "oof_accuracy": float(meta["oof_accuracy"]), "oof_accuracy_vs_clean": float(
                (probs.argmax(1) == clean).mean()),
            "seconds": meta.get("seconds", {}), "dynamics": meta, "methods": methods}


# --- saved dynamics -------------------------------------------------------------------------------

MAX_BYTES = 15_000_000  # the device returns files up to 16 MiB, 64 MiB together


def _shuffle16(a: np.ndarray) -> np.ndarray:
    """float16 ``a`` as ``(2, a.size)`` uint8 byte planes: the sign/exponent plane deflates far better
    when it is not interleaved with the noisy low mantissa bytes (~15% smaller files)."""
    return np.ascontiguousarray(np.asarray(a, np.float16).reshape(-1).view(np.uint8).reshape(-1, 2).T)


def _index_dtype(n: int) -> type:
    return np.uint16 if n <= np.iinfo(np.uint16).max + 1 else np.int32


def save_dynamics(root: Path, dest: Path, meta: dict[str, Any], max_bytes: int = MAX_BYTES) -> int:
    """Write what the analysis and cleanlab need, without training again, to ``dest`` (.npz, deflated).

    Stored (``n`` train rows, ``E`` epochs, ``C`` classes, ``k`` neighbours):

    - ``meta``: JSON of the proxy run (label column, seed, perceive params, network, device, epochs,
      OOF accuracy, seconds, machine) plus the signal columns' arrow types and the catalogue;
    - ``sample_id`` (n,) int64, ``label`` and ``label_clean`` (n,) int16 (-1 = unknown),
      ``class_names`` (C,) str;
    - dynamics: ``fold`` (n,) int8, ``epochs_per_fold``, ``probs`` (n, C) float32 exactly as perceive
      wrote them (analyze and cleanlab read these), ``correct`` bit-packed (E, n), and ``loss``,
      ``margin``, ``logit_margin``, ``error_norm``, ``feature_norm``, ``center_distance`` as float16
      byte planes
      (ranking precision; ``p_label`` is restored as ``exp(-loss)``: ``common.saved_dynamics``);
    - ``sig/<column>``: every signals.parquet column, losslessly: float64 as float32 where that is
      exact, integers in the smallest integer type that holds them;
    - ``knn_indices`` (n, k) uint16 (int32 above 65,536 rows), ``knn_distances`` (n, k) float16 (only
      the outlier and near-duplicate flags read them);
    - ``projection`` (n, 2) float16: the embeddings' top two principal components (for a projection
      plot; the analysis here does not draw one).

    The per-epoch arrays are the only part that grows with the epochs (~0.37 MB per epoch at
    n = 50,000 beside ~9-11 MB for the rest). When the file would exceed ``max_bytes`` they are kept
    for fewer epochs: the first ``perceive.early_epochs`` (the early-loss window), the last, and
    evenly spaced ones between; ``meta["dynamics_epochs"]`` lists the 1-based epochs kept. The
    analysis reads only the probabilities and the signals, which are always complete and exact.

    Returns the file's size in bytes.
    """
    from dataopt.io import atomic_path
    from dataopt.perceive.dynamics import Dynamics
    from dataopt.schema import TRAIN

    art = Path(root) / "artifacts"
    samples = pq.read_table(art / "ingest" / "samples.parquet",
                            columns=["sample_id", "split", "label", "label_name", "label_clean"]).to_pandas()
    rows = np.flatnonzero(samples["split"].to_numpy() == TRAIN)
    samples = samples.iloc[rows]
    dyn = Dynamics.load(art / "perceive" / "dynamics.npz")
    sid = samples["sample_id"].to_numpy(np.int64)
    if not np.array_equal(dyn.sample_id, sid):
        raise ValueError(f"{art}: perceive/dynamics.npz does not match the train rows")
    n, C = dyn.probs.shape
    names = samples.dropna(subset=["label_name"]).drop_duplicates("label").set_index("label")["label_name"]
    class_names = np.array([str(names.get(c, "")) for c in range(C)])  # "" = no name

    sig = pq.read_table(art / "perceive" / "signals.parquet")
    columns, sig_arrays = {}, {}
    for name in sig.column_names:
        a = sig.column(name).to_numpy(zero_copy_only=False)
        columns[name] = str(sig.schema.field(name).type)
        if name in ("sample_id", "label"):  # the same as the top-level arrays (checked)
            if not np.array_equal(a, sid if name == "sample_id" else samples["label"].to_numpy()):
                raise ValueError(f"{art}: perceive/signals.parquet {name} differs from samples.parquet")
            continue
        if a.dtype == np.float64 and np.array_equal(a.astype(np.float32).astype(np.float64), a,
                                                    equal_nan=True):
            a = a.astype(np.float32)
        elif a.dtype == np.int64 and a.size:
            a = a.astype(np.result_type(np.min_scalar_type(int(a.min())),
                                        np.min_scalar_type(int(a.max()))))
        sig_arrays[f"sig/{name}"] = a
    metadata = {k.decode(): v.decode() for k, v in (sig.schema.metadata or {}).items()}

    with np.load(art / "embed" / "knn.npz", allow_pickle=False) as z:
        knn_sid, indices, distances = z["sample_id"], z["indices"], z["distances"]
    if not np.array_equal(knn_sid, sid):
        raise ValueError(f"{art}: embed/knn.npz does not match the train rows")
    emb = np.load(art / "embed" / "embeddings.npy", mmap_mode="r")
    x = np.asarray(emb[rows], np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 5000)], full_matrices=False)  # PCA axes, subsample
    projection = x @ vt[:2].T
    projection = (projection / max(np.abs(projection).max(), 1e-12)).astype(np.float16)  # float16 range

    clean = samples["label_clean"].astype("float64").fillna(-1).to_numpy().astype(np.int16)
    arrays = {
        "sample_id": sid, "label": samples["label"].to_numpy().astype(np.int16), "label_clean": clean,
        "class_names": class_names,
        "fold": dyn.fold.astype(np.int8), "epochs_per_fold": dyn.epochs_per_fold,
        "epochs_completed": np.array(dyn.epochs_completed),
        "probs": dyn.probs.astype(np.float32),
        **sig_arrays,
        "knn_indices": indices.astype(_index_dtype(n)), "knn_distances": distances.astype(np.float16),
        "projection": projection,
    }
    E = dyn.epochs_completed
    early = min(E, int(meta.get("perceive", {}).get("early_epochs", 3)))
    epochs = np.arange(E)
    dest = Path(dest)
    for _ in range(2):  # a second pass only when the first was over max_bytes
        full_meta = {**meta, "format": DYNAMICS_FORMAT, "n": int(n), "signal_columns": columns,
                     "signal_metadata": metadata, "dynamics_epochs": (epochs + 1).tolist()}
        per_epoch = {"correct": np.packbits(dyn.correct[epochs], axis=1),
                     **{name: _shuffle16(getattr(dyn, name)[epochs]) for name in DYN_FLOAT16}}
        with atomic_path(dest, suffix=".npz") as tmp:
            np.savez_compressed(tmp, meta=np.array(json.dumps(full_meta, default=str)), **arrays,
                                **per_epoch)
        size = dest.stat().st_size
        if size <= max_bytes:
            return size
        with zipfile.ZipFile(dest) as zf:
            grows = sum(zi.compress_size for zi in zf.infolist() if zi.filename[:-4] in per_epoch)
        fits = int((0.97 * max_bytes - (size - grows)) // (grows / len(epochs)))
        if fits <= early or fits >= E:
            break
        # the early-loss window, then evenly spaced epochs down from the last one
        spaced = np.round(np.linspace(E - 1, early, fits - early))
        epochs = np.unique(np.r_[np.arange(early), spaced]).astype(int)
    dest.unlink()
    raise ValueError(f"{dest}: {size / 1e6:.1f} MB is over {max_bytes / 1e6:.1f} MB even with the "
                     f"dynamics of {len(epochs)} epochs")


def saved_inputs(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """What :func:`analyse` reads, from a :func:`save_dynamics` file: exactly the saved signals and
    probabilities (the kNN distances float16, which only the outlier / near-duplicate flags read);
    and the file's meta."""
    import pandas as pd

    meta, d = read_dynamics(src)
    stored = {"sample_id": d["sample_id"].astype(np.int64), "label": d["label"].astype(np.int64)}
    dtypes = {"double": np.float64, "int64": np.int64, "bool": bool}
    signals = pd.DataFrame({name: np.asarray(stored[name] if name in stored else d[f"sig/{name}"], dtypes[t])
                            for name, t in meta["signal_columns"].items()})
    inputs = {"signals": signals, "probs": d["probs"], "knn_indices": d["knn_indices"].astype(np.int64),
              "knn_distances": d["knn_distances"].astype(np.float32),
              "label_clean": d["label_clean"].astype(np.int64)}
    return inputs, {k: v for k, v in meta.items() if k not in ("signal_columns", "signal_metadata", "format")}


KEYS = ("auroc", "average_precision", "precision", "recall", "f1", "estimated_noise_rate",
        "noise_rate_error")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per method and metric: [mean, std] over the seeds."""
    out = {}
    for name in runs[0]["methods"]:
        out[name] = {}
        for k in KEYS:
            v = np.array([r["methods"][name].get(k, np.nan) for r in runs], dtype=float)
            out[name][k] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)]
    return out


def table(label_column: str, agg: dict[str, dict[str, list[float]]], runs: list[dict]) -> str:
    true = np.mean([r["true_noise_rate"] for r in runs])
    acc = np.mean([r["oof_accuracy"] for r in runs])
    dyn = runs[0]["dynamics"]
    proxy = f"{dyn['network']} ({dyn['epochs_completed']} epochs on {dyn.get('gpu') or dyn['device']})"
    lines = [f"**{label_column}** (n = {runs[0]['n']}, {len(runs)} seeds, true noise rate "
             f"{true:.3f}, proxy {proxy}, OOF accuracy {acc:.3f})", "",
             "| method | AUROC | AP | precision | recall | F1 | est. noise rate | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in sorted(agg.items(), key=lambda kv: -kv[1]["f1"][0]):
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def saved_seeds(directory: Path, label_column: str) -> list[int]:
    """Seeds of the DIR/<label_column>_s<seed>.npz files, ascending."""
    pattern = re.compile(rf"{re.escape(label_column)}_s(\d+)\.npz")
    return sorted(int(m.group(1)) for p in Path(directory).glob(f"{label_column}_s*.npz")
                  if (m := pattern.fullmatch(p.name)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from_dyn = args.from_dynamics
    if from_dyn is None and not (args.data / "train.parquet").exists():
        print(f"bench/noise.py: {args.data / 'train.parquet'} is absent; skipping (needs the "
              "shared CIFAR-10N parquet)")
        return 0
    if from_dyn is not None and args.save_dynamics is not None:
        sys.exit("bench/noise.py: --from-dynamics and --save-dynamics exclude each other")
    if args.skip_analysis and args.save_dynamics is None:
        sys.exit("bench/noise.py: --skip-analysis needs --save-dynamics")
    import torch

    from dataopt.io import write_json

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if from_dyn is None:
        train = pq.read_table(args.data / "train.parquet")
        subset = stratified_subset(train.column("label").to_numpy(), args.n, seed=0)
    with tempfile.TemporaryDirectory(prefix="dataopt_noise_") as tmp:
        for col in args.label_columns:
            t0 = time.perf_counter()
            runs = []
            seeds = range(args.seed_start, args.seed_start + args.seeds) if from_dyn is None else saved_seeds(from_dyn, col)
            if not seeds:
                sys.exit(f"bench/noise.py: no {col}_s<seed>.npz in {from_dyn}; bench/dynamics/ is not in git: "
                         f"regenerate it with {REGENERATE_DYNAMICS}")
            for s in seeds:
                if from_dyn is None:
                    root, meta = perceive_project(args, col, s, subset, train, Path(tmp))
                    if args.save_dynamics is not None:
                        dest = dynamics_file(args.save_dynamics, col, s)
                        size = save_dynamics(root, dest, meta, max_bytes=int(args.dynamics_mb * 1e6))
                        print(f"  {col} seed {s}: dynamics -> {dest} ({size / 1e6:.1f} MB, OOF accuracy "
                              f"{meta['oof_accuracy']:.4f})", flush=True)
                    if args.skip_analysis:
                        continue
                    inputs = project_inputs(root)
                else:
                    inputs, meta = saved_inputs(dynamics_file(from_dyn, col, s))
                    if meta["label_column"] != col or meta["seed"] != s:
                        sys.exit(f"bench/noise.py: {dynamics_file(from_dyn, col, s)} holds "
                                 f"{meta['label_column']} seed {meta['seed']}")
                    meta = {**meta, "source": f"saved dynamics ({meta['source']} on {meta['machine']})",
                            "file": str(dynamics_file(from_dyn, col, s))}
                runs.append(analyse(inputs, s, meta))
            if not runs:  # --skip-analysis
                continue
            agg = aggregate(runs)
            cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            write_json(args.out / f"noise_{col}.json", {
                "label_column": col, "config": cfg, "n": runs[0]["n"],
                "dynamics_from": "perceive (this run)" if from_dyn is None else str(from_dyn),
                "seconds": round(time.perf_counter() - t0, 1), "machine": machine(),
                "summary": agg, "runs": runs,
            })
            print(table(col, agg, runs), flush=True)
            print()
    return 0


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}"


def gpu_name(device: str) -> str | None:
    """The CUDA device's name when the proxy ran on one."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
