"""The continuous loop on a CIFAR-10 stream through the real flows (issue 19): every batch is dropped
into a project's landing folder and the ``watch`` flow takes it (``batch add`` -> ``check_drift`` ->
``retrain`` when a trigger fires -> the promotion rule -> the MLflow registry), with Prefect, DVC and
MLflow as ``dataopt serve`` runs them. Baselines in the same run: *always retrain on everything* (a second
project: ``dataopt batch add`` then ``dataopt run`` with every batch, its model deployed whatever it
scores) and *never retrain* (the first champion).

bench/stream.py runs ten seeds' worth of the same decisions in a simulation on cached embeddings; this
script is the check that the flows themselves make them. The stream is bench/stream.py's (clean,
corrupted, class-prior shifted, CIFAR-10N human labels, human labels plus 20 points of flips), smaller:
a reference of ``--reference`` train rows with clean labels, a frozen evaluation set of ``--eval`` test
rows (the reference's held-out split), batches of ``--batch-size`` rows (``ingest.batch_holdout`` of each
held out). The model is the CPU profile's: whitened patch features and a linear head (``train.mode:
head``), written into the projects' params.yaml so both policies train the same thing.

Per step: the champion's accuracy on the frozen set and on the batch's held-out rows (clean labels), the
drift verdict, the retrain outcome; in total: retrains, promotions and rejections, training samples seen
summed over retrains, and wall seconds of the flows / runs.

Examples
--------
  python bench/stream_flows.py --quick       # 4 batches: every path, ~15 min on 2 cores
  python bench/stream_flows.py               # 10 batches of 200 rows on 1,500 reference rows, ~40 min

Writes bench/results/stream_flows_cifar10.json (``--quick``: ..._quick.json) and prints a markdown table.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import PRIOR_CLASSES, STREAM, argument_parser, stratified_subset  # noqa: E402

# the cpu_large profile's values (dataopt/profiles.py), written into params.yaml: the stream's data is
# below the profile's size threshold, but the bench measures the model a CPU user of CIFAR-10 trains
from dataopt.profiles import CPU_LARGE  # noqa: E402

BIN = Path(sys.executable).parent


def parse_args(argv=None):
    ap = argument_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="4 batches, 1,000 frozen rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", type=int, default=1500)
    ap.add_argument("--eval", type=int, default=2000, help="frozen evaluation rows (CIFAR-10 test)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="keep the projects here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    # bench/stream.py's names, as batch names (letters, digits, '-', '_')
    args.stream = [(n.replace("+", "_"), k, a) for n, k, a in STREAM]
    if args.quick:
        args.eval = 1000
        args.stream = [s for s in args.stream if s[0] in ("clean_1", "noise_s3", "human_labels", "prior")]
    return args


# ---------------------------------------------------------------------------------------------- data

def _png(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_data(args, data_dir: Path) -> dict[str, Any]:
    """reference.parquet, eval.parquet and one parquet per batch (``id``, ``image``, ``label``); returns
    each batch's clean labels by id and its kind/noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from common import decode_images
    from dataopt.drift import shifts

    train = pq.read_table(args.data / "train.parquet", columns=["id", "image", "label", "random_label1"])
    test = pq.read_table(args.data / "test.parquet", columns=["id", "image", "label"])
    y, human = train.column("label").to_numpy().astype(int), train.column("random_label1").to_numpy().astype(int)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(y))
    ref = order[:2 * args.reference][stratified_subset(y[order[:2 * args.reference]], args.reference, args.seed)]
    pool = rng.permutation(np.setdiff1d(order, ref))
    data_dir.mkdir(parents=True, exist_ok=True)

    def table(rows, labels, images=None):
        t = train.take(rows)
        img = pa.array(_png(images), pa.binary()) if images is not None else t.column("image")
        return pa.table({"id": t.column("id"), "image": img, "label": pa.array(labels, pa.int64())})

    pq.write_table(table(ref, y[ref]), data_dir / "reference.parquet")
    ev = stratified_subset(test.column("label").to_numpy().astype(int), args.eval, args.seed)
    pq.write_table(test.take(ev).select(["id", "image", "label"]), data_dir / "eval.parquet")
    size, at, out = args.batch_size, 0, {}
    prior_pool, pool = pool[:10 * size], pool[10 * size:]
    for name, kind, arg in args.stream:
        if kind == "prior":
            rows = prior_pool[shifts.class_prior_shift(y[prior_pool], PRIOR_CLASSES, 1 / 3, size, rng)]
        else:
            rows, at = pool[at:at + size], at + size
        labels, images = y[rows].copy(), None
        if kind == "labels":
            labels = human[rows].copy()
            if arg:
                labels = shifts.raise_label_noise(labels, arg, 10, rng)[0]
        if kind == "corrupt":
            corruption, sev = arg.rsplit("_s", 1)
            images = shifts.corrupt(decode_images(train.take(rows)), corruption, int(sev), rng)
        pq.write_table(table(rows, labels, images), data_dir / f"{name}.parquet")
        out[name] = {"kind": kind, "clean": dict(zip(map(str, train.column("id").take(rows).to_pylist()), y[rows].tolist())),
                     "label_noise": round(float(np.mean(labels != y[rows])), 4)}
    return out


# ------------------------------------------------------------------------------------------- projects

def project_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(ROOT),
                "PREFECT_HOME": str(project / ".prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench",
                "GIT_COMMITTER_EMAIL": "b@b"})
    return env


def sh(project: Path, *cmd: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=project_env(project))
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {project} (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def make_project(dst: Path, data_dir: Path, seed: int) -> Path:
    """A project like a fresh clone (git + dvc), params.yaml pointed at the stream's reference."""
    from dataopt.config import set_value_text

    dst.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore", "data.dvc"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("dataopt", "tasks"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    text = (dst / "params.yaml").read_text()
    sets = {"ingest.source": "parquet", "ingest.path": str(data_dir / "reference.parquet"),
            "ingest.eval_path": str(data_dir / "eval.parquet"), "ingest.id_column": "id", **CPU_LARGE}
    for key, value in sets.items():
        text = set_value_text(text, *key.split("."), value)
    (dst / "params.yaml").write_text(re.sub(r"(?m)^seed: .*$", f"seed: {seed}", text))
    env = project_env(dst)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=dst, check=True, env=env)
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    return dst


def samples_seen(project: Path, run_id: str) -> int:
    """Training compute of one pipeline run: the train stage's samples seen (rows x epochs), from the
    stage report the run logged to MLflow (a rejected retrain's artifacts are rolled back)."""
    import mlflow.artifacts
    from dataopt.io import read_json

    f = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports/train/stage.json",
                                            tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return int(read_json(Path(f))["metrics"]["samples_seen"])


class Scorer:
    """The deployed model of a project on the frozen set and on a batch's held-out rows (clean labels)."""

    def __init__(self, clean: dict[str, dict]):
        self.clean = clean
        self.cache: dict[str, Any] = {}

    def _model(self, uri: str):
        if uri not in self.cache:
            import mlflow.pyfunc

            self.cache[uri] = mlflow.pyfunc.load_model(uri)
        return self.cache[uri]

    def score(self, project: Path, model_uri: str, batch: str | None) -> dict[str, float]:
        import pandas as pd
        from dataopt import loop
        from dataopt.paths import Paths
        from dataopt.schema import HOLDOUT
        from flows.retrain import frozen_eval_set

        model, paths = self._model(model_uri), Paths.at(project)
        images, labels, _ = frozen_eval_set(paths)
        out = {"frozen": float(np.mean(loop.predict_classes(model, images) == labels))}
        if batch:
            s = pd.read_parquet(paths.artifacts / "ingest" / "samples.parquet", columns=["source_id", "split", "batch"])
            rows = np.flatnonzero((s["batch"] == batch).to_numpy() & (s["split"] == HOLDOUT).to_numpy())
            if len(rows):
                all_images = np.load(paths.artifacts / "ingest" / "images.npy", mmap_mode="r")
                truth = np.array([self.clean[batch]["clean"][i] for i in s["source_id"].to_numpy()[rows]])
                out["batch_dist"] = float(np.mean(loop.predict_classes(model, np.asarray(all_images[rows])) == truth))
        return out


def _run_id(project: Path) -> str:
    from dataopt.io import read_json

    return read_json(project / "artifacts" / "track" / "run.json")["run_id"]


def last_run_model(project: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return client.get_run(_run_id(project)).data.tags["dataopt.model_uri"]


def champion_model(project: Path, first: str) -> str:
    """The registry's champion; before the first retrain registers one, the first `dataopt run`'s model
    (the model the retrain flow makes champion then: flows/retrain.py ensure_champion)."""
    from tasks import registry

    v = registry.champion(f"sqlite:///{project / 'mlflow.db'}", "dataopt") if (project / "mlflow.db").exists() else None
    return first if v is None else f"models:/dataopt/{v}"


# --------------------------------------------------------------------------------------------- stream

def run(args) -> dict[str, Any]:
    from dataopt.config import set_value_text

    work = args.work or Path(tempfile.mkdtemp(prefix="stream_flows_"))
    data_dir = work / "data"
    t0 = time.perf_counter()
    info = write_data(args, data_dir)
    print(f"data written in {time.perf_counter() - t0:.0f}s: {work}", flush=True)
    loop_p = make_project(work / "loop", data_dir, args.seed)
    always_p = make_project(work / "always", data_dir, args.seed)
    scorer = Scorer(info)
    seconds = {"loop": 0.0, "always": 0.0}
    _, first_s = sh(loop_p, str(BIN / "dataopt"), "run")  # the reference, and the first champion
    first_uri = last_run_model(loop_p)
    _, s = sh(always_p, str(BIN / "dataopt"), "run")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{loop_p / 'mlflow.db'}"  # the models' store
    frozen = {"loop": scorer.score(loop_p, first_uri, None)["frozen"]}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{always_p / 'mlflow.db'}"
    frozen["always"] = scorer.score(always_p, last_run_model(always_p), None)["frozen"]
    steps = [{"step": 0, "batch": "reference", "first_run_seconds": round(first_s, 1), "frozen": frozen}]
    steps[0]["frozen"]["never"] = steps[0]["frozen"]["loop"]
    rows = {"loop": [], "always": []}  # samples seen by each retrain's train stage
    incoming = loop_p / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    added = []
    for i, (name, kind, _) in enumerate(args.stream, 1):
        # the loop: the batch lands, the watch flow takes it (what `dataopt serve` runs every interval)
        shutil.copy(data_dir / f"{name}.parquet", incoming / f"{name}.parquet")
        (incoming / f"{name}.parquet.ready").touch()
        out, s = sh(loop_p, sys.executable, "-c", "import json; from flows.watch import watch; "
                    "print('RESULT', json.dumps(watch(project='.')))")
        seconds["loop"] += s
        watched = json.loads(out.split("RESULT", 1)[1])
        if not watched["checks"]:
            sys.exit(f"the watch flow took no check of batch {name}: {watched}")
        check = watched["checks"][0]
        re = check["retrain"]
        if re:
            rows["loop"].append(samples_seen(loop_p, re["run_id"]))
        # always: add the batch, train on everything, deploy
        sh(always_p, str(BIN / "dataopt"), "batch", "add", str(data_dir / f"{name}.parquet"), "--name", name)
        added.append(name)
        text = set_value_text((always_p / "params.yaml").read_text(), "ingest", "batches", added)
        (always_p / "params.yaml").write_text(text)
        _, s = sh(always_p, str(BIN / "dataopt"), "run")
        seconds["always"] += s
        rows["always"].append(samples_seen(always_p, _run_id(always_p)))
        step = {"step": i, "batch": name, "kind": kind, "label_noise": info[name]["label_noise"],
                "drift": check["drift"], "why": check["why"],
                "loop": {"trigger": bool(re), **({"promoted": re["promoted"], "reason": re["reason"],
                                                  "curation": re["curation"], "new_batches": re["new_batches"],
                                                  "numbers": {k: v for k, v in re["numbers"].items()
                                                              if k != "per_class"}} if re else {})}}
        # every model scored on the always project's ingest: it holds each batch's held-out rows (the
        # same rows in both projects: the per-batch split is seeded), which a loop that did not retrain lacks
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{loop_p / 'mlflow.db'}"
        scores = {"loop": scorer.score(always_p, champion_model(loop_p, first_uri), name),
                  "never": scorer.score(always_p, first_uri, name)}
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{always_p / 'mlflow.db'}"
        scores["always"] = scorer.score(always_p, last_run_model(always_p), name)
        step["frozen"] = {p: v["frozen"] for p, v in scores.items()}
        step["batch_dist"] = {p: v.get("batch_dist") for p, v in scores.items()}
        steps.append(step)
        outcome = "-" if not re else "promoted" if re["promoted"] else "rejected"
        print(f"  step {i:2d} {name:12s} drift={check['drift']!s:5s} loop={outcome:8s} "
              + " ".join(f"{p}={a:.4f}" for p, a in step["frozen"].items()), flush=True)
    from dataopt import loop
    from dataopt.paths import Paths

    events = [d["event"] for d in loop.decisions(Paths.at(loop_p))]
    return {"steps": steps, "seconds": seconds, "work": str(work),
            "retrains": {"loop": sum(1 for s in steps[1:] if s["loop"]["trigger"]), "always": len(args.stream),
                         "never": 0},
            "promotions": events.count("promoted") - 1, "rejections": events.count("rejected"),
            "batches_rejected": events.count("batch_rejected"), "batches_deferred": events.count("batch_deferred"),
            "samples_seen": rows}


def table(res: dict) -> str:
    pols = ("loop", "always", "never")
    out = ["| step | batch | label noise | drift | loop retrain | " + " | ".join(f"frozen: {p}" for p in pols)
           + " | batch dist.: " + " | ".join(pols) + " |", "|" + " --- |" * (5 + 2 * len(pols))]
    for s in res["steps"]:
        lp = s.get("loop", {})
        what = "" if not s["step"] else "-" if not lp.get("trigger") else "promoted" if lp["promoted"] else "rejected"
        bd = s.get("batch_dist", {})
        out.append(f"| {s['step']} | {s['batch']} | {s.get('label_noise', '')} | {s.get('drift', '')} | {what} | "
                   + " | ".join(f"{s['frozen'][p]:.2%}" for p in pols) + " | "
                   + " | ".join(f"{bd[p]:.1%}" if bd.get(p) is not None else "" for p in pols) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    last = res["steps"][-1]["frozen"]
    rows = res["samples_seen"]
    res.update(setup={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               total_seconds=time.perf_counter() - t0,
               machine={"platform": platform.platform(), "cpus": os.cpu_count(), "load_at_end": os.getloadavg()},
               targets={"accuracy_gap_vs_always": last["always"] - last["loop"],
                        "samples_ratio_vs_always": sum(rows["loop"]) / max(1, sum(rows["always"])),
                        "seconds_ratio_vs_always": res["seconds"]["loop"] / max(1e-9, res["seconds"]["always"])})
    out = args.out / ("stream_flows_cifar10_quick.json" if args.quick else "stream_flows_cifar10.json")
    from dataopt.io import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    print(json.dumps(res["targets"], indent=1))
    print(f"wrote {out} in {res['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
