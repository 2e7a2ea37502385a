"""Benchmark of the whitened_patches embedder on CIFAR-10: feature seconds and peak memory, then the
out-of-fold accuracy, NLL and ECE of perceive's head on the features (4 folds).

Writes ``bench/results/patches_<date>.json`` (or ``--json``) and prints one line per step.

Examples
--------
  python bench/patches.py --n 10000                      # ~3 min on 2 quiet cores
  python bench/patches.py --n 50000 --lr 0.01 --weight-decay 0.005 --head-threads 1
  python bench/patches.py --n 50000 --device cuda --json /tmp/patches.json   # on a GPU
"""
from __future__ import annotations

import datetime as dt
import io
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import argument_parser  # noqa: E402
from dataopt.embed.patches import WhitenedPatchesEmbedder  # noqa: E402
from dataopt.io import write_json  # noqa: E402
from dataopt.perceive.dynamics import OOFDynamics  # noqa: E402
from dataopt.train import loop  # noqa: E402


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, ``bins`` equal-width bins."""
    conf, ok = probs.max(1), probs.argmax(1) == labels
    which = np.clip((conf * bins).astype(int), 0, bins - 1)
    return float(sum(abs(ok[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--n", type=int, default=10000, help="first n train images")
    ap.add_argument("--n-patches", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--fit-patches", type=int, default=100_000, help="patches the whitening is estimated on")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.005)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--head-threads", type=int, default=1, help="torch threads of the head (1: no stalls on shared cores)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where features and head run")
    ap.add_argument("--json", type=Path, default=None, help="the JSON result's path")
    args = ap.parse_args()
    device = loop.resolve_device(args.device, "--device")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    table = pq.read_table(args.data / "train.parquet", columns=["image", "label"]).slice(0, args.n).to_pydict()
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table["image"]])
    labels = np.asarray(table["label"], np.int64)
    load = os.getloadavg()[0]

    t0 = time.perf_counter()
    emb = WhitenedPatchesEmbedder(n_patches=args.n_patches, pool=args.pool, fit_patches=args.fit_patches,
                                  device=device.type).fit(images)
    sync()
    t1 = time.perf_counter()
    feats = emb.transform(images).astype(np.float16)  # as embeddings.npy stores them
    sync()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"features ({device.type}): n {len(images)} dim {emb.dim_} fit {t1 - t0:.1f} s transform {t2 - t1:.1f} s "
          f"peak RSS {peak:.2f} GiB (load {load:.1f})", flush=True)

    torch.set_num_threads(args.head_threads)
    oof = OOFDynamics(lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, device=device.type)
    dyn = oof.fit(feats.astype(np.float32), labels, 10).dynamics_
    sync()
    t3 = time.perf_counter()
    acc = dyn.correct.mean(1)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "n": len(images),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "n_patches": args.n_patches, "pool": args.pool, "fit_patches": args.fit_patches, "dim": emb.dim_, "load_at_start": load,
        "fit_seconds": t1 - t0, "transform_seconds": t2 - t1, "peak_rss_gib": peak,
        "head": {"lr": args.lr, "weight_decay": args.weight_decay, "epochs": args.epochs, "folds": 4,
                 "threads": args.head_threads, "seconds": t3 - t2},
        "oof_accuracy_per_epoch": acc.round(4).tolist(), "oof_nll": float(dyn.loss[-1].mean()),
        "oof_ece": ece(dyn.probs, labels),
    }
    print(f"head: {t3 - t2:.1f} s, out-of-fold accuracy {acc[-1]:.4f}, NLL {result['oof_nll']:.3f}, "
          f"ECE {result['oof_ece']:.3f}")
    write_json(args.json or ROOT / "bench" / "results" / f"patches_{dt.date.today().isoformat()}.json", result)


if __name__ == "__main__":
    main()
