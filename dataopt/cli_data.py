"""``dataopt batch add|list`` and ``dataopt drift``: new data as versioned batches, and the check of a
batch against the reference. Registered on the main parser by :func:`add_commands`."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

from dataopt import batches, loop
from dataopt.config import load_params
from dataopt.errors import UserError

BATCH_EPILOG = """\
A batch is a copy of new labelled data under data/batches/<name>/ (read-only once added), validated
like any ingest source (bad rows counted, a batch that is mostly bad refused), recorded in
data/manifest.json and versioned by data.dvc (`dvc add data`). Column options default to params.yaml's
ingest section.

examples:
  dataopt batch add new_photos/                        # an ImageFolder tree: new_photos/<class>/<image>
  dataopt batch add round2.parquet --name round2 --label-column label
  dataopt batch add labels.csv --path-column file      # a CSV of image paths (copied with it)
  dataopt batch add --demo corrupted                   # ready demo batches for the built-in digits:
  dataopt batch add --demo clean                       #   clean | corrupted | noisy-labels
  dataopt batch list
"""

DRIFT_EPILOG = """\
Checks a batch against the reference the current model was trained on: embeds only the batch with
the reference's fitted embedder, runs the tests of params.yaml's drift section (MMD, classifier
two-sample, black-box softmax KS and chi-square, label shift, per-class MMD, label-quality drift,
image statistics), decides one verdict (Holm across tests, effect floors, minimum batch size), writes
artifacts/drift/drift.json and plots, and logs one MLflow run tagged with the batch. The reference
stages run first when DVC says they are stale. Exit code 0 whatever the verdict.

examples:
  dataopt drift                       # the newest batch
  dataopt drift round2
  dataopt drift --set drift.alpha=0.01
"""


def add_commands(sub: Any, common: argparse.ArgumentParser, set_option: Callable, fmt: Any,
                 load: Callable, locked: Callable, note_stale: Callable) -> None:
    p = sub.add_parser("batch", formatter_class=fmt, epilog=BATCH_EPILOG, help="add or list batches of new data",
                       description="Add or list batches of new data (data/batches/, data.dvc).")
    bsub = p.add_subparsers(dest="batch_command", metavar="ACTION", required=True)
    a = bsub.add_parser("add", parents=[common], formatter_class=fmt, epilog=BATCH_EPILOG,
                        help="copy a source into data/batches/<name>/ and version it",
                        description="Add a batch: copy, validate, make read-only, record, dvc add data.")
    a.add_argument("src", nargs="?", metavar="SRC", help="ImageFolder directory, .parquet or .csv file")
    a.add_argument("--name", help="batch name (default: batch-NNN, or demo-<kind> for --demo)")
    a.add_argument("--demo", choices=("clean", "corrupted", "noisy-labels"),
                   help="add a ready demo batch of the built-in digits instead of SRC")
    for key in batches.COLUMN_KEYS:
        a.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="COLUMN",
                       help=f"the source's {key.replace('_column', '').replace('_', ' ')} column "
                            f"(default: params.yaml ingest.{key})")
    a.set_defaults(func=lambda args: cmd_batch_add(args, load, locked, note_stale))
    ls = bsub.add_parser("list", parents=[common], formatter_class=fmt, help="list the batches",
                         description="List the batches recorded in data/manifest.json.")
    ls.set_defaults(func=lambda args: cmd_batch_list(args, load))

    d = sub.add_parser("drift", parents=[common], formatter_class=fmt, epilog=DRIFT_EPILOG,
                       help="check a batch against the reference (drift tests, one verdict)",
                       description="Check a batch against the reference.")
    d.add_argument("batch", nargs="?", metavar="BATCH", help="batch name (default: the newest)")
    set_option(d)
    d.set_defaults(func=lambda args: cmd_drift(args, load, locked, note_stale))


def _demo_name(paths: Any, kind: str) -> str:
    used = {e["name"] for e in batches.read_manifest(paths)}
    name, i = f"demo-{kind}", 2
    while name in used:
        name, i = f"demo-{kind}-{i}", i + 1
    return name


def cmd_batch_add(args: argparse.Namespace, load: Callable, locked: Callable, note_stale: Callable) -> int:
    if bool(args.src) == bool(args.demo):
        raise UserError("batch add needs SRC or --demo KIND (one of them)")
    params, paths = load(args)
    from dataopt.ingest.add import add_batch  # why: the ingest pipeline (PIL, decoders), only here
    from tasks.versioning import track_data  # why: DVC, only for this command

    columns = {k: getattr(args, k) for k in batches.COLUMN_KEYS if getattr(args, k) is not None}
    with locked(args, params, paths) as lock, tempfile.TemporaryDirectory(prefix="dataopt-demo-") as tmp:
        note_stale(lock)
        if args.demo:
            from dataopt.demo import DEMO_COLUMNS, demo_batch  # why: torch (corruptions), only for demos

            src = demo_batch(args.demo, Path(tmp) / f"{args.demo}.parquet", seed=params.seed)
            columns = DEMO_COLUMNS
            entry = add_batch(paths, src, args.name or _demo_name(paths, args.demo), params.ingest,
                                      params.seed, columns, origin=f"demo:{args.demo}")
        else:
            entry = add_batch(paths, Path(args.src), args.name, params.ingest, params.seed, columns)
        note = track_data(paths.root)
    reasons = ", ".join(f"{k} ({v})" for k, v in entry["quarantine_reasons"].items())
    print(f"dataopt: added batch {entry['name']!r}: {entry['n_valid']} valid of {entry['rows']} rows"
          + (f", {entry['n_quarantined']} quarantined: {reasons}" if entry["n_quarantined"] else "")
          + f", {len(entry['classes'])} classes -> {paths.data / 'batches' / entry['name']}; {note}")
    print(f"dataopt: next: `dataopt drift {entry['name']}`")
    return 0


def cmd_batch_list(args: argparse.Namespace, load: Callable) -> int:
    _, paths = load(args)
    entries = batches.read_manifest(paths)
    if not entries:
        print(f"dataopt: no batch yet in {batches.manifest_path(paths)} (add one with `dataopt batch add`)")
        return 0
    checks = {d["batch"]: d for d in loop.decisions(paths, ["drift_checked"])}  # the last check wins
    print(f"{'name':<24} {'added (UTC)':<20} {'kind':<11} {'rows':>6} {'valid':>6} {'quar.':>6} {'drift':<9} source")
    for e in entries:
        c = checks.get(e["name"])
        drift = "-" if c is None else "no verdict" if c["drift"] is None else "DRIFT" if c["drift"] else "no drift"
        print(f"{e['name']:<24} {e['added_at'][:19]:<20} {e['kind']:<11} {e['rows']:>6} {e['n_valid']:>6} "
              f"{e['n_quarantined']:>6} {drift:<9} {e['source']}")
    return 0


def cmd_drift(args: argparse.Namespace, load: Callable, locked: Callable, note_stale: Callable) -> int:
    params, paths = load(args)
    entry = batches.get_batch(paths, args.batch)  # a clear error before anything runs
    newest = batches.read_manifest(paths)[-1]["name"]
    if entry["name"] != newest or params.drift.batch not in (None, entry["name"]):
        args.overrides = [*args.overrides, f"drift.batch={entry['name']}"]
        params, paths = load(args)
    from tasks.drift import check_batch  # why: DVC and MLflow, only for this command

    with locked(args, params, paths) as lock:
        note_stale(lock)
        out = check_batch(params, paths, load_params(paths.params) if paths.params.exists() else None)
    print(drift_text(out, paths))
    return 0


def drift_text(out: dict[str, Any], paths: Any) -> str:
    rep = out["report"]
    v = rep["verdict"]
    head = "DRIFT" if v["drift"] else "no drift" if v["drift"] is not None else "no verdict"
    lines = [f"dataopt drift: batch {rep['batch']['name']!r} ({v.get('n_batch', 0)} rows) vs "
             f"{rep.get('n_reference', 0)} reference rows: {head}", f"  {v['why']}"]
    for line in v.get("lines", {}).values():
        lines.append(f"  - {line}")
    if "drift" not in out["ran"]:
        lines.append("  (this batch was already checked with these params: the report is dvc.lock's)")
    lines.append(f"  report: {paths.artifacts / 'drift' / 'drift.json'}, plots: "
                 f"{paths.artifacts / 'drift' / 'plots'}/")
    if out["run_id"]:
        lines.append(f"  MLflow run: {out['run_id']} (tag dataopt.batch={rep['batch']['name']})")
    lines.append(f"  DVC: {out['dvc']}")
    return "\n".join(lines)
