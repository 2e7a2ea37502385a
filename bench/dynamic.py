"""Dynamic data selection on CIFAR-10(N): full data vs infobatch vs density_consistency vs random at equal
sample-steps, AdaAugment vs fixed policies, and the curated pipeline vs plain training on noisy labels.

Every run trains with the project's own loop (:func:`dataopt.train.loop.fit`), networks
(``airbench`` on a GPU, or a head on frozen pixel-PCA embeddings on the CPU) and selectors
(``DYNAMIC_SELECTORS``); test accuracy on the 10,000 CIFAR-10 test images, and on two fixed
class-stratified halves of them: ``val`` chooses among density_consistency variants (``chosen_on_val``
in the JSON) and ``heldout`` reports the chosen one, so the choice never sees the accuracy it is judged by.

Parts (``--parts``):
  timing     airbench on clean labels, full data: accuracy and training seconds (the 93.5% / 10 s target);
             with --recipe-items also each airbench94 recipe item ours lacks by default (fp16 autocast,
             alternating flips, the whitening bias trained for 3 epochs only) added alone, then all three
  dynamic    per label set: uniform_full, then random / infobatch / density_consistency at each budget
  curated    on random_label1: plain training vs analysis (--curate-detector: GMM p_clean on out-of-fold
             early loss, or calibrated confidence on out-of-fold probabilities; then the analyze
             stage's agreement gate) + plan (noise filter p_clean >= 0.5, p_clean weights), equal epochs
  adaaugment on clean labels: flip+crop only vs + RandAugment vs + TrivialAugmentWide vs + AdaAugment

The density_consistency signals come from a K-fold (--proxy-folds) out-of-fold proxy run on the same
labels (:meth:`Bench.proxy`): the perceive stage's ``OOFDynamics`` (its stratified folds and per-fold
seeds; for the head, its centring and one-factor scaling of the inputs) with the network and recipe of
the evaluated models (:meth:`Bench.cfg`). The signals are the library's ``SIGNALS``
``semantic_consistency`` (no text tower on CIFAR here: the out-of-fold probability of the label) and
``knn_density`` (mean Euclidean distance to the 10 nearest neighbours of the L2-normalised penultimate
features of the first fold's model, faiss). The results in bench/results/dynamic_*.json came from the
script's earlier own K-fold loop (random equal folds, seeds ``seed + f``): the same computation (given
those folds and seeds, ``OOFDynamics`` reproduces its airbench losses and features exactly) on other
folds and initialisations, so their proxy-dependent numbers reproduce to within the seed spread.

The same proxy run gives the early losses and probabilities the curated part's analysis (the library's
detector and gate) reads, unless ``--proxy-dynamics`` names a saved out-of-fold run (``bench/noise.py
--save-dynamics``, e.g. the H100 airbench run in bench/dynamics, git-ignored: bench/README.md has the
command that writes it): then the analysis reads that run's probabilities and losses for the same rows,
and only the trained models are this run's.

Examples
--------
  python bench/dynamic.py --device cuda                          # the GPU benchmark (H100: ~8 min)
  python bench/dynamic.py --device cpu --model head --seeds 2    # CPU: head on pixel-PCA embeddings
  python bench/dynamic.py --device cpu --width 16 --n 10000 --epochs 8 --proxy-epochs 8 \
      --batch-size 256 --lr 0.8 --parts dynamic curated           # CPU: a short airbench run (~1.5 h)
  python bench/dynamic.py --parts timing --seeds 3                # only the airbench timing
  python bench/dynamic.py --parts timing --seeds 2 --recipe-items  # + fp16 / alternating flip / bias freeze
  python bench/dynamic.py --device cpu --model head --parts curated --curate-detector \
      calibrated_confidence --proxy-dynamics bench/dynamics         # curated, analysis of the H100 run

Writes bench/results/dynamic_<device>.json (atomic, updated after every part) and prints tables.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (RECIPES, argument_parser, dynamics_file, read_dynamics, require_dynamics,  # noqa: E402
                    saved_dynamics, stratified_subset)
from dataopt.perceive.dynamics import OOFDynamics  # noqa: E402
from dataopt.perceive.signals import SignalInputs  # noqa: E402
import dataopt.plugins  # noqa: E402,F401  (fills the registries)
from dataopt.registry import DYNAMIC_SELECTORS, SELECTORS  # noqa: E402
from dataopt.train import loop  # noqa: E402
from dataopt.train.nets import AirbenchNet, Head  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/dynamic_<device>.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="airbench", choices=["airbench", "head"])
    ap.add_argument("--parts", nargs="+", default=["timing", "dynamic", "curated", "adaaugment"])
    ap.add_argument("--labels", nargs="+", default=["clean", "random_label1"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=["random", "infobatch", "density_consistency"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--proxy-epochs", type=int, default=12, help="epochs of each out-of-fold proxy fold")
    ap.add_argument("--proxy-folds", type=int, default=4, help="folds of the out-of-fold proxy run")
    ap.add_argument("--dc-sharpness", nargs="+", type=float, default=[1.0],
                    help="density_consistency sharpness values to run (1 = the paper's proportional draw)")
    ap.add_argument("--dc-normalise", nargs="+", default=["rank"], choices=DC_NORMALISE,
                    help="density_consistency normalise values to run (rank: ranks; value: p ∝ the values)")
    ap.add_argument("--dc-delta", nargs="+", type=float, default=[0.0],
                    help="density_consistency delta values to run: the share of the last epochs on all data "
                         "(0 = the paper's form; 0.125 = InfoBatch's annealing)")
    ap.add_argument("--dc-variants", nargs="+", type=dc_variant, default=None, metavar="NORMALISE:SHARPNESS:DELTA",
                    help="density_consistency variants to run instead of every combination of the three "
                         "lists above, e.g. rank:1:0 value:1:0.125")
    ap.add_argument("--early-epochs", type=int, default=3, help="epochs averaged into the early loss")
    ap.add_argument("--curate-detector", default="gmm", choices=["gmm", "calibrated_confidence"],
                    help="curated part: the analysis (gmm = the analyze stage's default, gated)")
    ap.add_argument("--ada-epochs", type=int, default=20, help="epochs of the adaaugment comparison")
    ap.add_argument("--proxy-dynamics", type=Path, default=None,
                    help="curated part: take the out-of-fold probabilities and losses from this folder's "
                         "bench/noise.py --save-dynamics file (random_label1, seed 0; e.g. bench/dynamics, "
                         "the H100 airbench run) instead of this run's proxy")
    # optimiser defaults per --model (RECIPES); any of these given on the command line wins
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="airbench: 1.5, in mean-loss units; head: 0.05")
    ap.add_argument("--momentum", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--label-smoothing", type=float, default=None)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--translate", type=int, default=2, help="largest random shift in px (airbench: 2)")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="airbench: train without the lookahead weight EMA")
    ap.add_argument("--n", type=int, default=0, help="first N training rows (0 = all 50,000)")
    ap.add_argument("--n-test", type=int, default=0, help="a class-stratified N of the test rows (0 = all 10,000)")
    # the airbench94 recipe items (dataopt.train.loop.FitConfig); the defaults are the project's recipe
    ap.add_argument("--precision", default="auto", choices=loop.PRECISIONS,
                    help="autocast of every training run (auto: bf16 on a GPU, float32 on the CPU)")
    ap.add_argument("--flip", default="random", choices=loop.FLIPS, help="airbench: flip scheme of flip_crop")
    ap.add_argument("--whiten-bias-epochs", type=int, default=None,
                    help="airbench: train the whitening bias only in the first N epochs (airbench94: 3)")
    ap.add_argument("--recipe-items", action="store_true",
                    help="timing part: also each airbench94 recipe item added alone, then all three")
    ap.add_argument("--pca-dim", type=int, default=256, help="head model: pixel-PCA dimension")
    args = ap.parse_args(argv)
    if args.proxy_dynamics is not None and "curated" not in args.parts:
        ap.error("--proxy-dynamics feeds the curated part only: add 'curated' to --parts")
    if args.model != "airbench" and (args.flip != "random" or args.whiten_bias_epochs is not None
                                     or args.recipe_items):
        ap.error("--flip, --whiten-bias-epochs and --recipe-items are airbench recipe items: use --model airbench")
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def decode(path: Path, n: int = 0, stratified: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(N, 32, 32, 3)`` uint8 images and the int64 label columns of a CIFAR-10N parquet: the first
    ``n`` rows (0: all), or a class-stratified ``n`` of them (the test file is sorted by class)."""
    table = pq.read_table(path)
    if n and stratified:
        table = table.take(stratified_subset(table.column("label").to_numpy(), n, seed=0))
    elif n:
        table = table.slice(0, n)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                       for b in table.column("image").to_pylist()])
    labels = {c: table.column(c).to_numpy().astype(np.int64)
              for c in ("label", "aggre_label", "random_label1") if c in table.column_names}
    return images, labels


HEAD_HIDDEN = 512  # the head model's hidden units (the evaluated models and the proxy)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = loop.resolve_device(args.device)
        xtr, ltr = decode(args.data / "train.parquet", args.n)
        xte, lte = decode(args.data / "test.parquet", args.n_test, stratified=True)
        self.labels = {"clean": ltr["label"], **{k: v for k, v in ltr.items() if k != "label"}}
        self.y_test = torch.from_numpy(lte["label"]).to(self.device)
        val = np.zeros(len(lte["label"]), bool)
        val[stratified_subset(lte["label"], len(val) // 2, seed=0)] = True
        self.test_halves = {"val": torch.from_numpy(val).to(self.device),
                            "heldout": torch.from_numpy(~val).to(self.device)}
        if args.model == "airbench":
            self.images = xtr  # what OOFDynamics takes
            self.x = loop.images_to_tensor(xtr, self.device)
            self.x_test = loop.images_to_tensor(xte, self.device)
        else:  # standardised pixels -> PCA (fitted on the training images), float embeddings
            flat = torch.from_numpy(xtr.reshape(len(xtr), -1)).double()
            mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
            z = (flat - mean) / std
            with loop.seeded(0):  # pca_lowrank draws a random projection: fixed, so reruns agree
                _, _, v = torch.pca_lowrank(z, q=args.pca_dim, center=False, niter=3)
            proj = lambda a: ((torch.from_numpy(a.reshape(len(a), -1)).double() - mean) / std) @ v
            # each component z-scored too: the leading ones have std ~30, which put SGD at lr 0.05 on
            # the edge of stability (InfoBatch's x2 weights then diverged to a loss of 1e29)
            ztr, zte = proj(xtr), proj(xte)
            mu, sd = ztr.mean(0), ztr.std(0).clamp_min(1e-6)
            self.x = ((ztr - mu) / sd).float().to(self.device)
            self.x_test = ((zte - mu) / sd).float().to(self.device)

    def cfg(self, seed: int, epochs: int, recipe: dict | None = None) -> loop.FitConfig:
        """The run's FitConfig; ``recipe`` overrides its precision / flip / whiten_bias_epochs."""
        a = self.args
        items = {"precision": a.precision, "flip": a.flip, "whiten_bias_epochs": a.whiten_bias_epochs,
                 **(recipe or {})}
        return loop.FitConfig(epochs=epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
                              weight_decay=a.weight_decay, label_smoothing=a.label_smoothing,
                              augment="flip_crop" if a.model == "airbench" else "none", seed=seed,
                              translate=a.translate, lookahead=a.model == "airbench" and a.lookahead,
                              progress=False, **items)

    def model(self, seed: int) -> torch.nn.Module:
        with loop.seeded(seed):
            if self.args.model == "airbench":
                m = AirbenchNet(10, width=self.args.width, flip_tta=True)
            else:
                m = Head(self.x.shape[1], 10, hidden=HEAD_HIDDEN)
        return m.to(self.device)

    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        """Accuracy on all test images, and on the ``val`` and ``heldout`` halves."""
        hit = (loop.predict_logits(model, self.x_test).argmax(1) == self.y_test).double()
        return {"accuracy": float(hit.mean()),
                **{f"accuracy_{k}": float(hit[m].mean()) for k, m in self.test_halves.items()}}

    def train(self, y: np.ndarray, seed: int, epochs: int, **fit_kwargs: Any) -> dict[str, Any]:
        """One training run on all rows (``rows``/``weights`` in fit_kwargs restrict or weigh them)."""
        rows = fit_kwargs.pop("rows", None)
        recipe = fit_kwargs.pop("recipe", None)
        x = self.x if rows is None else self.x[torch.as_tensor(rows, device=self.device)]
        yy = torch.from_numpy(y if rows is None else y[rows]).to(self.device)
        model = self.model(seed)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hist = loop.fit(model, x, yy, self.cfg(seed, epochs, recipe), **fit_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return {**self.accuracy(model), "train_seconds": round(seconds, 3),
                "samples_seen": int(hist[-1]["samples_seen"]), "steps": int(hist[-1]["steps"]),
                "epochs": len(hist), "history_tail": hist[-1]}

    def proxy(self, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
        """The perceive stage's out-of-fold run (:class:`OOFDynamics`) with this bench's network and
        recipe: per-epoch OOF loss, final OOF probs, the first fold model's features of every row."""
        a, c = self.args, self.cfg(seed, self.args.proxy_epochs)  # the recipe of the evaluated models
        oof = OOFDynamics(
            model=a.model, hidden=HEAD_HIDDEN, width=a.width, folds=a.proxy_folds, epochs=c.epochs,
            batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
            augment=c.augment, label_smoothing=c.label_smoothing, translate=c.translate,
            lookahead=c.lookahead, device=self.device.type, random_state=seed, keep_features=True,
        ).fit(self.images if a.model == "airbench" else self.x.cpu().numpy(), y, 10)
        d = oof.dynamics_
        return {"loss": d.loss, "probs": d.probs, "features": oof.features_, "fold": d.fold}


def saved_proxy(directory: Path, label_column: str, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """:meth:`Bench.proxy`'s outputs (no features) for the first ``len(y)`` training rows, read from a
    ``bench/noise.py --save-dynamics`` file (all 50,000 rows, train.parquet order), and its meta."""
    path = dynamics_file(directory, label_column, 0)
    meta, z = read_dynamics(path)
    n = len(y)
    if int(meta["n"]) < n or not np.array_equal(z["label"][:n], y):
        raise SystemExit(f"--proxy-dynamics: {path} does not hold these {n} rows' {label_column} labels")
    loss = saved_dynamics(meta, z).loss[:, :n]
    proxy = {"loss": np.ascontiguousarray(loss), "probs": z["probs"][:n].astype(np.float32),
             "features": None, "fold": z["fold"][:n].astype(np.int64)}
    about = {"file": str(path), "network": meta.get("network"), "device": meta.get("gpu") or meta.get("device"),
             "perceive": meta.get("perceive"), "dynamics_epochs": meta["dynamics_epochs"]}
    return proxy, about


DC_NORMALISE = ("rank", "value")  # what the dynamic density_consistency accepts as normalise

# --recipe-items: airbench94's recipe items (Jordan 2024; legacy/airbench94.py of KellerJordan/cifar10-airbench)
# that the project's airbench recipe leaves off by default, each alone and all together
RECIPE_ITEMS = {"fp16": {"precision": "fp16"}, "alternating_flip": {"flip": "alternating"},
                "whiten_bias_3_epochs": {"whiten_bias_epochs": 3}}
RECIPE_ITEMS["all_three"] = {k: v for item in list(RECIPE_ITEMS.values()) for k, v in item.items()}


def dc_variant(text: str) -> tuple[str, float, float]:
    """``NORMALISE:SHARPNESS:DELTA`` (e.g. ``value:1:0.125``) -> ("value", 1.0, 0.125)."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or parts[0] not in DC_NORMALISE:
            raise ValueError
        return parts[0], float(parts[1]), float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NORMALISE:SHARPNESS:DELTA with NORMALISE rank or "
                                         "value, e.g. value:1:0.125") from None


def density_consistency_signals(proxy: dict[str, np.ndarray], y: np.ndarray, k: int = 10):
    """The two signals density_consistency reads, by the library's ``SIGNALS``: ``knn_density`` over the
    kNN graph of the L2-normalised proxy features (faiss), and ``semantic_consistency`` in its no-text
    form, the out-of-fold probability of the label (the signal reads it from the perceive dynamics as
    ``p_label`` of the last epoch; the proxy's final probabilities are the same numbers)."""
    import pandas as pd
    from dataopt.embed.knn import knn_graph
    from dataopt.registry import SIGNALS

    z = proxy["features"].astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    _, dist, info = knn_graph(z, k, metric="l2", exact_max=len(z), use_gpu=False)
    density = SIGNALS.build("knn_density").fit(SignalInputs(labels=y, knn_distances=dist)).values_
    last = SimpleNamespace(p_label=proxy["probs"][np.arange(len(y)), y][None])  # the dynamics it reads
    consistency = SIGNALS.build("semantic_consistency").fit(SignalInputs(labels=y, dynamics=last)).values_
    return pd.DataFrame({"knn_density": density, "semantic_consistency": consistency}), info


def p_clean_gated(proxy: dict[str, np.ndarray], y: np.ndarray, early: int, detector: str) -> tuple[np.ndarray, dict]:
    """The analysis of the library on the proxy run: the ``DETECTORS`` method ``detector`` (``gmm``: a
    two-component GMM on the normalised mean early out-of-fold loss, the analyze stage's default;
    ``calibrated_confidence``: on the out-of-fold probabilities), then the analyze stage's agreement
    gate (:func:`dataopt.analyze.detect_label_issues`; out-of-fold argmax == label -> clean)."""
    import pandas as pd
    from dataopt.analyze.run import detect_label_issues
    from dataopt.analyze.base import LazyInputs, fit_method
    from dataopt.config import AnalyzeParams
    from dataopt.registry import DETECTORS

    inputs = LazyInputs({"loss": lambda: proxy["loss"][:early].mean(0), "probs": lambda: proxy["probs"],
                         "labels": lambda: y}, "bench")
    # seeded as the analyze stage seeds it (unseeded, sklearn's GMM drew its k-means start from numpy's
    # global generator, so the gmm runs were not repeatable)
    det = fit_method(DETECTORS.build(detector, random_state=0), inputs)
    found = detect_label_issues(det, AnalyzeParams(detector=detector, gate="agreement"),
                                pd.DataFrame({"pred_label": proxy["probs"].argmax(1)}), y)
    p = found["p_clean"]
    return p, {"detector_noise_rate": float(det.noise_rate_), "flagged": int((p < 0.5).sum())}


def summarise(runs: list[dict]) -> dict[str, float]:
    acc = np.array([r["accuracy"] for r in runs]) * 100
    sec = np.array([r["train_seconds"] for r in runs])
    halves = {f"accuracy_{h}_mean": round(float(np.mean([r[f"accuracy_{h}"] for r in runs]) * 100), 3)
              for h in ("val", "heldout")}
    return {"accuracy_mean": round(float(acc.mean()), 3), "accuracy_std": round(float(acc.std()), 3), **halves,
            "train_seconds_mean": round(float(sec.mean()), 3),
            "samples_seen": int(np.mean([r["samples_seen"] for r in runs])),
            "steps": int(np.mean([r["steps"] for r in runs])), "n_runs": len(runs)}


def chosen_on_val(entry: dict[str, Any], budgets: list[float]) -> dict[str, Any] | None:
    """The density_consistency variant with the best mean ``val``-half accuracy over all budgets (one
    setting, as a user would fix it), and its ``heldout``-half accuracy beside the other methods'."""
    dc = {}
    for key in entry:
        if key.startswith("density_consistency"):
            variant, _, budget = key.rpartition("@")
            dc.setdefault(variant, {})[float(budget)] = entry[key]
    dc = {v: cells for v, cells in dc.items() if set(budgets) <= set(cells)}
    if len(dc) < 2:
        return None  # nothing to choose between
    best = max(dc, key=lambda v: np.mean([dc[v][b]["accuracy_val_mean"] for b in budgets]))
    out: dict[str, Any] = {"variant": best, "candidates": sorted(dc),
                           "full_heldout": entry["full"]["accuracy_heldout_mean"]}
    for b in budgets:
        out[str(b)] = {"density_consistency": dc[best][b]["accuracy_heldout_mean"],
                       **{m: entry[f"{m}@{b}"]["accuracy_heldout_mean"]
                          for m in ("infobatch", "random") if f"{m}@{b}" in entry}}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dataopt.io import write_json

    if args.proxy_dynamics is not None:  # before hours of training, not after
        require_dynamics(dynamics_file(args.proxy_dynamics, "random_label1", 0))
    t_start = time.perf_counter()
    bench = Bench(args)
    dev = bench.device.type
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = args.out or ROOT / "bench" / "results" / f"dynamic_{dev}.json"
    seeds = list(range(args.seeds))
    res: dict[str, Any] = {"machine": f"{name}, torch {torch.__version__}", "device": dev,
                           "model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
                           "n_train": int(len(bench.x)), "decode_seconds": round(time.perf_counter() - t_start, 1)}
    print(f"# bench/dynamic.py on {name} ({args.model}), n_train={len(bench.x)}", flush=True)
    save = lambda: write_json(out, res)

    if "timing" in args.parts:
        runs = [bench.train(bench.labels["clean"], s, args.epochs) for s in seeds]
        res["timing"] = {"epochs": args.epochs, **summarise(runs), "runs": runs}
        print(f"timing: {res['timing']['accuracy_mean']:.2f}% +- {res['timing']['accuracy_std']:.2f} in "
              f"{res['timing']['train_seconds_mean']:.2f} s ({args.epochs} epochs)", flush=True)
        save()
        for item, recipe in (RECIPE_ITEMS.items() if args.recipe_items else ()):
            runs = [bench.train(bench.labels["clean"], s, args.epochs, recipe=recipe) for s in seeds]
            res.setdefault("timing_recipe_items", {})[item] = {"recipe": recipe, **summarise(runs), "runs": runs}
            got = res["timing_recipe_items"][item]
            print(f"timing + {item}: {got['accuracy_mean']:.2f}% +- {got['accuracy_std']:.2f} in "
                  f"{got['train_seconds_mean']:.2f} s", flush=True)
            save()

    proxies: dict[str, dict] = {}
    if "dynamic" in args.parts:
        res["dynamic"] = {}
        for lab in args.labels:
            y = bench.labels[lab]
            t0 = time.perf_counter()
            proxies[lab] = bench.proxy(y)
            signals, knn_info = density_consistency_signals(proxies[lab], y)
            entry: dict[str, Any] = {"signals_seconds": round(time.perf_counter() - t0, 2),
                                     "proxy_oof_accuracy": float((proxies[lab]["probs"].argmax(1) == y).mean())}
            full = [bench.train(y, s, args.epochs) for s in seeds]
            entry["full"] = summarise(full)
            print(f"[{lab}] full: {entry['full']['accuracy_mean']:.2f}", flush=True)
            variants = [(m, {}) for m in args.methods if m != "density_consistency"]
            if "density_consistency" in args.methods:
                combos = args.dc_variants or [(nm, sh, d) for nm in args.dc_normalise for d in args.dc_delta
                                              for sh in args.dc_sharpness]
                variants += [("density_consistency", {**({} if sh == 1.0 else {"sharpness": sh}),
                                                      **({"delta": d} if d else {}),
                                                      **({} if nm == "rank" else {"normalise": nm})})
                             for nm, sh, d in combos]
            for budget in args.budgets:
                for method, kwargs in variants:
                    runs = []
                    for s in seeds:
                        sel = DYNAMIC_SELECTORS.build(method, kwargs, budget=budget, random_state=s)
                        sel.fit(len(y), args.epochs, signals if "signals" in sel.requires else None)
                        runs.append(bench.train(y, s, args.epochs, selector=sel))
                    key = method + "".join(f"[{k}={v}]" for k, v in kwargs.items()) + f"@{budget}"
                    entry[key] = summarise(runs)
                    print(f"[{lab}] {key}: {entry[key]['accuracy_mean']:.2f} (+-{entry[key]['accuracy_std']:.2f}), "
                          f"cost {entry[key]['samples_seen'] / entry['full']['samples_seen']:.3f}", flush=True)
            choice = chosen_on_val(entry, args.budgets)
            if choice is not None:
                entry["chosen_on_val"] = choice
                print(f"[{lab}] chosen on the val half: {choice['variant']}; heldout half: "
                      + ", ".join(f"{b}: {choice[str(b)]}" for b in args.budgets)
                      + f", full {choice['full_heldout']}", flush=True)
            res["dynamic"][lab] = entry
            save()

    if "curated" in args.parts and "random_label1" in bench.labels:
        y = bench.labels["random_label1"]
        if args.proxy_dynamics is not None:
            proxy, about = saved_proxy(args.proxy_dynamics, "random_label1", y)
            res["curated_proxy"] = about
            print(f"curated: analysis on {about['file']} ({about['network']} on {about['device']})", flush=True)
        else:
            proxy = proxies.get("random_label1") or bench.proxy(y)
            res["curated_proxy"] = "this run's out-of-fold proxy"
        p_clean, info = p_clean_gated(proxy, y, args.early_epochs, args.curate_detector)
        info["detector"] = args.curate_detector
        info["proxy_oof_accuracy"] = float((proxy["probs"].argmax(1) == y).mean())
        truth_noisy = y != bench.labels["clean"]
        # the plan: the noise_filter selector (p_clean >= 0.5); its complement is what relabel changes
        keep_mask = SELECTORS.build("noise_filter", {"threshold": 0.5}).fit(labels=y, p_clean=p_clean).keep_
        keep, flagged = np.flatnonzero(keep_mask), ~keep_mask
        relabelled = y.copy()
        relabelled[flagged] = proxy["probs"].argmax(1)[flagged]  # the suggested label (relabel perturber)
        plain = [bench.train(y, s, args.epochs) for s in seeds]
        variants = {
            "filter+p_clean_weights": lambda s: bench.train(
                y, s, args.epochs, rows=keep, weights=torch.from_numpy(p_clean[keep]).float()),
            "filter": lambda s: bench.train(y, s, args.epochs, rows=keep),
            "relabel": lambda s: bench.train(relabelled, s, args.epochs),
        }
        res["curated"] = {"plain": summarise(plain)}
        for name, run in variants.items():
            res["curated"][name] = summarise([run(s) for s in seeds])
            print(f"curated {name}: {res['curated'][name]['accuracy_mean']:.2f} vs plain "
                  f"{res['curated']['plain']['accuracy_mean']:.2f}", flush=True)
        res["curated"].update({
            **info, "kept": int(len(keep)), "relabel_correct": float((relabelled == bench.labels["clean"])[flagged].mean()),
            "flag_precision": float(truth_noisy[flagged].mean()) if flagged.any() else None,
            "flag_recall": float(flagged[truth_noisy].mean()), "true_noise_rate": float(truth_noisy.mean()),
        })
        save()

    if "adaaugment" in args.parts and args.model == "airbench":
        from dataopt.train.adaaugment import AdaAugment
        from dataopt.optimize.augment.batch import BatchAugmenter

        y = bench.labels["clean"]
        yt = torch.from_numpy(y).to(bench.device)
        n = len(y)
        res["adaaugment"] = {"epochs": args.ada_epochs}
        for policy in ("none", "randaugment", "trivialaugment", "adaaugment"):
            runs = []
            for s in seeds[:2]:
                kw: dict[str, Any] = {}
                if policy in ("randaugment", "trivialaugment"):
                    mags = torch.full((n,), 0.5 if policy == "randaugment" else 1.0, dtype=torch.float64)
                    kw["augment_fn"] = BatchAugmenter({"image": {"policy": policy}}, mags, base="flip_crop",
                                                      n_classes=10, translate=args.translate)
                elif policy == "adaaugment":
                    model_probe = bench.model(s)
                    ada = AdaAugment(n=n, n_classes=10, feature_dim=model_probe.feature_dim,
                                     epochs=args.ada_epochs, base="flip_crop", seed=s,
                                     translate=args.translate)
                    # bind to the very model that trains: build it here and pass it through
                    kw["_ada"] = ada
                runs.append(_train_ada(bench, y, yt, s, args.ada_epochs, kw))
            res["adaaugment"][policy] = summarise(runs)
            print(f"adaaugment part: {policy}: {res['adaaugment'][policy]['accuracy_mean']:.2f} in "
                  f"{res['adaaugment'][policy]['train_seconds_mean']:.1f} s", flush=True)
            save()

    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"wrote {out} ({res['total_seconds']} s)")
    return 0


def _train_ada(bench: Bench, y: np.ndarray, yt: torch.Tensor, seed: int, epochs: int, kw: dict) -> dict:
    ada = kw.pop("_ada", None)
    model = bench.model(seed)
    if ada is not None:
        ada.bind(model, yt)
        kw["augment_fn"] = ada
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hist = loop.fit(model, bench.x, yt, bench.cfg(seed, epochs), **kw)
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
    return {**bench.accuracy(model), "train_seconds": round(time.perf_counter() - t0, 3),
            "samples_seen": int(hist[-1]["samples_seen"]), "steps": int(hist[-1]["steps"])}


if __name__ == "__main__":
    sys.exit(main())
