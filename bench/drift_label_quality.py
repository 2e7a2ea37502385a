"""Label-quality drift after the per-row issue rule (dataopt.drift.check.issue_rule): its false-positive
rate and power on the CIFAR-10 proxy embeddings that bench/drift.py caches (run that first).

Two nulls, 100-200 repeats each, DriftParams defaults, the label_quality test alone:
- fixed pool: batches drawn from bench/drift.py's no-shift pool (5,000 other train rows): what its
  table measures; a fixed finite pool differs from the reference by its own sampling noise;
- exact: batches drawn from the reference rows neither the proxy nor the rule was fitted on.
Power: label noise raised by 15 points (symmetric) at batch 500.

    python bench/drift_label_quality.py            # -> bench/results/drift_label_quality.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dataopt.config import DriftParams
from dataopt.drift.check import check_drift
from dataopt.drift.shifts import raise_label_noise

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/dataopt_drift_cache/drift_v2_s0_e5000_r5000_p5000+2500_c2500_ep5.npz")


def one(ref, emb, labels, seed, d):
    c = check_drift(ref, {"embeddings": emb, "labels": labels}, n_classes=10, tests=["label_quality"],
                    alpha=d.alpha, max_reference=d.max_reference, min_batch=d.min_batch,
                    effect_floor=d.effect_floor, random_state=seed)
    return bool(c.results["label_quality"].decision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drift_label_quality.json")
    args = ap.parse_args()
    if not args.cache.exists():
        raise SystemExit(f"{args.cache} missing: run `python bench/drift.py` first (it builds the embeddings)")
    z, d = np.load(args.cache), DriftParams()
    ref = {"embeddings": z["ref_emb"], "labels": z["ref_labels"]}
    pe, pl, re_, rl = z["pool_emb"], z["pool_labels"], z["ref_emb"], z["ref_labels"]
    out: dict = {"command": "python bench/drift_label_quality.py", "alpha": d.alpha}
    for size in (100, 500, 2000):
        t0, hits = time.time(), []
        for r in range(100):
            idx = np.random.default_rng(1000 + r).choice(len(pl), size, replace=False)
            hits.append(one(ref, pe[idx], pl[idx], r, d))
        out[f"fixed_pool_fpr@{size}"] = {"rate": float(np.mean(hits)), "repeats": 100,
                                         "seconds_per_check": (time.time() - t0) / 100}
    for size in (100, 500):
        hits = []
        for r in range(200):  # the rows fit_proxy leaves unused with random_state=r (max_reference=2000)
            order = np.random.default_rng(r).permutation(len(rl))
            unused = np.concatenate([order[2000:2500], order[4500:]])
            idx = np.random.default_rng(10_000 + r).choice(unused, size, replace=False)
            hits.append(one(ref, re_[idx], rl[idx], r, d))
        out[f"exact_fpr@{size}"] = {"rate": float(np.mean(hits)), "repeats": 200}
    hits = []
    for r in range(30):
        rng = np.random.default_rng(2000 + r)
        idx = rng.choice(len(pl), 500, replace=False)
        hits.append(one(ref, pe[idx], raise_label_noise(pl[idx], 0.15, 10, rng)[0], r, d))
    out["power_label_noise_15@500"] = {"rate": float(np.mean(hits)), "repeats": 30}
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
