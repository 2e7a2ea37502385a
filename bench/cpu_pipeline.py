"""The README's CIFAR-10N command end to end, as a user runs it, with the defaults this machine gets.

Runs ``dataopt run`` (the command of the README's *Your own data*, training on ``random_label1``) in a fresh
temporary project, once per seed, and records its wall time, peak memory (the largest child's peak RSS,
``resource.getrusage``), every stage's seconds, which ``auto`` defaults applied,
the test accuracy, and the label-issue detection of the analysis against the true errors
(``label != label_clean``). cleanlab's ``find_label_issues`` then runs on the very out-of-fold
probabilities the perceive stage wrote (``perceive/dynamics.npz``), so both detectors see the same model.

Writes ``bench/results/cpu_pipeline_cifar10n.json`` (atomic) and prints a table.

Examples
--------
  python bench/cpu_pipeline.py                       # ~10 min per seed on 2 quiet cores
  python bench/cpu_pipeline.py --seeds 2 --set train.epochs=20
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import argument_parser  # noqa: E402
from dataopt.io import read_json, write_json  # noqa: E402

# the README's command (its --set list), the data folder substituted
README_SETS = ("ingest.source=parquet", "ingest.path={data}/train.parquet", "ingest.eval_path={data}/test.parquet",
               "ingest.label_column=random_label1", "ingest.eval_label_column=label",
               "ingest.clean_label_column=label", "ingest.id_column=id")


def run_once(args: Any, seed: int, work: Path) -> dict[str, Any]:
    root = work / f"s{seed}"
    root.mkdir()
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    sets = [s.format(data=args.data.resolve()) for s in README_SETS] + [f"seed={seed}"] + args.set
    cmd = [sys.executable, "-m", "dataopt.cli", "run", *(x for s in sets for x in ("--set", s))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"dataopt run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    art = root / "artifacts"
    stages = {n: read_json(art / n / "stage.json") for n in
              ("ingest", "embed", "perceive", "analyze", "optimize", "train", "evaluate")}
    analyze = stages["analyze"]["metrics"]
    return {
        "seed": seed, "wall_seconds": round(wall, 1),
        "peak_rss_gb": round(peak_kb / 2**20, 2) if peak_kb > before else None,
        "stage_seconds": {n: s["metrics"]["seconds"] for n, s in stages.items()},
        "defaults": stages["embed"].get("defaults"),
        "test_accuracy": stages["evaluate"]["metrics"]["accuracy"],
        "oof_accuracy": stages["perceive"]["metrics"]["oof_accuracy"],
        "dataopt": {k.removeprefix("detection_"): analyze[k] for k in analyze if k.startswith("detection_")},
        "detector": read_json(art / "analyze" / "analysis.json")["detector"],
        "cleanlab": cleanlab_on(art),
        "summary": proc.stdout[proc.stdout.find("dataopt run summary"):],
    }


def cleanlab_on(art: Path) -> dict[str, Any]:
    """cleanlab's default ``find_label_issues`` on perceive's out-of-fold probabilities."""
    import pandas as pd
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues

    z = np.load(art / "perceive" / "dynamics.npz")
    signals = pd.read_parquet(art / "perceive" / "signals.parquet", columns=["sample_id", "label"])
    samples = pd.read_parquet(art / "ingest" / "samples.parquet", columns=["sample_id", "label_clean"])
    clean = samples.set_index("sample_id").loc[signals["sample_id"], "label_clean"].to_numpy()
    labels, probs = signals["label"].to_numpy(), np.asarray(z["probs"], np.float64)
    probs /= probs.sum(1, keepdims=True)
    truth, flags = labels != clean, find_label_issues(labels, probs)
    tp = int((flags & truth).sum())
    precision, recall = tp / max(int(flags.sum()), 1), tp / max(int(truth.sum()), 1)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "estimated_noise_rate": float(1.0 - np.trace(estimate_joint(labels, probs))),
            "true_noise_rate": float(truth.mean())}


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1 (params.yaml's seed)")
    ap.add_argument("--set", action="append", default=[], help="extra --set overrides for dataopt run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_pipeline_cifar10n.json")
    args = ap.parse_args()
    if not (args.data / "train.parquet").exists():
        print(f"bench/cpu_pipeline.py: error: {args.data}/train.parquet not found (--data)", file=sys.stderr)
        sys.exit(2)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dataopt_cpu_pipeline_") as work:
        for seed in range(args.seeds):
            runs.append(run_once(args, seed, Path(work)))
            r = runs[-1]
            print(f"seed {seed}: {r['wall_seconds']:.0f} s, test accuracy {r['test_accuracy']:.4f}, "
                  f"{r['detector']} F1 {r['dataopt']['f1']:.3f} (noise rate {r['dataopt']['estimated_noise_rate']:.3f}"
                  f" vs {r['dataopt']['true_noise_rate']:.3f}), cleanlab F1 {r['cleanlab']['f1']:.3f}", flush=True)
    write_json(args.out, {"command": "python bench/cpu_pipeline.py " + " ".join(sys.argv[1:]),
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": os.getloadavg(),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
