"""Benchmark of the analyze stage's agreement gate on the built-in digits with injected label noise.

For each noise rate and seed: ingest (symmetric noise) -> embed -> perceive -> analyze, once with
``analyze.gate: none`` (the mixture posterior alone) and once with ``agreement`` (a label the
out-of-fold model predicts is trusted); detection against the injected noise, then the test accuracy
of the small CNN trained on all samples with no weights, and with ``p_clean`` weights from each gate.
Writes ``bench/results/gate_digits.json`` (atomically) and prints a markdown table.

Examples
--------
  python bench/gate.py                       # noise 0, 0.2, 0.4; seeds 0 1
  python bench/gate.py --noise 0.1 0.3 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from dataopt.config import load_params, validate
from dataopt.io import write_json
from dataopt.paths import Paths
from dataopt.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]


def one(noise: float, seed: int) -> dict:
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["seed"] = seed
    raw["ingest"]["noise"] = {"kind": "symmetric" if noise else "none", "rate": noise, "seed": seed}
    raw["tracking"]["enabled"] = False
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths.at(tmp)
        for stage in ("ingest", "embed", "perceive"):
            run_stage(stage, validate(raw), paths)
        samples = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet")
        train = samples[samples["split"] == "train"]
        truth = (train["label_clean"].notna() & (train["label"] != train["label_clean"])).to_numpy()
        row: dict = {"noise": noise, "seed": seed, "true_noise_rate": float(truth.mean())}

        def accuracy(weighting: str) -> float:
            raw["optimize"]["weighting"] = weighting
            for stage in ("optimize", "train"):
                run_stage(stage, validate(raw), paths)
            return run_stage("evaluate", validate(raw), paths)["accuracy"]

        row["acc_unweighted"] = accuracy("none")
        for gate in ("none", "agreement"):
            raw["analyze"]["gate"] = gate
            run_stage("analyze", validate(raw), paths)
            flags = pd.read_parquet(paths.artifacts / "analyze" / "analysis.parquet")["is_label_issue"]
            row[f"{gate}_flagged"] = float(flags.mean())
            row[f"{gate}_f1"] = float(f1_score(truth, flags)) if truth.any() else None
            row[f"{gate}_acc_p_clean"] = accuracy("p_clean")
        return row


def table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    g = df.groupby("noise").mean(numeric_only=True)
    lines = ["| injected noise | flagged (mixture only / gated) | F1 (mixture only / gated) | test acc.: no weights | p_clean weights, mixture only | p_clean weights, gated |",
             "| --- | --- | --- | --- | --- | --- |"]
    for noise, r in g.iterrows():
        f1 = "–" if np.isnan(r["none_f1"]) else f"{r['none_f1']:.3f} / {r['agreement_f1']:.3f}"
        lines.append(f"| {noise:.0%} | {r['none_flagged']:.1%} / {r['agreement_flagged']:.1%} | {f1} | "
                     f"{r['acc_unweighted']:.4f} | {r['none_acc_p_clean']:.4f} | {r['agreement_acc_p_clean']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gate_digits.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [one(n, s) for n in args.noise for s in args.seeds]
    md = table(rows)
    write_json(args.out, {"benchmark": "gate", "dataset": "sklearn digits (built-in)", "rows": rows,
                          "table": md, "machine": platform.node(), "cpus": __import__("os").cpu_count(),
                          "seconds": round(time.perf_counter() - t0, 1),
                          "command": "python bench/gate.py " + " ".join(
                              [f"--noise {' '.join(map(str, args.noise))}",
                               f"--seeds {' '.join(map(str, args.seeds))}"])})
    print(md)


if __name__ == "__main__":
    main()
