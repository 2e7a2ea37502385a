"""The continuous loop on a CIFAR-10 stream (issue 19): a reference set, then a stream of batches
(clean, corrupted, class-prior shifted, worse human labels), run through the drift-triggered retrain
loop against two baselines in the same run: *always retrain on everything* and *never retrain*.

A simulation of ``flows/check_drift.py`` + ``flows/retrain.py`` with their library calls, not the flows
themselves: training an image CNN per retrain through Prefect, DVC and MLflow on 2 CPU cores would take
hours per stream. Per batch the loop policy does what the flows decide with:

- drift check: :func:`dataopt.drift.check.check_drift` (reference vs the whole batch, ``DriftParams``
  defaults) -> :func:`dataopt.loop.retrain_reason` with ``ScheduleParams`` defaults (``triggers:
  [drift]``); a batch that fires nothing waits, untrained, for the next retrain (as in the flows);
- retrain: the reference plus every batch not rejected for good before, curated as the default config does:
  4-fold out-of-fold probabilities -> the analyze detector (``calibrated_confidence``, the agreement
  gate, :func:`dataopt.analyze.run.detect_label_issues`) -> ``p_clean`` -> the ``p_clean`` weighter
  (the default ``moderate`` prune at ratio 1.0 keeps every row); the model is a head on fixed
  embeddings (scikit-learn ``LogisticRegression``, the stand-in for ``train.mode: head``);
- promotion: :func:`dataopt.evaluate.compare.decide_promotion` (``PromotionParams`` defaults) on the
  frozen evaluation set; a rejected challenger's new batches are rejected for good only when
  :func:`dataopt.evaluate.compare.harm` says it did harm, else deferred: they wait, pooled with newer
  batches, for the next retrain (as in the flow).

Baselines: ``always`` retrains the same curated model on everything at every batch and deploys it;
``always_raw`` does the same without curation (plain training); ``never`` keeps the first champion.
(The earlier ``loop_retry`` variant, which retried every rejected batch, is gone: the flow now retries
all but a harmful challenger's, so it differed from ``loop`` only there.)

Data: bench/drift.py's cached proxy-embedder embeddings (``--cache``; built here with the same split
when absent): the embedder is a SmallCNN fitted once before the stream on train rows the reference never
holds; reference = 5,000 other train rows (clean labels); the stream = 5,000 further train rows; the
frozen evaluation set = 2,500 test rows. Batches of 500 rows, 20 % held out per batch (the batch's
distribution, scored with clean labels). Worse labels are CIFAR-10N's human ``random_label1`` (~17 %
wrong), once alone and once with 20 more points of symmetric flips (the parquet has no ``worst_label``).

Examples
--------
  python bench/stream.py --quick          # one seed, fewer permutations: every code path, ~1 min
  python bench/stream.py --seeds 0 1 2 3 4    # the docs run

Writes bench/results/stream_cifar10.json (``--quick``: stream_cifar10_quick.json) and
docs/img/stream.png, and prints a markdown table.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import PRIOR_CLASSES, STREAM, argument_parser, decode_images, split_cifar_rows, stratified_subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_CLASSES = 10
FOLDS = 4  # out-of-fold probabilities of the curation (the perceive stage's folds)
POLICIES = ("loop", "always", "always_raw", "never")


def parse_args(argv=None):
    ap = argument_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="one seed, 100 permutations, small cache if none")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="batch rows, shifts, models")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--holdout", type=float, default=0.2, help="share of each batch never trained on")
    ap.add_argument("--permutations", type=int, default=None, help="MMD null draws (default: DriftParams)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/dataopt_drift_cache"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "stream.png")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    # bench/drift.py's cache sizes (its --quick ones with --quick, when no full cache exists)
    args.sizes = dict(embedder=5000, reference=5000, pool_train=5000, pool_test=2500, corrupt=2500, epochs=5)
    if args.quick:
        args.seeds, args.permutations = args.seeds[:1], args.permutations or 100
        if not (args.cache / f"drift_{cache_key(args.sizes)}.npz").exists():
            args.sizes = dict(embedder=2000, reference=2000, pool_train=1000, pool_test=1000, corrupt=500, epochs=1)
    return args


# ---------------------------------------------------------------------------------------------- data
# the split and the embeddings are bench/drift.py's (same seed 0, same key), so either script's cache serves

def cache_key(s: dict) -> str:
    return (f"v2_s0_e{s['embedder']}_r{s['reference']}_p{s['pool_train']}+{s['pool_test']}"
            f"_c{s['corrupt']}_ep{s['epochs']}")


def load_data(args) -> dict[str, np.ndarray]:
    """The cached embeddings (bench/drift.py's file, else ours, else built now) plus the pool's
    CIFAR-10N ``random_label1``."""
    import pyarrow.parquet as pq

    s, key = args.sizes, cache_key(args.sizes)
    train_cols = pq.read_table(args.data / "train.parquet", columns=["label", "random_label1"])
    ytr = train_cols.column("label").to_numpy().astype(int)
    yte = pq.read_table(args.data / "test.parquet", columns=["label"]).column("label").to_numpy().astype(int)
    rows = split_cifar_rows({k: s[k] for k in ("embedder", "reference", "pool_train")}, s["pool_test"], 0,
                            ytr, yte)  # bench/drift.py's split, seed 0
    found = [p for p in (args.cache / f"drift_{key}.npz", args.cache / f"stream_{key}.npz") if p.exists()]
    d = dict(np.load(found[0])) if found else build_cache(args, rows, args.cache / f"stream_{key}.npz")
    if not np.array_equal(d["pool_labels"], ytr[rows["pool_train"]]):
        raise SystemExit(f"{found[0]}: its pool is not bench/drift.py's seed-0 split; delete it and rerun")
    d["pool_human"] = train_cols.column("random_label1").to_numpy().astype(int)[rows["pool_train"]]
    d["cache_file"] = str(found[0]) if found else str(args.cache / f"stream_{key}.npz")
    return d


def build_cache(args, rows: dict, path: Path) -> dict[str, np.ndarray]:
    """The embeddings this bench reads, as bench/drift.py builds them (only the corruptions used here)."""
    import pyarrow.parquet as pq
    import dataopt.plugins  # noqa: F401
    from dataopt.drift.shifts import corrupt
    from dataopt.registry import EMBEDDERS

    s = args.sizes
    train = pq.read_table(args.data / "train.parquet", columns=["image", "label"])
    test = pq.read_table(args.data / "test.parquet", columns=["image", "label"])
    ytr, yte = train.column("label").to_numpy().astype(int), test.column("label").to_numpy().astype(int)
    img = {k: decode_images((test if k == "pool_test" else train).take(v)) for k, v in rows.items()}
    t0 = time.perf_counter()
    emb = EMBEDDERS.get("proxy")(epochs=s["epochs"], folds=0, device="cpu", random_state=0)
    emb.fit(img["embedder"], ytr[rows["embedder"]], n_classes=N_CLASSES)
    d = {"ref_images": img["reference"], "ref_labels": ytr[rows["reference"]], "ref_emb": emb.transform(img["reference"]),
         "pool_images": img["pool_train"], "pool_labels": ytr[rows["pool_train"]],
         "pool_emb": emb.transform(img["pool_train"]), "test_labels": yte[rows["pool_test"]],
         "test_emb": emb.transform(img["pool_test"]),
         "corrupt_rows": stratified_subset(ytr[rows["pool_train"]], s["corrupt"], 0)}
    rng = np.random.default_rng(0)
    for name in sorted({arg for _, kind, arg in STREAM if kind == "corrupt"}):
        kind, sev = name.rsplit("_s", 1)
        d[f"{name}_images"] = corrupt(d["pool_images"][d["corrupt_rows"]], kind, int(sev), rng)
        d[f"{name}_emb"] = emb.transform(d[f"{name}_images"])
    d["total_prep_seconds"] = np.array(time.perf_counter() - t0)
    from dataopt.io import save_npz

    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, **d)
    return d


def make_stream(d: dict, batch_size: int, holdout: float, seed: int) -> list[dict[str, Any]]:
    """The batches of :data:`STREAM` for one seed: embeddings, images, given and clean labels, and
    which rows are trained on (the rest is the batch's held-out distribution sample)."""
    from dataopt.drift import shifts

    rng = np.random.default_rng(1000 + seed)
    n_pool = len(d["pool_labels"])
    cpos = rng.permutation(len(d["corrupt_rows"]))  # positions in the corrupted arrays
    rest = rng.permutation(np.setdiff1d(np.arange(n_pool), d["corrupt_rows"]))
    size = min(batch_size, len(rest) // 5, len(cpos) // 5)
    # the prior-shift batch is drawn first, from the whole rest pool, then the others take what is left
    prior = rest[shifts.class_prior_shift(d["pool_labels"][rest], PRIOR_CLASSES, 1 / 3, size, rng)]
    rest = np.setdiff1d(rest, prior)
    rest = rng.permutation(rest)
    out, r_at, c_at = [], 0, 0
    for name, kind, arg in STREAM:
        if kind == "corrupt" or (kind == "clean" and arg == "corrupt_pool"):
            pos, c_at = cpos[c_at:c_at + size], c_at + size
            rows = d["corrupt_rows"][pos]
            src = arg if kind == "corrupt" else None
            emb = d[f"{src}_emb"][pos] if src else d["pool_emb"][rows]
            images = d[f"{src}_images"][pos] if src else d["pool_images"][rows]
        else:
            if kind == "prior":
                rows = prior
            else:
                rows, r_at = rest[r_at:r_at + size], r_at + size
            emb, images = d["pool_emb"][rows], d["pool_images"][rows]
        clean = d["pool_labels"][rows]
        given = clean.copy()
        if kind == "labels":
            given = d["pool_human"][rows].copy()
            if arg:
                given = shifts.raise_label_noise(given, arg, N_CLASSES, rng)[0]
        train = np.zeros(len(rows), bool)
        train[rng.permutation(len(rows))[: int(round(len(rows) * (1 - holdout)))]] = True
        out.append({"name": name, "kind": kind, "embeddings": emb, "images": images, "labels": given,
                    "clean": clean, "train": train, "noise": float(np.mean(given != clean))})
    return out


# ------------------------------------------------------------------------------------------- models

class Compute:
    """Training compute: samples seen (rows x full passes; an L-BFGS iteration is one full-data
    gradient) and seconds, for the final models and for the curation's out-of-fold models."""

    def __init__(self):
        self.samples = {"final": 0, "oof": 0}
        self.seconds = {"final": 0.0, "oof": 0.0}

    def fit(self, part: str, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, seed: int):
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # standardised: the embeddings are unit-norm (per-dimension std ~0.05), on which C=1 underfits
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300, random_state=seed))
        model.fit(x, y, logisticregression__sample_weight=w)
        self.seconds[part] += time.perf_counter() - t0
        self.samples[part] += len(y) * (1 + int(np.max(model[-1].n_iter_)))  # + the scaler's pass
        return model

    def total(self) -> dict[str, float]:
        return {"samples": sum(self.samples.values()), "seconds": sum(self.seconds.values()),
                "samples_final": self.samples["final"], "samples_oof": self.samples["oof"],
                "seconds_final": self.seconds["final"], "seconds_oof": self.seconds["oof"]}


def curated_weights(x: np.ndarray, y: np.ndarray, compute: Compute, seed: int) -> tuple[np.ndarray, dict]:
    """The default curation: out-of-fold probabilities -> the analyze detector with the agreement gate
    -> ``p_clean`` -> the ``p_clean`` weighter."""
    import pandas as pd
    from sklearn.model_selection import StratifiedKFold
    import dataopt.plugins  # noqa: F401
    from dataopt.analyze.run import detect_label_issues
    from dataopt.config import AnalyzeParams
    from dataopt.registry import DETECTORS, WEIGHTERS

    probs = np.zeros((len(y), N_CLASSES))
    for fit_rows, held in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, y):
        m = compute.fit("oof", x[fit_rows], y[fit_rows], None, seed)
        probs[np.ix_(held, m.classes_)] = m.predict_proba(x[held])
    cfg = AnalyzeParams()
    detector = DETECTORS.build(cfg.detector, cfg.kwargs, random_state=seed)
    detector.fit(probs=probs, labels=y)
    found = detect_label_issues(detector, cfg, pd.DataFrame({"pred_label": probs.argmax(1)}), y)
    weights = WEIGHTERS.build("p_clean", {}).fit(found["p_clean"]).weight_
    return weights, {"flagged": found["is_issue"], "estimated_noise": found["estimated"]}


def train_on(parts: list[dict], curate: bool, compute: Compute, seed: int):
    """A model on the training rows of ``parts`` (the reference and batches); with ``curate``, the
    default curation's weights. Returns ``(model, info)``; info has the flagged share per part."""
    x = np.concatenate([p["embeddings"][p["train"]] for p in parts])
    y = np.concatenate([p["labels"][p["train"]] for p in parts])
    info: dict[str, Any] = {"rows": int(len(y))}
    w = None
    if curate:
        w, cur = curated_weights(x, y, compute, seed)
        bounds = np.cumsum([0] + [int(p["train"].sum()) for p in parts])
        flagged = cur["flagged"]
        wrong = np.concatenate([p["labels"][p["train"]] != p["clean"][p["train"]] for p in parts])
        info.update(estimated_noise=round(cur["estimated_noise"], 4),
                    flagged={p["name"]: round(float(flagged[a:b].mean()), 4) for p, a, b in zip(parts, bounds, bounds[1:])},
                    flag_recall=round(float(flagged[wrong].mean()), 4) if wrong.any() else None,
                    flag_precision=round(float(wrong[flagged].mean()), 4) if flagged.any() else None)
    return compute.fit("final", x, y, w, seed), info


# -------------------------------------------------------------------------------------------- stream

def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


class LoopPolicy:
    """The drift-triggered loop's bookkeeping (flows/check_drift.py + flows/retrain.py): batches
    trained on, batches waiting for a retrain (new, or deferred by a rejection that did no harm), and
    batches rejected for good (by a harmful challenger)."""

    def __init__(self, first):
        self.champion = first
        self.accepted, self.waiting, self.rejected = [], [], []
        self.compute = Compute()

    def step(self, ref: dict, batch: dict, drift: bool, xf: np.ndarray, yf: np.ndarray, seed: int) -> dict:
        from dataopt.config import PromotionParams, ScheduleParams
        from dataopt.evaluate.compare import decide_promotion, harm
        from dataopt.loop import retrain_reason

        promo, sched = PromotionParams(), ScheduleParams()
        self.waiting.append(batch)
        new_rows = int(sum(w["train"].sum() for w in self.waiting))
        # hours since the last training: no clock in a simulated stream (the age trigger is off by default)
        reason = retrain_reason(sched.triggers, drift, new_rows, 0.0, sched.min_new_rows, sched.max_age_hours)
        out: dict[str, Any] = {"trigger": reason}
        if not reason:
            return out
        challenger, info = train_on([ref, *self.accepted, *self.waiting], True, self.compute, seed)
        dec = decide_promotion(self.champion.predict(xf), challenger.predict(xf), yf, N_CLASSES,
                               **promo.rule(), random_state=seed)
        out.update(promoted=bool(dec.promote), reason=dec.reason, curation=info,
                   batches=[w["name"] for w in self.waiting])
        if dec.promote:
            self.champion, self.accepted, self.waiting = challenger, self.accepted + self.waiting, []
            return out
        out["harm"] = harm(dec)
        if out["harm"]:  # as flows/retrain.py: harmful new data is never tried again; the rest is deferred
            self.rejected, self.waiting = self.rejected + self.waiting, []
        return out


def outcome(s: dict) -> str:
    """A loop step's retrain: none, promoted, deferred (rejected, no harm) or rejected (harmful)."""
    if not s["trigger"]:
        return "-"
    return "promoted" if s["promoted"] else "rejected" if s.get("harm") else "deferred"


def run_seed(d: dict, args, seed: int) -> dict[str, Any]:
    from dataopt.config import DriftParams
    from dataopt.drift.check import check_drift

    drift_p = DriftParams()
    permutations = args.permutations or drift_p.permutations
    ref = {"name": "reference", "embeddings": d["ref_emb"], "images": d["ref_images"], "labels": d["ref_labels"],
           "clean": d["ref_labels"], "train": np.ones(len(d["ref_labels"]), bool)}
    xf, yf = d["test_emb"], d["test_labels"]
    stream = make_stream(d, args.batch_size, args.holdout, seed)
    compute = {p: Compute() for p in ("always", "always_raw", "never")}
    first, first_info = train_on([ref], True, Compute(), seed)  # every policy's first champion, not counted
    loops = {"loop": LoopPolicy(first)}
    champion = {p: first for p in POLICIES}
    steps: list[dict[str, Any]] = [{"step": 0, "batch": "reference", "frozen": {p: accuracy(first, xf, yf) for p in POLICIES}}]
    seen = []  # every batch so far (the baselines train on all)
    for i, b in enumerate(stream, 1):
        seen.append(b)
        step: dict[str, Any] = {"step": i, "batch": b["name"], "kind": b["kind"], "rows": int(len(b["labels"])),
                                "label_noise": round(b["noise"], 4)}
        # the drift check of the whole landed batch against the reference
        t0 = time.perf_counter()
        side = lambda p: {k: p[k] for k in ("embeddings", "labels", "images")}  # noqa: E731
        chk = check_drift(side(ref), side(b), n_classes=N_CLASSES, tests=drift_p.tests, alpha=drift_p.alpha,
                          permutations=permutations, max_reference=drift_p.max_reference,
                          min_batch=drift_p.min_batch, effect_floor=drift_p.effect_floor, random_state=seed)
        step["drift"] = {"verdict": bool(chk.verdict.drift), "seconds": round(time.perf_counter() - t0, 2),
                         "flagged_by": sorted(n for n, r in chk.results.items() if r.decision)}
        for name, lp in loops.items():
            step[name] = lp.step(ref, b, chk.verdict.drift, xf, yf, seed)
            champion[name] = lp.champion
        # the baselines: retrain on everything, deploy
        champion["always"], info = train_on([ref, *seen], True, compute["always"], seed)
        step["always"] = {"curation": info}
        champion["always_raw"], _ = train_on([ref, *seen], False, compute["always_raw"], seed)
        held = ~b["train"]
        step["frozen"] = {p: accuracy(champion[p], xf, yf) for p in POLICIES}
        step["batch_dist"] = {p: accuracy(champion[p], b["embeddings"][held], b["clean"][held]) for p in POLICIES}
        steps.append(step)
        print(f"  seed {seed} step {i:2d} {b['name']:12s} drift={step['drift']['verdict']!s:5s} "
              f"({step['drift']['seconds']:.0f}s) loop={outcome(step['loop']):8s} "
              + " ".join(f"{p}={step['frozen'][p]:.4f}" for p in POLICIES), flush=True)
    compute.update({name: lp.compute for name, lp in loops.items()})
    return {"seed": seed, "first_champion": first_info, "steps": steps,
            "compute": {p: compute[p].total() for p in POLICIES},
            "retrains": {p: (sum(1 for s in steps[1:] if s[p]["trigger"]) if p in loops else
                             len(stream) if p.startswith("always") else 0) for p in POLICIES},
            "promotions": {p: sum(1 for s in steps[1:] if s[p].get("promoted")) for p in loops},
            "rejections": {p: sum(1 for s in steps[1:] if s[p]["trigger"] and not s[p]["promoted"]) for p in loops},
            "harmful": {p: sum(1 for s in steps[1:] if s[p].get("harm")) for p in loops},
            "rejected_batches": [w["name"] for w in loops["loop"].rejected],
            "untrained_at_end": {p: [w["name"] for w in lp.waiting] for p, lp in loops.items()}}


# ------------------------------------------------------------------------------------------- targets

def bootstrap_noise(model_correct: np.ndarray, seed: int, n_boot: int = 2000) -> float:
    """Half-width of the 95 % bootstrap interval of an accuracy on the frozen set."""
    rng = np.random.default_rng(seed)
    accs = model_correct[rng.integers(0, len(model_correct), (n_boot, len(model_correct)))].mean(1)
    lo, hi = np.quantile(accs, [0.025, 0.975])
    return float((hi - lo) / 2)


def targets(runs: list[dict], noise: float, policy: str) -> dict[str, Any]:
    """The issue's targets for one loop policy, per seed and worst over seeds."""
    gaps, ratios, drops, worse = [], [], [], []
    for r in runs:
        last = r["steps"][-1]["frozen"]
        gaps.append(last["always"] - last[policy])
        ratios.append(r["compute"][policy]["samples"] / r["compute"]["always"]["samples"])
        acc = [s["frozen"][policy] for s in r["steps"]]
        drops.append(max(0.0, max(a - b for a, b in zip(acc, acc[1:]))))
        for i, s in enumerate(r["steps"][1:], 1):
            if s["kind"] != "labels":
                continue
            # the retrain that promoted it, else the last one that tried it
            tried = [t for t in r["steps"][i:] if s["batch"] in t[policy].get("batches", [])]
            later = next((t for t in tried if t[policy]["promoted"]), tried[-1] if tried else None)
            j = later["step"] if later else None
            change = None if j is None else r["steps"][j]["frozen"][policy] - r["steps"][j - 1]["frozen"][policy]
            if later is None:
                fate = "untrained at the end"
            elif later[policy]["promoted"]:
                fate = f"step {j}: promoted, curated ({later[policy]['curation']['flagged'][s['batch']]:.0%} of its rows flagged)"
            else:
                fate = f"step {j}: {outcome(later[policy])}: {later[policy].get('harm') or later[policy]['reason']}"
            worse.append({"seed": r["seed"], "batch": s["batch"], "label_noise": s["label_noise"],
                          "change": change, "fate": fate})
    return {"accuracy_gap_vs_always": {"per_seed": gaps, "max": max(gaps), "met": max(gaps) <= 0.005},
            "compute_ratio_vs_always": {"per_seed": ratios, "max": max(ratios), "met": max(ratios) <= 0.5},
            "largest_step_drop": {"per_seed": drops, "max": max(drops), "noise": noise, "met": max(drops) <= noise},
            "worse_labels": {"batches": worse, "met": all((w["change"] or 0.0) >= 0.0 for w in worse)}}


LOOPS = ("loop",)


def table(runs: list[dict]) -> str:
    """Per step: the policies' frozen-set and batch-distribution accuracy (mean over seeds), the drift
    verdicts, the loop's retrains (promoted / deferred / rejected, counts over seeds); then the totals."""
    n = len(runs)
    mean = lambda f: np.mean([f(r) for r in runs])  # noqa: E731
    rows = ["| step | batch | drift flagged | loop: promoted / deferred / rejected | "
            + " | ".join(f"frozen: {p}" for p in POLICIES) + " | batch dist.: loop | always | never |",
            "|" + " --- |" * (4 + len(POLICIES) + 3)]
    for i, s0 in enumerate(runs[0]["steps"]):
        st = [r["steps"][i] for r in runs]
        fr = {p: np.mean([s["frozen"][p] for s in st]) for p in POLICIES}
        if i == 0:
            rows.append("| 0 | reference | | | " + " | ".join(f"{fr[p]:.2%}" for p in POLICIES) + " | | | |")
            continue
        bd = {p: np.mean([s["batch_dist"][p] for s in st]) for p in POLICIES}
        counts = " / ".join(str(sum(outcome(s["loop"]) == o for s in st)) for o in ("promoted", "deferred", "rejected"))
        rows.append(f"| {i} | {s0['batch']} | {sum(s['drift']['verdict'] for s in st)}/{n} | {counts} | "
                    + " | ".join(f"{fr[p]:.2%}" for p in POLICIES) + " | "
                    + " | ".join(f"{bd[p]:.1%}" for p in ("loop", "always", "never")) + " |")
    tot = ["| policy | retrains | promotions / deferrals / harmful rejections | samples seen: total (final + out-of-fold) | seconds | "
           "final frozen accuracy |", "| --- | --- | --- | --- | --- | --- |"]
    for p in POLICIES:
        c = {k: mean(lambda r: r["compute"][p][k]) for k in ("samples", "samples_final", "samples_oof", "seconds")}
        pr = (f"{mean(lambda r: r['promotions'][p]):.1f} / {mean(lambda r: r['rejections'][p] - r['harmful'][p]):.1f} / "
              f"{mean(lambda r: r['harmful'][p]):.1f}" if p in LOOPS else "-")
        tot.append(f"| {p} | {mean(lambda r: r['retrains'][p]):.1f} | {pr} | {c['samples'] / 1e6:.2f} M "
                   f"({c['samples_final'] / 1e6:.2f} + {c['samples_oof'] / 1e6:.2f}) | {c['seconds']:.1f} | "
                   f"{mean(lambda r: r['steps'][-1]['frozen'][p]):.2%} |")
    return "\n".join(rows) + "\n\n" + "\n".join(tot)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(runs), 3)
    rows = -(-len(runs) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False, sharey=True)
    for ax in grid.flat[len(runs):]:
        ax.set_visible(False)
    axes = [list(grid.flat[:len(runs)])]
    style = {"loop": ("C0", "-"), "always": ("C1", "--"), "always_raw": ("C2", ":"), "never": ("C7", "-.")}
    marks = {"promoted": ("o", "C0"), "deferred": ("x", "C3"), "rejected": ("s", "k")}
    for ax, r in zip(axes[0], runs):
        x = [s["step"] for s in r["steps"]]
        for p in POLICIES:
            wide = p == "loop"  # drawn wide, under never, which it may equal
            ax.plot(x, [100 * s["frozen"][p] for s in r["steps"]], color=style[p][0], ls=style[p][1], label=p,
                    lw=4 if wide else 1.5, alpha=0.5 if wide else 1.0, zorder=1 if wide else 2)
        for s in r["steps"][1:]:
            what = outcome(s["loop"])
            if what in marks:
                m, c = marks[what]
                ax.plot(s["step"], 100 * s["frozen"]["loop"], m, color=c, ms=8, mfc="none", label=f"loop retrain: {what}")
        ax.set_xticks(x, [s["batch"] for s in r["steps"]], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"seed {r['seed']}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("champion accuracy on the frozen set (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        seen.update(zip(lab, h))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 / rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    d = load_data(args)
    print(f"data: {d['cache_file']} ({time.perf_counter() - t0:.0f}s)", flush=True)
    runs = [run_seed(d, args, s) for s in args.seeds]
    # the frozen set's noise: the 95 % bootstrap half-width of the first champion's accuracy (seed 0)
    first = runs[0]["steps"][0]["frozen"]["loop"]
    correct = np.zeros(len(d["test_labels"]))
    correct[: int(round(first * len(correct)))] = 1.0
    res = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "stream": [{"name": n, "kind": k, "arg": a} for n, k, a in STREAM], "frozen_rows": int(len(d["test_labels"])),
           "reference_rows": int(len(d["ref_labels"])), "cache": d["cache_file"],
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "load_at_end": os.getloadavg()},
           "seconds": time.perf_counter() - t0, "runs": runs}
    noise = bootstrap_noise(correct, 0)
    res["targets"] = {p: targets(runs, noise, p) for p in LOOPS}
    out = args.out / ("stream_cifar10_quick.json" if args.quick else "stream_cifar10.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from dataopt.io import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    plot(runs, args.plot)
    print(table(runs))
    print(json.dumps(res["targets"], indent=1))
    print(f"wrote {out} and {args.plot} in {res['seconds']:.0f}s")


if __name__ == "__main__":
    main()
