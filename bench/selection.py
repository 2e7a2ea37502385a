"""Static selection on CIFAR-10(N): every selector vs a random subset of the same size, head on embeddings.

Per label column (clean ``label`` or CIFAR-10N ``random_label1``) a temporary project runs the
project's own stages once: ingest -> embed -> perceive (out-of-fold head), then the library's analysis
(:func:`dataopt.analyze.analyze`) on the perceived signals, or on those of a saved GPU run
(``--dynamics``, substituted in memory). Then, per selector, ratio and seed, the selector is fitted
directly on those inputs and a
``dataopt.train.nets.Head`` is trained with ``dataopt.train.loop.fit`` on the kept train embeddings;
the score is the accuracy on the CIFAR-10 test split (clean labels). With ``--eval-model airbench`` the
score comes instead from the airbench CNN trained on the kept images for ``--eval-epochs`` epochs, the
same for every subset and full data (paper 002 §4: the training settings before and after selection are
kept the same); on the CPU this is the short recipe of ``bench/dynamic.py``'s CPU run (width 16, batch
256, lr 0.8). ``chain`` = ``noise_filter`` (p_clean >= 0.5) followed by ``moderate`` at the ratio
among the rows it kept. ``full`` = all rows. ``NAME:KEY=VALUE`` passes kwargs to a selector.

``--timing`` instead times every registered selector on synthetic 50k x 512 inputs (no data needed).

Examples
--------
  python bench/selection.py --timing                                   # 50k x 512, every selector
  python bench/selection.py --n 2000 --seeds 1 --ratios 0.3            # smoke run
  python bench/selection.py --n 20000 --label-columns random_label1 label
  # signals of a saved GPU run (bench/noise.py --save-dynamics), CNN-proxy embeddings, pixel-PCA scorer:
  python bench/selection.py --label-columns random_label1 --dynamics bench/dynamics
      --detector calibrated_confidence --embed-backend proxy --embed-kwargs '{"epochs": 15, "folds": 0}'
      --eval-features pixels --out bench/results/selection_airbench_signals     (one command line)
  # the same signals, scored by the airbench CNN trained on each subset (2 CPU cores: ~30 min, 6 selectors)
  python bench/selection.py --label-columns random_label1 --dynamics bench/dynamics --ratios 0.3
      --detector calibrated_confidence --embed-backend proxy --embed-kwargs '{"epochs": 15, "folds": 0}'
      --eval-model airbench --selectors random moderate chain noise_filter --out bench/results/x
  # Moderate on an extractor that never saw the row: a CPU 4-fold airbench perceive run gives
  # oof_center_distance (the saved GPU file predates it, so this run's value is kept); --work keeps
  # the stages so a second run (e.g. --eval-model airbench) reuses them
  python bench/selection.py --label-columns random_label1 --dynamics bench/dynamics --ratios 0.3
      --detector calibrated_confidence --embed-backend proxy --embed-kwargs '{"epochs": 15, "folds": 0}'
      --perceive-kwargs '{"model": "airbench", "width": 16, "epochs": 10, "augment": "flip_crop",
      "batch_size": 256, "lr": 0.8, "weight_decay": 0.00133, "label_smoothing": 0.2}' --work /tmp/sel
      --eval-features pixels --selectors random moderate moderate:score=oof_center_distance
      chain:score=oof_center_distance --out bench/results/x

Writes bench/results/selection_<label_column>.json (or selection_timing.json) atomically and prints
a markdown table.
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
from common import RECIPES, argument_parser, dynamics_file, read_dynamics, require_dynamics, stratified_subset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SELECTORS = ["random", "herding", "kcenter", "moderate", "el2n_easy", "el2n_hard",
                     "el2n_moderate", "aum_easy", "forgetting_moderate", "grand_moderate",
                     "coverage", "semantic_dedup", "noise_filter", "clip_selection",
                     "density_consistency", "chain"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--label-columns", nargs="+", default=["random_label1", "label"])
    ap.add_argument("--n", type=int, default=10000,
                    help="stratified subset of the 50k training rows (0 = all)")
    ap.add_argument("--n-test", type=int, default=10000, help="stratified test rows (0 = all 10k)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (selector and head init)")
    ap.add_argument("--selectors", nargs="+", default=DEFAULT_SELECTORS,
                    help="SELECTORS names, plus 'chain' (noise_filter -> moderate); "
                         "NAME:KEY=VALUE[,...] adds kwargs (VALUE as JSON, else a string), e.g. "
                         "moderate:score=oof_center_distance (for chain they go to moderate)")
    ap.add_argument("--embed-backend", default="pixels", help="embed.backend (pixels | proxy)")
    ap.add_argument("--embed-kwargs", type=json.loads, default={"dim": 128}, help="JSON")
    ap.add_argument("--perceive-epochs", type=int, default=20)
    ap.add_argument("--perceive-kwargs", type=json.loads, default={},
                    help="JSON merged into params perceive (e.g. an image model: model, width, augment, "
                         "lr, batch_size, label_smoothing)")
    ap.add_argument("--hidden", type=int, default=512, help="Head hidden width (perceive and eval)")
    ap.add_argument("--epochs", type=int, default=15,
                    help="epochs of the evaluation head over the full train set (subsets: same steps)")
    ap.add_argument("--detector", default="gmm", help="analyze.detector: the DETECTORS name behind p_clean")
    ap.add_argument("--dynamics", type=Path, default=None,
                    help="DIR of bench/noise.py --save-dynamics files: the out-of-fold signals and "
                         "probabilities of DIR/<label_column>_s0.npz (e.g. airbench on a GPU) replace this "
                         "run's CPU perceive ones for the subset rows (in memory) before the analysis")
    ap.add_argument("--eval-features", choices=["embeddings", "pixels"], default="embeddings",
                    help="what the evaluation head trains on: the embed stage's embeddings, or pixel-PCA "
                         "features (keeps a trained --embed-backend proxy's knowledge out of the score)")
    ap.add_argument("--eval-model", choices=["head", "airbench"], default="head",
                    help="the evaluated model: a head on --eval-features, or the airbench CNN on the images")
    ap.add_argument("--eval-epochs", type=int, default=16, help="airbench evaluator: epochs on every subset")
    ap.add_argument("--eval-width", type=int, default=16, help="airbench evaluator: width")
    ap.add_argument("--eval-device", default="auto", help="airbench evaluator: auto | cpu | cuda")
    ap.add_argument("--timing", action="store_true", help="time every selector on 50k x 512 instead")
    ap.add_argument("--timing-n", type=int, default=50000)
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the stage artifacts in DIR/<label_column> and reuse a stage whose params "
                         "(and every earlier stage's) match its last run there (default: a temporary "
                         "folder); input files are not hashed: use a new DIR when the data change")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args(argv)


def machine() -> str:
    import os
    import platform

    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")


# ----------------------------------------------------------------------------- timing

def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per selector (global and per class, ratio 0.3 and 0.7) on synthetic 50k x 512."""
    import pandas as pd

    import dataopt.plugins  # noqa: F401
    from dataopt.registry import SELECTORS

    rng = np.random.default_rng(0)
    n, d = args.timing_n, 512
    y = rng.integers(0, 10, n)
    z = rng.normal(size=(10, d))[y] + 2 * rng.normal(size=(n, d))
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)
    sig = pd.DataFrame({c: rng.random(n) for c in ("el2n", "grand", "aum", "semantic_consistency",
                                                   "knn_density")})
    sig["forgetting"] = rng.integers(0, 6, n)
    inputs = {"labels": y, "embeddings": z, "signals": sig, "p_clean": rng.random(n),
              "text_embeddings": None}
    rows = []
    for name in SELECTORS.names():
        for ratio in (0.3, 0.7):
            for per_class in (False, True):
                if name == "none" and (per_class or ratio != 0.3):
                    continue
                extra = {} if name == "none" else {"ratio": ratio, "per_class": per_class}
                sel = SELECTORS.build(name, {}, random_state=0, **extra)
                t0 = time.perf_counter()
                sel.fit(**{k: inputs[k] for k in SELECTORS.get(name).requires})
                rows.append({"selector": name, "ratio": ratio, "per_class": per_class,
                             "seconds": round(time.perf_counter() - t0, 2)})
                print(f"  {name} ratio {ratio} per_class {per_class}: {rows[-1]['seconds']} s",
                      flush=True)
    return {"n": n, "dim": d, "rows": rows}


# ----------------------------------------------------------------------------- accuracy

def prepare(args: argparse.Namespace, label_column: str, subset: np.ndarray, train: pa.Table,
            work: Path) -> dict[str, Any]:
    """Run ingest -> embed -> perceive once, then :func:`dataopt.analyze.analyze` on the perceived signals
    (those of ``--dynamics`` where given); return the selector inputs and test data."""
    import pandas as pd

    from dataopt.analyze.run import analyze
    from dataopt.analyze.confident import check_probs
    from dataopt.config import validate
    from dataopt.paths import Paths
    from dataopt.stages import run_stage

    root = work / label_column
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.take(pa.array(subset)), root / "train.parquet")
    test = pq.read_table(args.data / "test.parquet")
    # test.parquet is sorted by class: take a stratified subset, not the first rows
    rows = stratified_subset(test.column("label").to_numpy(), args.n_test, seed=0)
    pq.write_table(test.take(pa.array(rows)), root / "test.parquet")
    params = validate({
        "seed": 0,
        "ingest": {"source": "parquet", "path": str(root / "train.parquet"),
                   "eval_path": str(root / "test.parquet"), "label_column": label_column,
                   "eval_label_column": "label", "clean_label_column": "label",
                   "label_name_column": None},
        "embed": {"backend": args.embed_backend, "kwargs": args.embed_kwargs, "device": "cpu"},
        "perceive": {"model": "head", "hidden": args.hidden, "epochs": args.perceive_epochs,
                     "early_epochs": 3, "device": "cpu", "lr": 0.05, "weight_decay": 5e-4,  # the tables'
                     **args.perceive_kwargs},
        "analyze": {"detector": args.detector},
        "tracking": {"enabled": False},
    })
    paths = Paths.at(root)
    seconds = {}
    key: dict[str, Any] = {"n": args.n, "n_test": args.n_test, "seed": params.seed}
    for stage in ("ingest", "embed", "perceive"):
        key[stage] = params.section(stage)
        marker = paths.stage(stage) / ".bench_key.json"
        if marker.exists() and json.loads(marker.read_text()) == key:
            print(f"  {label_column}: {stage} reused from {paths.stage(stage)}", flush=True)
            continue
        marker.unlink(missing_ok=True)
        t0 = time.perf_counter()
        run_stage(stage, params, paths)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        marker.write_text(json.dumps(key))
        print(f"  {label_column}: {stage} {seconds[stage]} s", flush=True)
    art = root / "artifacts"
    samples = pd.read_parquet(art / "ingest" / "samples.parquet")
    emb = np.load(art / "embed" / "embeddings.npy").astype(np.float32)
    tr = (samples["split"] == "train").to_numpy()
    x_eval = emb
    images = np.load(art / "ingest" / "images.npy", mmap_mode="r")  # memory-mapped: read where used
    cnn = args.eval_model == "airbench"
    if not cnn and args.eval_features == "pixels" and args.embed_backend != "pixels":
        from dataopt.embed.backends import PixelsEmbedder

        x_eval = PixelsEmbedder(dim=128).fit(images[tr]).transform(images).astype(np.float32)
    signals = pd.read_parquet(art / "perceive" / "signals.parquet")
    labels = samples.loc[tr, "label"].to_numpy(np.int64)
    with np.load(art / "perceive" / "dynamics.npz") as z:
        probs = z["probs"]
    with np.load(art / "embed" / "knn.npz") as z:
        knn = {k: z[k] for k in ("indices", "distances")}
    text = art / "embed" / "text_embeddings.npy"
    if args.dynamics is not None:
        source_rows = subset[samples.loc[tr, "source"].str.extract(r"#row=(\d+)$")[0].astype(int).to_numpy()]
        signals, probs = saved_signals(dynamics_file(args.dynamics, label_column, 0), source_rows, labels,
                                       signals, probs, text=text.exists())
    t0 = time.perf_counter()
    analysis = analyze(signals, check_probs(probs, labels)[0], knn["distances"], params.analyze, params.seed,
                       knn_indices=knn["indices"])
    seconds["analyze"] = round(time.perf_counter() - t0, 1)
    print(f"  {label_column}: analyze {seconds['analyze']} s", flush=True)
    clean = samples.loc[tr, "label_clean"].to_numpy(np.int64)
    # test labels straight from test.parquet by the ingest "#row=i" source (independent of ingest)
    test_rows = samples.loc[~tr, "source"].str.extract(r"#row=(\d+)$")[0].astype(int).to_numpy()
    y_test = pq.read_table(root / "test.parquet", columns=["label"]).column("label").to_numpy()
    return {
        "inputs": {"labels": labels, "embeddings": emb[tr], "signals": signals,
                   "p_clean": analysis.table.column("p_clean").to_numpy(),
                   "text_embeddings": np.load(text) if text.exists() else None},
        "mislabeled": labels != clean, "x_train": x_eval[tr],
        "x_test": x_eval[~tr], "y_test": y_test[test_rows].astype(np.int64),
        "seconds": seconds,
        "images_train": np.asarray(images[tr]) if cnn else None,
        "images_test": np.asarray(images[~tr]) if cnn else None,
    }


def saved_signals(path: Path, rows: np.ndarray, labels: np.ndarray, signals, probs: np.ndarray, text: bool):
    """This run's signal table and out-of-fold probabilities with the out-of-fold ones replaced by
    those of ``path`` (a ``bench/noise.py --save-dynamics`` file over all 50k rows in train.parquet
    order) at ``rows``: every signal the library declares out of fold
    (:func:`dataopt.perceive.out_of_fold_signals`); embedding signals (kNN, class centre) stay this
    run's. The stage outputs on disk are left as perceive wrote them."""
    from dataopt.perceive.signals import out_of_fold_signals

    meta, z = read_dynamics(path)
    if not np.array_equal(z["label"][rows], labels):
        raise SystemExit(f"{path}: labels differ from this run's ({meta['label_column']}?)")
    saved = [c for c in out_of_fold_signals(list(signals.columns), text) if f"sig/{c}" in z]
    signals = signals.copy()
    for c in saved:
        signals[c] = z[f"sig/{c}"][rows].astype(signals[c].dtype)
    print(f"  signals of {path.name} ({meta.get('network')} on {meta.get('device')}, out-of-fold accuracy "
          f"{meta.get('oof_accuracy')}): {len(saved)} signals + probs", flush=True)
    return signals, z["probs"][rows].astype(probs.dtype)


def parse_selector(spec: str) -> tuple[str, dict[str, Any]]:
    """``"moderate:score=oof_center_distance,per_class=true"`` -> ``("moderate", {...})``."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--selectors {spec!r}: {item!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def select(spec: str, data: dict, ratio: float, seed: int) -> np.ndarray:
    from dataopt.registry import SELECTORS

    inputs = data["inputs"]
    n = len(inputs["labels"])
    name, kwargs = parse_selector(spec)

    def run(method: str, keep=None, **kw):
        sel = SELECTORS.build(method, kw, random_state=seed)
        return sel.fit(**{k: inputs[k] for k in SELECTORS.get(method).requires}, keep=keep).keep_

    if name == "full":
        return np.ones(n, dtype=bool)
    if name == "chain":  # noise filter, then moderate among the rows it kept (steps composition)
        return run("moderate", keep=run("noise_filter", threshold=0.5), ratio=ratio, **kwargs)
    return run(name, ratio=ratio, **kwargs)


def head_accuracy(data: dict, keep: np.ndarray, seed: int, args: argparse.Namespace) -> float:
    import torch

    from dataopt.train.loop import FitConfig, fit, predict_logits, seeded
    from dataopt.train.nets import Head

    # features z-scored with the full train statistics (unit-norm embeddings are tiny per axis);
    # every subset gets the same number of SGD steps as args.epochs over the full train set
    emb = data["x_train"]
    mu, sd = emb.mean(0), emb.std(0) + 1e-6
    x = torch.as_tensor((emb[keep] - mu) / sd)
    y = torch.as_tensor(data["inputs"]["labels"][keep])
    epochs = int(np.ceil(args.epochs * len(emb) / max(int(keep.sum()), 1)))
    with seeded(seed):
        model = Head(x.shape[1], 10, hidden=args.hidden)
    fit(model, x, y, FitConfig(epochs=epochs, batch_size=128, lr=0.02, seed=seed,
                               progress=False))
    pred = predict_logits(model, torch.as_tensor((data["x_test"] - mu) / sd)).argmax(1).numpy()
    return float((pred == data["y_test"]).mean())


# bench/dynamic.py's airbench recipe with its CPU run's batch size and learning rate (and its defaults:
# flip + 2-px crop, lookahead)
CNN_RECIPE = {**RECIPES["airbench"], "batch_size": 256, "lr": 0.8, "augment": "flip_crop", "translate": 2,
              "lookahead": True}


def cnn_accuracy(data: dict, keep: np.ndarray, seed: int, args: argparse.Namespace) -> float:
    """Test accuracy of an airbench CNN trained on the kept images for ``args.eval_epochs`` epochs."""
    import torch

    from dataopt.train.loop import FitConfig, fit, images_to_tensor, predict_logits, resolve_device, seeded
    from dataopt.train.nets import AirbenchNet

    dev = resolve_device(args.eval_device)
    x = images_to_tensor(data["images_train"][keep], dev)
    y = torch.as_tensor(data["inputs"]["labels"][keep], device=dev)
    with seeded(seed):
        model = AirbenchNet(10, width=args.eval_width, flip_tta=True).to(dev)
    fit(model, x, y, FitConfig(epochs=args.eval_epochs, seed=seed, progress=False, **CNN_RECIPE))
    logits = predict_logits(model, images_to_tensor(data["images_test"], dev))
    return float((logits.argmax(1).cpu().numpy() == data["y_test"]).mean())


def run_label(args, label_column, subset, train, work, save=None) -> dict[str, Any]:
    """Every selector at every ratio, then full data; ``save(partial)`` after each selector."""
    data = prepare(args, label_column, subset, train, work)
    results: dict[str, Any] = {}
    names = list(dict.fromkeys(["random"] + args.selectors))
    score = cnn_accuracy if args.eval_model == "airbench" else head_accuracy
    for ratio in args.ratios:
        for name in names:
            accs, noise, secs = [], [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                keep = select(name, data, ratio, seed)
                secs.append(time.perf_counter() - t0)
                noise.append(float(data["mislabeled"][keep].mean()))
                accs.append(score(data, keep, seed, args))
            results.setdefault(str(ratio), {})[name] = {
                "acc": [round(float(np.mean(accs)), 4), round(float(np.std(accs)), 4)],
                "accs": accs, "kept": int(keep.sum()),
                "kept_noise_rate": round(float(np.mean(noise)), 4),
                "select_seconds": round(float(np.mean(secs)), 2)}
            print(f"  {label_column} ratio {ratio} {name}: {np.mean(accs):.4f} ± {np.std(accs):.4f}"
                  f" (kept noise {np.mean(noise):.3f})", flush=True)
            if save is not None:  # a long (CNN) run keeps what it measured if it is stopped
                save({"label_column": label_column, "n": int(len(subset)), "full": None,
                      "noise_rate": round(float(data["mislabeled"].mean()), 4),
                      "stage_seconds": data["seconds"], "results": results})
    full = [score(data, select("full", data, 1.0, s), s, args) for s in range(args.seeds)]
    return {"label_column": label_column, "n": int(len(subset)),
            "noise_rate": round(float(data["mislabeled"].mean()), 4),
            "full": [round(float(np.mean(full)), 4), round(float(np.std(full)), 4)],
            "stage_seconds": data["seconds"], "results": results}


def table(res: dict[str, Any]) -> str:
    ratios = list(res["results"])
    lines = [f"**{res['label_column']}** (n = {res['n']}, noise rate {res['noise_rate']:.3f}, "
             f"full data {res['full'][0]:.4f} ± {res['full'][1]:.4f}); test accuracy, "
             "Δ vs random in points, [kept noise rate]", "",
             "| selector | " + " | ".join(f"{r}" for r in ratios) + " |",
             "| --- |" + " --- |" * len(ratios)]
    for name in res["results"][ratios[0]]:
        cells = []
        for r in ratios:
            m = res["results"][r][name]
            delta = 100 * (m["acc"][0] - res["results"][r]["random"]["acc"][0])
            cells.append(f"{m['acc'][0]:.4f} ± {m['acc'][1]:.4f} ({delta:+.1f}) "
                         f"[{m['kept_noise_rate']:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from dataopt.io import write_json

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.timing:
        t = timing(args)
        write_json(args.out / "selection_timing.json", {"config": cfg, "machine": machine(), **t})
        print("| selector | ratio | per_class | seconds |\n| --- | --- | --- | --- |")
        for r in t["rows"]:
            print(f"| {r['selector']} | {r['ratio']} | {r['per_class']} | {r['seconds']} |")
        return 0
    if not (args.data / "train.parquet").exists():
        print(f"bench/selection.py: {args.data / 'train.parquet'} is absent; skipping")
        return 0
    import dataopt.plugins  # noqa: F401

    for col in args.label_columns if args.dynamics is not None else ():
        require_dynamics(dynamics_file(args.dynamics, col, 0))  # before the stages run
    train = pq.read_table(args.data / "train.parquet")
    subset = stratified_subset(train.column("label").to_numpy(), args.n, seed=0)
    with tempfile.TemporaryDirectory(prefix="dataopt_selection_") as tmp:
        work = Path(tmp) if args.work is None else args.work
        for col in args.label_columns:
            t0 = time.perf_counter()

            def save(res: dict[str, Any], col=col, t0=t0) -> None:
                write_json(args.out / f"selection_{col}.json", {
                    **res, "config": cfg, "machine": machine(),
                    **({"eval_recipe": CNN_RECIPE} if args.eval_model == "airbench" else {}),
                    "seconds": round(time.perf_counter() - t0, 1)})

            res = run_label(args, col, subset, train, work, save)
            save(res)
            print(table(res), flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
