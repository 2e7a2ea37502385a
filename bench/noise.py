"""Label-noise detection on CIFAR-10N: every dataopt detector vs cleanlab on the SAME probabilities.

For each label column (CIFAR-10N human labels) and seed, a temporary project runs the project's own
stages ingest -> embed -> perceive (out-of-fold proxy run) on a stratified subset, then the analyze
stage once per registered detector; cleanlab's ``find_label_issues`` (default settings, and
``filter_by='prune_by_noise_rate'`` explicitly) and its noise-rate estimates run on the very same
out-of-fold probabilities (perceive/dynamics.npz). Ground truth: ``label != label_clean`` with
``label_clean`` = CIFAR-10's original label.

Examples
--------
  python bench/noise.py --n 2000 --seeds 1                       # smoke run, a few minutes on CPU
  python bench/noise.py --n 10000 --seeds 2 --label-columns random_label1 aggre_label
  python bench/noise.py --n 0 --perceive-model cnn --epochs 15 --device cuda   # full 50k on a GPU

Writes bench/results/noise_<label_column>.json (atomic) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import stratified_subset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("Examples"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="CIFAR-10N folder (train.parquet)")
    ap.add_argument("--label-columns", nargs="+", default=["random_label1", "aggre_label"])
    ap.add_argument("--n", type=int, default=10000,
                    help="stratified subset of the 50k training rows (0 = all); fixed across seeds")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (fold split, proxy init)")
    ap.add_argument("--embed-backend", default="pixels", help="embed.backend (pixels | proxy)")
    ap.add_argument("--embed-kwargs", type=json.loads, default={"dim": 128}, help="JSON")
    ap.add_argument("--perceive-model", default="head", choices=["head", "cnn"])
    ap.add_argument("--hidden", type=int, default=512, help="perceive.hidden (head)")
    ap.add_argument("--width", type=int, default=16, help="perceive.width (cnn)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
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


def one_run(args: argparse.Namespace, label_column: str, seed: int, subset: np.ndarray,
            train: pa.Table, work: Path) -> dict[str, Any]:
    from dataopt.config import validate
    from dataopt.paths import Paths
    from dataopt.registry import DETECTORS
    from dataopt.stages import run_stage

    root = work / f"{label_column}_s{seed}"
    root.mkdir(parents=True)
    pq.write_table(train.take(pa.array(subset)), root / "train.parquet")
    test = pq.read_table(args.data / "test.parquet").slice(0, 200)  # ingest needs a test split
    pq.write_table(test, root / "test.parquet")
    base = {
        "seed": seed,
        "ingest": {"source": "parquet", "path": str(root / "train.parquet"),
                   "eval_path": str(root / "test.parquet"), "label_column": label_column,
                   "eval_label_column": "label", "clean_label_column": "label",
                   "label_name_column": None},
        "embed": {"backend": args.embed_backend, "kwargs": args.embed_kwargs, "device": args.device},
        "perceive": {"model": args.perceive_model, "hidden": args.hidden, "width": args.width,
                     "epochs": args.epochs, "early_epochs": min(3, args.epochs),
                     "folds": args.folds, "device": args.device},
        "tracking": {"enabled": False},
    }
    paths = Paths.at(root)
    seconds = {}
    for stage in ("ingest", "embed", "perceive"):
        t0 = time.perf_counter()
        m = run_stage(stage, validate(base), paths)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        print(f"  {label_column} seed {seed}: {stage} {seconds[stage]} s", flush=True)
    oof_acc = float(m["oof_accuracy"])

    import pandas as pd

    samples = pd.read_parquet(root / "artifacts" / "ingest" / "samples.parquet")
    samples = samples[samples["split"] == "train"]
    labels = samples["label"].to_numpy(np.int64)
    truth = labels != samples["label_clean"].to_numpy(np.int64)
    with np.load(root / "artifacts" / "perceive" / "dynamics.npz") as z:
        probs = z["probs"].astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # float32 storage: renormalise for cleanlab's checks
    methods: dict[str, Any] = {}
    for det in DETECTORS.names():
        for gate in ("agreement", "none") if det in ("gmm", "bmm") else ("agreement",):
            params = validate({**base, "analyze": {"detector": det, "gate": gate}})
            t0 = time.perf_counter()
            run_stage("analyze", params, paths)
            a = pd.read_parquet(root / "artifacts" / "analyze" / "analysis.parquet")
            est = json.loads((root / "artifacts" / "analyze" / "analysis.json").read_text())[
                "estimated_noise_rate"]
            name = det if gate == "agreement" else f"{det}_nogate"
            methods[name] = {**metrics(truth, a["is_label_issue"].to_numpy(),
                                       a["label_issue_score"].to_numpy(), est),
                             "seconds": round(time.perf_counter() - t0, 2)}
    methods.update(run_cleanlab(labels, probs, truth))
    return {"seed": seed, "n": int(len(labels)), "true_noise_rate": float(truth.mean()),
            "oof_accuracy": oof_acc, "oof_accuracy_vs_clean": float(
                (probs.argmax(1) == samples["label_clean"].to_numpy()).mean()),
            "seconds": seconds, "methods": methods}


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
    lines = [f"**{label_column}** (n = {runs[0]['n']}, {len(runs)} seeds, true noise rate "
             f"{true:.3f}, proxy OOF accuracy {acc:.3f})", "",
             "| method | AUROC | AP | precision | recall | F1 | est. noise rate | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in sorted(agg.items(), key=lambda kv: -kv[1]["f1"][0]):
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "train.parquet").exists():
        print(f"bench/noise.py: {args.data / 'train.parquet'} is absent; skipping (needs the "
              "shared CIFAR-10N parquet)")
        return 0
    import torch

    from dataopt.io import write_json

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = pq.read_table(args.data / "train.parquet")
    subset = stratified_subset(train.column("label").to_numpy(), args.n, seed=0)
    with tempfile.TemporaryDirectory(prefix="dataopt_noise_") as tmp:
        for col in args.label_columns:
            t0 = time.perf_counter()
            runs = [one_run(args, col, s, subset, train, Path(tmp)) for s in range(args.seeds)]
            agg = aggregate(runs)
            cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            write_json(args.out / f"noise_{col}.json", {
                "label_column": col, "config": cfg, "n": int(len(subset)),
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


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
