"""Drift detection on CIFAR-10 (issue 18): false-positive rate and power of every ``DRIFT_TESTS`` test
and of the overall verdict of :func:`dataopt.drift.check.check_drift` (the drift stage's one function,
with ``DriftParams``' defaults), against Evidently's embedding-drift methods on the same embeddings.

Data (``--data``, CIFAR-10 train/test parquet, clean ``label`` column), split once by ``--seed``:
an *embedder* set of train rows trains the project's ``proxy`` embedder (a SmallCNN; OpenCLIP weights
cannot be downloaded here), a disjoint *reference* set of train rows is the reference, a third disjoint
set of train rows is the *pool* batches come from, and test rows are a pool of their own (the
``test_split`` scenario: CIFAR's test images differ measurably from its training images in brightness
and contrast, so they are no null). The embedder never sees the reference or the pools, so both sides
are embedded out of sample (the ``insample`` scenario measures what happens when the reference is
the embedder's own training rows, as with a proxy embedder fitted on the train split). Every image set is embedded once -- the pool, and a corrupted copy of a stratified part
of it per CIFAR-10-C corruption and severity (``dataopt.drift.shifts.corrupt``) -- and cached under
``--cache``; batches are index sets into those arrays. The new-class scenario holds ``NEW_CLASS`` out
of the reference and of a second embedder's training rows.

Scenarios: ``no_shift`` (train pool); ``test_split`` (test pool); ``<corruption>_s<severity>``;
``prior`` (``PRIOR_CLASSES`` at a third of their share); ``new_class`` (10 % of the batch from the held-out class); ``label_noise`` (+15 points,
symmetric); ``insample`` (no shift, reference = the embedder's training rows). Each check runs
``check_drift`` on (reference, batch) with the ``DriftParams`` defaults (``--permutations`` overrides
the MMD null draws), then Evidently's ``model`` (its default: a ``SGDClassifier`` domain classifier
on a 50/50 split, drift if ROC AUC > 0.55; with a bootstrap threshold when the reference has < 1000
rows), ``mmd``, ``ratio`` and ``distance`` methods with their defaults, called exactly as Evidently's
``EmbeddingsDriftMetric`` calls them (``method(current, reference)``) on the same embeddings and the
same number of reference rows as dataopt's embedding tests (``max_reference``).

Examples
--------
  python bench/drift.py --quick --evidently-python /work/evvenv/bin/python   # every code path, small sizes
  python bench/drift.py --permutations 200 --evidently-python /work/evvenv/bin/python   # the null cells
  python bench/drift.py --permutations 200 --evidently-python /work/evvenv/bin/python --resume \
      --sizes 500 --repeats 10          # add the power cells to the same JSON (docs/benchmarks.md)
  python bench/drift.py --timing                     # one check: 5,000 vs 50,000 rows x 512-d

Writes bench/results/drift_cifar10.json (``--quick``: drift_cifar10_quick.json; ``--timing``:
drift_timing.json), atomically after every cell, and prints markdown tables.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import argument_parser, decode_images, split_cifar_rows, stratified_subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_CLASSES = 10
PRIOR_CLASSES = (2, 3, 4)  # bird, cat, deer: each at a third of its share
NEW_CLASS = 9  # truck: held out of the reference (and of the new-class embedder's training rows)
NEW_CLASS_FRACTION = 0.10
NOISE_POINTS = 0.15
SHIFTS = ("test_split", "prior", "new_class", "label_noise")
POWER_TARGET = 0.9
FPR_TARGET = (0.02, 0.08)


def parse_args(argv=None):
    ap = argument_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes and repeats: a check of the code path")
    ap.add_argument("--timing", action="store_true",
                    help="only time one check of 5,000 vs 50,000 synthetic 512-d rows (all tests)")
    ap.add_argument("--seed", type=int, default=0, help="the row split and the embedders")
    ap.add_argument("--embedder-rows", type=int, default=5000)
    ap.add_argument("--reference-rows", type=int, default=5000)
    ap.add_argument("--pool-train", type=int, default=5000, help="train rows in the batch pool")
    ap.add_argument("--pool-test", type=int, default=2500, help="rows of the test_split pool")
    ap.add_argument("--corrupt-rows", type=int, default=2500, help="pool rows corrupted per kind x severity")
    ap.add_argument("--epochs", type=int, default=5, help="proxy embedder epochs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--power-size", type=int, default=500, help="batch size of the full severity grid")
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--side-severity", type=int, default=3,
                    help="the severity also run at the other --sizes")
    ap.add_argument("--null-repeats", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=30, help="per shift scenario and batch size")
    ap.add_argument("--insample-repeats", type=int, default=50, help="0 = skip the in-sample reference")
    ap.add_argument("--permutations", type=int, default=None, help="MMD null draws (default: DriftParams)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/dataopt_drift_cache"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--evidently-python", default=sys.executable,
                    help="a Python with evidently 0.7 and pandas < 3 (Evidently runs in a worker process)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells of the existing output JSON and run only the missing ones")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.quick:
        args.embedder_rows, args.reference_rows, args.pool_train, args.pool_test = 2000, 2000, 1000, 1000
        args.corrupt_rows, args.epochs, args.sizes, args.power_size = 500, 1, [100, 300], 100
        args.severities, args.null_repeats, args.repeats, args.insample_repeats = [3], 3, 2, 2
        args.permutations = args.permutations or 100
    return args


# ---------------------------------------------------------------------------------------------- data

def train_embedder(images: np.ndarray, labels: np.ndarray, args):
    from dataopt.registry import EMBEDDERS
    import dataopt.plugins  # noqa: F401

    emb = EMBEDDERS.get("proxy")(epochs=args.epochs, folds=0, device="cpu", random_state=args.seed)
    return emb.fit(images, labels, n_classes=N_CLASSES)


def build_data(args) -> dict[str, np.ndarray]:
    """Every array the checks draw from, computed once and cached (``--cache``)."""
    import pyarrow.parquet as pq
    from dataopt.drift.shifts import CORRUPTIONS, corrupt

    key = (f"v2_s{args.seed}_e{args.embedder_rows}_r{args.reference_rows}_p{args.pool_train}+{args.pool_test}"
           f"_c{args.corrupt_rows}_ep{args.epochs}")
    path = args.cache / f"drift_{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    train = pq.read_table(args.data / "train.parquet", columns=["image", "label"])
    test = pq.read_table(args.data / "test.parquet", columns=["image", "label"])
    ytr, yte = train.column("label").to_numpy().astype(int), test.column("label").to_numpy().astype(int)
    rows = split_cifar_rows({"embedder": args.embedder_rows, "reference": args.reference_rows,
                             "pool_train": args.pool_train}, args.pool_test, args.seed, ytr, yte)
    take = lambda table, idx: decode_images(table.take(idx))  # noqa: E731
    d = {"embedder_images": take(train, rows["embedder"]), "embedder_labels": ytr[rows["embedder"]],
         "ref_images": take(train, rows["reference"]), "ref_labels": ytr[rows["reference"]],
         "pool_images": take(train, rows["pool_train"]), "pool_labels": ytr[rows["pool_train"]],
         "test_images": take(test, rows["pool_test"]), "test_labels": yte[rows["pool_test"]]}
    print(f"decoded in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    embedder = train_embedder(d["embedder_images"], d["embedder_labels"], args)
    d["embed_seconds"] = np.array(time.perf_counter() - t0)
    d["embedder_emb"] = embedder.transform(d["embedder_images"])
    d["ref_emb"] = embedder.transform(d["ref_images"])
    d["pool_emb"] = embedder.transform(d["pool_images"])
    d["test_emb"] = embedder.transform(d["test_images"])
    d["corrupt_rows"] = stratified_subset(d["pool_labels"], args.corrupt_rows, args.seed)
    rng = np.random.default_rng(args.seed)
    for kind in CORRUPTIONS:
        for s in range(1, 6):
            img = corrupt(d["pool_images"][d["corrupt_rows"]], kind, s, rng)
            d[f"{kind}_s{s}_images"], d[f"{kind}_s{s}_emb"] = img, embedder.transform(img)
    print(f"embedder trained and {len(CORRUPTIONS) * 5} corrupted pools embedded in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    keep = d["embedder_labels"] != NEW_CLASS
    nc = train_embedder(d["embedder_images"][keep], d["embedder_labels"][keep], args)
    d["nc_ref_emb"] = nc.transform(d["ref_images"])
    d["nc_pool_emb"] = nc.transform(d["pool_images"])
    d["total_prep_seconds"] = np.array(time.perf_counter() - t0)
    from dataopt.io import save_npz  # the Evidently worker imports this script without dataopt's deps

    args.cache.mkdir(parents=True, exist_ok=True)
    save_npz(path, **d)
    return d


# ---------------------------------------------------------------------------------------- scenarios

def scenarios(args) -> list[tuple[str, int, int]]:
    """``(scenario, batch size, repeats)`` cells in priority order: the null at every size, every shift
    at ``--power-size``, then ``--side-severity`` and the other shifts at the other sizes."""
    from dataopt.drift.shifts import CORRUPTIONS

    cells = [("no_shift", n, args.null_repeats) for n in args.sizes]
    if args.insample_repeats:
        cells.append(("insample", args.power_size, args.insample_repeats))
    cells += [(f"{k}_s{s}", args.power_size, args.repeats) for k in CORRUPTIONS for s in args.severities]
    cells += [(name, args.power_size, args.repeats) for name in SHIFTS]
    others = [n for n in args.sizes if n != args.power_size]
    cells += [(name, n, args.repeats) for n in others
              for name in [f"{k}_s{args.side_severity}" for k in CORRUPTIONS] + list(SHIFTS)]
    return cells


def draw(d: dict, scenario: str, size: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """``(reference, batch)`` sides (embeddings, labels, images) of one check."""
    from dataopt.drift import shifts

    ref = {"embeddings": d["ref_emb"], "labels": d["ref_labels"], "images": d["ref_images"]}
    pool_y = d["pool_labels"]
    side = lambda emb, y, img, idx: {"embeddings": emb[idx], "labels": y[idx], "images": img[idx]}  # noqa: E731
    if scenario in ("no_shift", "label_noise", "insample"):
        b = side(d["pool_emb"], pool_y, d["pool_images"], shifts.no_shift(len(pool_y), size, rng))
        if scenario == "label_noise":
            b["labels"] = shifts.raise_label_noise(b["labels"], NOISE_POINTS, N_CLASSES, rng)[0]
        if scenario == "insample":
            ref = {"embeddings": d["embedder_emb"], "labels": d["embedder_labels"], "images": d["embedder_images"]}
        return ref, b
    if scenario == "test_split":
        idx = shifts.no_shift(len(d["test_labels"]), size, rng)
        return ref, side(d["test_emb"], d["test_labels"], d["test_images"], idx)
    if scenario == "prior":
        idx = shifts.class_prior_shift(pool_y, PRIOR_CLASSES, 1 / 3, size, rng)
        return ref, side(d["pool_emb"], pool_y, d["pool_images"], idx)
    if scenario == "new_class":
        keep = d["ref_labels"] != NEW_CLASS
        ref = {"embeddings": d["nc_ref_emb"][keep], "labels": d["ref_labels"][keep], "images": d["ref_images"][keep]}
        idx = shifts.with_new_class(pool_y, NEW_CLASS, NEW_CLASS_FRACTION, size, rng)
        return ref, side(d["nc_pool_emb"], pool_y, d["pool_images"], idx)
    rows = d["corrupt_rows"]
    idx = shifts.no_shift(len(rows), size, rng)
    return ref, side(d[f"{scenario}_emb"], pool_y[rows], d[f"{scenario}_images"], idx)


def evidently_methods(n_reference: int) -> dict[str, Any]:
    """Evidently's embedding-drift methods with their defaults; ``model`` as ``EmbeddingsDriftMetric``
    builds it when no method is given (bootstrap threshold only for a reference under 1000 rows)."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import distance, mmd, model, ratio

    return {"evidently_model": model(bootstrap=n_reference < 1000), "evidently_mmd": mmd(),
            "evidently_ratio": ratio(), "evidently_distance": distance()}


def evidently_worker() -> None:
    """``--evidently-worker``: read pickled ``(batch, reference)`` embedding pairs on stdin, answer each
    with ``{method: (score, drift, seconds)}`` on stdout. Evidently runs in its own interpreter
    (``--evidently-python``) because 0.7.x imports a pandas internal that pandas 3 removed."""
    import pickle

    import pandas as pd

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    while True:
        try:
            bat, ref = pickle.load(inp)
        except EOFError:
            return
        answer = {}
        for name, method in evidently_methods(len(ref)).items():
            t0 = time.perf_counter()
            score, drift, _ = method(pd.DataFrame(bat), pd.DataFrame(ref))  # as EmbeddingsDriftMetric calls it
            answer[name] = (float(score), bool(drift), time.perf_counter() - t0)
        pickle.dump(answer, out, protocol=5)
        out.flush()


class Evidently:
    """The client of one :func:`evidently_worker` process."""

    def __init__(self, python: str):
        import subprocess

        self.proc = subprocess.Popen([python, __file__, "--evidently-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def __call__(self, bat: np.ndarray, ref: np.ndarray) -> dict[str, tuple[float, bool, float]]:
        import pickle

        pickle.dump((bat, ref), self.proc.stdin, protocol=5)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()

    def version(self) -> str:
        import subprocess

        return subprocess.run([self.proc.args[0], "-c", "import evidently, pandas; print(evidently.__version__, "
                               "'pandas', pandas.__version__)"], capture_output=True, text=True).stdout.strip()


def one_check(ref: dict, bat: dict, params, permutations: int, random_state: int,
              rng: np.random.Generator, evidently: Evidently) -> dict[str, Any]:
    from dataopt.drift.check import check_drift

    t0 = time.perf_counter()
    chk = check_drift(ref, bat, n_classes=N_CLASSES, tests=params.tests, alpha=params.alpha,
                      permutations=permutations, max_reference=params.max_reference,
                      min_batch=params.min_batch, effect_floor=params.effect_floor, random_state=random_state)
    out = {"seconds": {"dataopt": time.perf_counter() - t0},
           "decision": {n: r.decision for n, r in chk.results.items()},
           "decided": dict(chk.verdict.decided), "p": {n: r.p_value for n, r in chk.results.items()},
           "effect": {n: r.effect_size for n, r in chk.results.items()}}
    out["decision"]["verdict"] = chk.verdict.drift
    # Evidently gets the same embeddings and as many reference rows as dataopt's embedding tests use
    rows = rng.choice(len(ref["embeddings"]), min(params.max_reference, len(ref["embeddings"])), replace=False)
    for name, (score, drift, seconds) in evidently(bat["embeddings"], ref["embeddings"][rows]).items():
        out["seconds"][name], out["decision"][name], out["effect"][name] = seconds, drift, score
    return out


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    p = k / n
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, c - h), min(1.0, c + h)]


def summarise(checks: list[dict]) -> dict[str, Any]:
    n = len(checks)
    names = list(checks[0]["decision"])
    k = {m: int(sum(c["decision"][m] for c in checks)) for m in names}
    return {"repeats": n, "rate": {m: k[m] / n for m in names}, "ci95": {m: wilson(k[m], n) for m in names},
            "verdict_counted": {t: sum(c["decided"][t] for c in checks) / n for t in checks[0]["decided"]},
            "seconds": {m: float(np.mean([c["seconds"][m] for c in checks])) for m in checks[0]["seconds"]},
            "median_p": {t: float(np.median([c["p"][t] for c in checks])) for t in checks[0]["p"]},
            "median_effect": {t: float(np.median([c["effect"][t] for c in checks])) for t in checks[0]["effect"]}}


# -------------------------------------------------------------------------------------------- report

def targets(cells: dict[str, dict], args) -> dict[str, Any]:
    """The issue's targets, each with the numbers it was judged on (absent cells are not judged)."""
    from dataopt.drift.shifts import CORRUPTIONS

    out: dict[str, Any] = {}
    null = {int(c.split("@")[1]): v for c, v in cells.items() if c.startswith("no_shift@")}
    out["fpr_in_range"] = {f"{m}@{n}": v["rate"][m] for n, v in null.items() for m in v["rate"]
                           if not m.startswith("evidently") and not FPR_TARGET[0] <= v["rate"][m] <= FPR_TARGET[1]}
    out["fpr_all_in_range"] = not out["fpr_in_range"] and bool(null)
    n = args.power_size
    wanted = [f"{k}_s{s}" for k in CORRUPTIONS for s in (3, 4, 5)] + ["prior", "new_class", "label_noise"]
    power = {w: cells[f"{w}@{n}"]["rate"]["verdict"] for w in wanted if f"{w}@{n}" in cells}
    out["power_below_target"] = {w: p for w, p in power.items() if p < POWER_TARGET}
    out["vs_evidently"] = {}
    for c, v in cells.items():
        scn, size = c.split("@")
        if scn in ("no_shift", "insample") or f"no_shift@{size}" not in cells:
            continue
        fpr = cells[f"no_shift@{size}"]["rate"]
        out["vs_evidently"][c] = {"verdict_power": v["rate"]["verdict"], "evidently_power": v["rate"]["evidently_model"],
                                  "verdict_fpr": fpr["verdict"], "evidently_fpr": fpr["evidently_model"],
                                  "at_least_as_good": v["rate"]["verdict"] >= v["rate"]["evidently_model"]
                                  and fpr["verdict"] <= fpr["evidently_model"]}
    smallest = {}
    for kind in CORRUPTIONS:
        row = {}
        for m in next(iter(cells.values()))["rate"]:
            hits = [s for s in range(1, 6) if cells.get(f"{kind}_s{s}@{n}", {}).get("rate", {}).get(m, 0) >= POWER_TARGET]
            row[m] = min(hits) if hits else None  # None: not detected at any severity run
        smallest[kind] = row
    out["smallest_severity_detected"] = smallest
    return out


def table(cells: dict[str, dict]) -> str:
    methods = list(next(iter(cells.values()))["rate"])
    short = {m: m.replace("evidently_", "ev_") for m in methods}
    lines = ["| scenario | batch | " + " | ".join(short[m] for m in methods) + " | s/check | ev_model s |",
             "| --- | ---: | " + " | ".join("---:" for _ in methods) + " | ---: | ---: |"]
    for c, v in cells.items():
        scn, size = c.split("@")
        lines.append(f"| {scn} | {size} | " + " | ".join(f"{v['rate'][m]:.2f}" for m in methods)
                     + f" | {v['seconds']['dataopt']:.2f} | {v['seconds']['evidently_model']:.3f} |")
    return "\n".join(lines)


def environment(args) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("numpy", "scipy", "scikit-learn", "torch", "pandas")}
    return {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}", "versions": versions, "note": args.note,
            "command": "python bench/drift.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_grid(args) -> None:
    from dataopt.config import DriftParams
    from dataopt.io import write_json

    params = DriftParams()
    permutations = args.permutations or params.permutations
    d = build_data(args)
    out_path = args.out / ("drift_cifar10_quick.json" if args.quick else "drift_cifar10.json")
    setup = {k: v for k, v in vars(args).items() if k not in ("data", "cache", "out")}
    setup.update({"permutations": permutations, "drift_params": params.model_dump(mode="json"),
                  "prior_classes": PRIOR_CLASSES, "new_class": NEW_CLASS, "new_class_fraction": NEW_CLASS_FRACTION,
                  "noise_points": NOISE_POINTS, "embedder": f"proxy (SmallCNN width 32, {args.epochs} epochs, "
                  f"{args.embedder_rows} train rows disjoint from the reference and the pool)",
                  "prep_seconds": float(d["total_prep_seconds"])})
    evidently = Evidently(args.evidently_python)
    setup["evidently"] = evidently.version()
    cells: dict[str, dict] = {}
    runs = [environment(args)]  # one entry per invocation that added cells (--resume appends)
    if args.resume and out_path.exists():
        from dataopt.io import read_json
        old = read_json(out_path)
        cells, runs = old["cells"], old.get("runs", [old.get("environment")]) + runs
    t_start = time.perf_counter()
    for scenario, size, repeats in scenarios(args):
        if f"{scenario}@{size}" in cells:
            continue
        checks = []
        for r in range(repeats):
            rng = np.random.default_rng([args.seed, size, r, sum(map(ord, scenario))])
            ref, bat = draw(d, scenario, size, rng)
            checks.append(one_check(ref, bat, params, permutations, r, rng, evidently))
        cells[f"{scenario}@{size}"] = summarise(checks)
        v = cells[f"{scenario}@{size}"]
        print(f"{scenario:>20} @{size:<5} verdict {v['rate']['verdict']:.2f} ev_model "
              f"{v['rate']['evidently_model']:.2f}  {v['seconds']['dataopt']:.2f}s/check  "
              f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        v["run"] = len(runs) - 1
        write_json(out_path, {"setup": setup, "runs": runs, "cells": cells,
                              "targets": targets(cells, args), "table": table(cells),
                              "grid_seconds": time.perf_counter() - t_start})
    evidently.close()
    print(table(cells))
    print(f"wrote {out_path}")


def run_timing(args) -> None:
    """One check (every default test) of 5,000 vs 50,000 synthetic 512-d unit vectors with labels and
    32x32 images; embedding excluded."""
    from dataopt.config import DriftParams
    from dataopt.drift.check import check_drift
    from dataopt.io import write_json

    params = DriftParams()
    rng = np.random.default_rng(args.seed)

    def side(n):
        x = rng.normal(size=(n, 512)).astype(np.float32)
        return {"embeddings": x / np.linalg.norm(x, axis=1, keepdims=True),
                "labels": rng.integers(0, N_CLASSES, n), "images": rng.integers(0, 256, (n, 32, 32, 3), np.uint8)}

    ref, bat = side(50000), side(5000)
    per_test: dict[str, float] = {}
    last = [None, time.perf_counter()]

    def progress(name):  # the time between two progress calls is the previous test's (the proxy: before the first)
        now = time.perf_counter()
        per_test[last[0] or "proxy"] = now - last[1]
        last[:] = [name, now]

    t0 = time.perf_counter()
    chk = check_drift(ref, bat, n_classes=N_CLASSES, tests=params.tests, alpha=params.alpha,
                      permutations=params.permutations, max_reference=params.max_reference,
                      min_batch=params.min_batch, effect_floor=params.effect_floor, progress=progress)
    total = time.perf_counter() - t0
    per_test[last[0]] = time.perf_counter() - last[1]
    res = {"seconds": total, "per_test_seconds": per_test, "verdict": chk.verdict.drift, "target_seconds": 10.0,
           "met": total <= 10.0, "reference_rows": 50000, "batch_rows": 5000, "dim": 512,
           "environment": environment(args), "load_average": os.getloadavg()}
    write_json(args.out / "drift_timing.json", res)
    print(f"one check, 5,000 vs 50,000 x 512: {total:.2f}s (target 10 s; load {os.getloadavg()[0]:.1f})")
    print("  " + ", ".join(f"{k} {v:.2f}s" for k, v in per_test.items()))


def main(argv=None) -> None:
    if sys.argv[1:] == ["--evidently-worker"]:
        return evidently_worker()
    args = parse_args(argv)
    run_timing(args) if args.timing else run_grid(args)


if __name__ == "__main__":
    main()
