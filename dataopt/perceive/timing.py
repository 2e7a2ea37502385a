"""Time every registered signal and the class/corpus summaries on synthetic inputs (not a test).

    python -m dataopt.perceive.timing --n 50000 --d 512

The proxy training run and the kNN search are excluded (the issue's target: all signals and analysis on
50k samples with precomputed embeddings in <= 2 minutes on 2 cores). Inputs: ``n`` L2-normalised
``d``-dim embeddings around ``classes`` centres, a random kNN graph of ``k`` neighbours and ``epochs``
epochs of random out-of-fold dynamics.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dataopt.perceive.dynamics import Dynamics
from dataopt.perceive.signals import SignalInputs, compute_signals
from dataopt.perceive.summary import class_table, corpus_summary
from dataopt.registry import SIGNALS


def synthetic_inputs(n: int = 50_000, d: int = 512, classes: int = 10, k: int = 10, epochs: int = 12,
                     text: bool = True, seed: int = 0) -> SignalInputs:
    """:class:`SignalInputs` of ``n`` synthetic rows (float32 embeddings, float32 dynamics)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    emb = centres[y] + 2.0 * rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), y] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_y = probs[np.arange(n), y]
    per_epoch = lambda v: np.clip(v[None] + 0.05 * rng.normal(size=(epochs, n)), 1e-4, 1).astype(np.float32)
    p_label = per_epoch(p_y)
    dyn = Dynamics(
        sample_id=np.arange(n, dtype=np.int64), fold=rng.integers(0, 4, n), loss=-np.log(p_label),
        p_label=p_label, margin=per_epoch(p_y) - 0.5, correct=per_epoch(p_y) > 0.5,
        logit_margin=per_epoch(p_y) * 4 - 2, error_norm=1 - p_label, feature_norm=per_epoch(np.full(n, 0.9)),
        center_distance=per_epoch(1 - p_y),
        probs=probs, epochs_completed=epochs, epochs_per_fold=np.full(4, epochs),
    )
    idx = (np.arange(n)[:, None] + rng.integers(1, n, (n, k))) % n  # never the row itself
    dist = np.sort(rng.uniform(0.5, 1.5, (n, k)).astype(np.float32), axis=1)
    text_emb = centres / np.linalg.norm(centres, axis=1, keepdims=True) if text else None
    return SignalInputs(labels=y, dynamics=dyn, embeddings=emb, knn_indices=idx, knn_distances=dist,
                        text_embeddings=text_emb)


def time_signals(inputs: SignalInputs) -> dict[str, dict[str, float]]:
    """Wall and process-CPU seconds per registered signal, for ``class_table`` and ``corpus_summary``, and
    their totals (CPU seconds sum every thread; on a shared machine wall time also counts waiting)."""
    y, d = inputs.labels, inputs.dynamics
    jobs = {name: (lambda name=name: compute_signals(inputs, [name], early_epochs=3)) for name in SIGNALS}
    jobs["classes.parquet (class_table)"] = lambda: class_table(y, {}, d.correct[-1], np.zeros(len(y)),
                                                                inputs.embeddings)
    jobs["corpus.json (corpus_summary)"] = lambda: corpus_summary(y, np.zeros(len(y), bool), d.correct[-1],
                                                                  d.probs)
    wall, cpu = {}, {}
    for name, job in jobs.items():
        t, c = time.perf_counter(), time.process_time()
        job()
        wall[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
    wall["total"], cpu["total"] = sum(wall.values()), sum(cpu.values())
    return {"wall_seconds": {k: round(v, 3) for k, v in wall.items()},
            "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()}}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    result = time_signals(synthetic_inputs(args.n, args.d, k=args.k))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
