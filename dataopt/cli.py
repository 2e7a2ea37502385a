"""The ``dataopt`` command: run the chain (Prefect), one stage (what ``dvc.yaml`` calls), tracking, UI.

Prefect, MLflow and DVC are imported lazily inside the commands that need them, so ``import
dataopt.cli`` (and ``dataopt stage``) stays as light as the library; so are the method families
(:mod:`dataopt.plugins`, torch): ``--help`` and a params.yaml schema error never wait for them.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from dataopt import interrupt, profiles, stages
from dataopt.config import load_params
from dataopt.errors import DataWarning, UserError
from dataopt.artifacts import dvc_yaml
from dataopt.batches import ensure_data
from dataopt.cli_data import add_commands as add_data_commands
from dataopt.cli_service import add_commands as add_service_commands
from dataopt.cli_service import use_servers
from dataopt.cli_models import add_commands as add_models_commands
from dataopt.io import atomic_path
from dataopt.lock import WorkspaceLock, describe
from dataopt.paths import Paths, check_sources

MAIN_EPILOG = """\
examples:
  dataopt run                                  # the whole chain (Prefect flow), cached per stage
  dataopt run --set optimize.ratio=0.5 --set train.epochs=5
  dataopt stage train                          # one stage (what dvc.yaml calls)
  dataopt track                                # log the current artifacts as one MLflow run
  dataopt ui --port 5000                       # MLflow UI on http://127.0.0.1:5000
  dataopt batch add --demo corrupted           # new data as a versioned batch (data/batches/, data.dvc)
  dataopt drift                                # check the newest batch against the reference
  dataopt models                               # registered model versions, champion, decisions
  dvc repro                                    # the same chain through DVC
  dvc exp run -S optimize.ratio=0.5            # a DVC experiment
"""

RUN_EPILOG = """\
Runs ingest -> embed -> perceive -> analyze -> optimize -> train -> evaluate as the Prefect flow
`curate`. DVC is the cache: a stage runs only when `dvc status` says it is stale (its code, input
files, params or outputs differ from dvc.lock), and each stage that ran is recorded in dvc.lock at
once, so `dvc repro` afterwards has nothing to do. With --set overrides the stages whose params they
change, and everything after them, rerun and are not recorded. Then one MLflow run is logged.

examples:
  dataopt run
  dataopt run --set train.epochs=3 --set ingest.noise.kind=symmetric --set ingest.noise.rate=0.2
  dataopt run --no-cache
  dataopt run --project path/to/project --params path/to/params.yaml
"""

STAGE_EPILOG = """\
stages: ingest embed perceive analyze optimize train evaluate, and drift (beside the chain)
Writes artifacts/<stage>/ (and its metrics.json); the stage's inputs must exist.

examples:
  dataopt stage ingest
  dataopt stage train --set train.epochs=3
"""

TRACK_EPILOG = """\
Logs params.yaml, every stage's metrics, plots, reports, the model and the dataset digest as one
MLflow run and writes artifacts/track/run.json. It is the last stage of dvc.yaml.

examples:
  dataopt track
  MLFLOW_TRACKING_URI=http://localhost:5000 dataopt track
"""

DVC_YAML_EPILOG = """\
dvc.yaml is generated: every artifact, each stage's reads and params are declared once in
dataopt/artifacts.py. Run this after changing a declaration.

examples:
  dataopt dvc-yaml
  dataopt dvc-yaml --check
"""

UI_EPILOG = """\
Serves the MLflow UI for this project's tracking store (tracking.tracking_uri, else
$MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db) on 127.0.0.1.

examples:
  dataopt ui
  dataopt ui --port 5001
"""


def _project_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", default=None, metavar="DIR",
                        help="project root, the folder holding params.yaml (default: current folder)")
    common.add_argument("--params", default=None, metavar="FILE",
                        help="params file (default: <project>/params.yaml)")
    return common


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one parameter for this run (repeatable; value parsed as YAML)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = _project_options()
    parser = argparse.ArgumentParser(
        prog="dataopt", formatter_class=fmt, epilog=MAIN_EPILOG,
        description="Perceive, analyse and optimise a training set; train and evaluate to prove it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", parents=[common], formatter_class=fmt, epilog=RUN_EPILOG,
                       help="run the whole chain as the Prefect flow 'curate'",
                       description="Run the whole chain as the Prefect flow 'curate'.")
    _set_option(p)
    p.add_argument("--no-cache", action="store_true", help="recompute every stage (refreshes the cache)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", parents=[common], formatter_class=fmt, epilog=STAGE_EPILOG,
                       help="run one stage (what dvc.yaml calls)", description="Run one stage.")
    p.add_argument("name", metavar="STAGE", help="ingest | embed | perceive | analyze | optimize | "
                   "train | evaluate | drift")
    _set_option(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("track", parents=[common], formatter_class=fmt, epilog=TRACK_EPILOG,
                       help="log the current artifacts as one MLflow run",
                       description="Log the current artifacts as one MLflow run.")
    _set_option(p)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("dvc-yaml", parents=[common], formatter_class=fmt, epilog=DVC_YAML_EPILOG,
                       help="write dvc.yaml from the artifact declarations (dataopt/artifacts.py)",
                       description="Write dvc.yaml from the artifact declarations.")
    p.add_argument("--check", action="store_true",
                   help="only check: exit 1 when dvc.yaml differs from the declarations")
    p.set_defaults(func=cmd_dvc_yaml)

    p = sub.add_parser("ui", parents=[common], formatter_class=fmt, epilog=UI_EPILOG,
                       help="serve the MLflow UI on 127.0.0.1", description="Serve the MLflow UI.")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.set_defaults(func=cmd_ui)
    add_data_commands(sub, common, _set_option, fmt, _load, _locked, _note_stale)
    add_service_commands(sub, common, fmt, _load)
    add_models_commands(sub, common, _set_option, fmt, _locate)
    return parser


def _locate(args: argparse.Namespace) -> tuple[Path, Path]:
    root = Path(args.project or ".").resolve()
    if not root.is_dir():
        raise UserError(f"project folder not found: {root}")
    params = Path(args.params).resolve() if args.params else root / "params.yaml"
    if not params.exists():
        raise UserError(f"params file not found: {params} (run in the project folder or pass "
                        "--project DIR / --params FILE)")
    return root, params


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    root, params_file = _locate(args)
    paths = Paths.at(root)
    use_servers(root)  # `dataopt server start` ran here: talk to its Prefect and MLflow servers
    return _checked_params(params_file, getattr(args, "overrides", None), paths), paths


def _checked_params(params_file: Path, overrides: Optional[list[str]], paths: Paths) -> Any:
    """The cheap checks first (schema, the raw source's paths: well under a second), then the method
    names against the loaded plug-ins (imports torch)."""
    params = load_params(params_file, overrides)
    if ensure_data(paths) and (paths.root / "data.dvc").exists():
        # a fresh clone: data.dvc records an empty data/, which DVC needs to exist and in its cache
        from tasks.versioning import track_data  # why: DVC, only the first time

        track_data(paths.root)
    check_sources(params, paths)
    from dataopt.plugins import check_methods  # why: imports torch and every method family (seconds)

    return check_methods(params)


def _locked(args: argparse.Namespace, params: Any, paths: Paths) -> WorkspaceLock:
    """The workspace lock for this command; says so when it takes over the lock of a dead process."""
    command = " ".join(["dataopt", *sys.argv[1:]]) if sys.argv[1:] else f"dataopt {args.command}"
    return WorkspaceLock(paths.root, command, timeout=params.orchestration.lock_timeout)


def _note_stale(lock: WorkspaceLock) -> None:
    if lock.stale_:
        print(f"dataopt: took over the workspace lock left by {describe(lock.stale_)}, which is no "
              "longer running", file=sys.stderr)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_stage(args: argparse.Namespace) -> int:
    if args.name not in stages.ALL:  # before anything is read or imported
        raise UserError(f"unknown stage {args.name!r}; valid: {', '.join(stages.ALL)}")
    params, paths = _load(args)
    t0 = time.perf_counter()
    with _locked(args, params, paths) as lock:
        _note_stale(lock)
        metrics = stages.run_stage(args.name, params, paths)
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float, str)))
    print(f"dataopt: {args.name} done in {time.perf_counter() - t0:.1f} s: {shown}"[:2000])
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from tasks.tracking import log_run  # why: MLflow, only for this command

    params, paths = _load(args)
    with _locked(args, params, paths) as lock:
        _note_stale(lock)
        info = log_run(params, paths, overrides=args.overrides)
    if info["run_id"]:
        print(f"dataopt: MLflow run {info['run_id']} in experiment {params.tracking.experiment!r} "
              f"({info['tracking_uri']})")
    return 0


def summary_text(summary: dict[str, Any], root: Path) -> str:
    """The short report printed at the end of ``dataopt run``."""
    lines = ["", "dataopt run summary", f"  {'stage':<10} {'status':<7} {'seconds':>8}"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<10} {s['status']:<7} {s['seconds']:>8.1f}")
    line = profiles.describe(stages.defaults_applied(Paths.at(root)))
    if line:
        lines.append(f"  defaults for this machine: {line}")
    ev = summary["stages"].get("evaluate", {}).get("metrics", {})
    for key, label in (("accuracy", "test accuracy"), ("cost_ratio", "cost ratio (vs full data)")):
        if isinstance(ev.get(key), (int, float)):
            lines.append(f"  {label}: {ev[key]:.4f}")
    tr = summary.get("tracking") or {}
    if tr.get("run_id"):
        lines.append(f"  MLflow run: {tr['run_id']} ({tr['tracking_uri']})")
    else:
        lines.append("  MLflow: tracking disabled")
    side = ", ".join(f"{n} {v}" for n, v in (summary.get("side") or {}).items())
    if side:
        lines.append(f"  beside the chain: {side}")
    lines.append(f"  DVC: {summary.get('dvc')}")
    lines.append(f"  look at: {root / 'artifacts'}/, `dataopt ui`, `dvc metrics show`")
    return "\n".join(lines)


class _NoUserErrorTraceback(logging.Filter):
    """Prefect logs a failed flow with its traceback; a UserError is reported as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoUserErrorTraceback) for f in logger.filters):
            logger.addFilter(_NoUserErrorTraceback())


def cmd_run(args: argparse.Namespace) -> int:
    root, params_file = _locate(args)
    paths = Paths.at(root)
    use_servers(root)
    params = _checked_params(params_file, args.overrides, paths)  # fail fast, before Prefect starts
    # offline machines: no telemetry attempts from the ephemeral API (a user setting still wins)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a busy 2-core machine can need more than Prefect's default 20 s to start the temporary API
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    _quiet_user_errors()
    from flows.curate import run  # why: Prefect, only for this command

    with _locked(args, params, paths) as lock:  # before Prefect starts: a busy workspace fails at once
        _note_stale(lock)
        summary = run(params_file, args.overrides, root, no_cache=args.no_cache)
    print(summary_text(summary, root))
    return 0


def ui_command(uri: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line that ``dataopt ui`` replaces itself with."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port)]


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    root = Path(args.project or ".").resolve()
    target, text = root / "dvc.yaml", dvc_yaml()
    current = target.read_text() if target.exists() else None
    if args.check:
        if current != text:
            print(f"dataopt: {target} differs from dataopt/artifacts.py: run `dataopt dvc-yaml`",
                  file=sys.stderr)
            return 1
        print(f"dataopt: {target} matches the declarations")
        return 0
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    print(f"dataopt: wrote {target}" + (" (unchanged)" if current == text else ""))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tasks.tracking import tracking_uri  # why: MLflow, only for this command

    params, paths = _load(args)
    uri = tracking_uri(params, paths)
    print(f"dataopt: MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C to stop)",
          flush=True)
    os.chdir(paths.root)
    # exec, not a child process: stopping `dataopt ui` stops the server (no orphan left behind)
    os.execv(sys.executable, ui_command(uri, args.port))
    return 0  # not reached


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 2 else "\n  ".join(lines)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that handles one handles the other."""

    exit_code = 143


def _on_signal(signum: int, frame: Any) -> None:
    interrupt.request_stop()  # worker threads (a stage under Prefect) stop at their next step
    raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _watch_signals() -> tuple[int, int]:
    """Request a stop on SIGINT / SIGTERM even while another handler owns the signal (Prefect's flow
    engine swaps in its own SIGTERM handler, then waits for the running task): Python writes every
    signal's number to the wakeup fd, whichever handler runs. Returns (previous wakeup fd, our fd):
    restore the one, close the other (the watcher then ends)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(read_fd, 64):
            if signal.SIGINT in data or signal.SIGTERM in data:
                interrupt.request_stop()
        os.close(read_fd)

    threading.Thread(target=watch, name="dataopt-signals", daemon=True).start()
    return previous, write_fd


@contextlib.contextmanager
def _signals_and_warnings():
    """SIGINT / SIGTERM -> the exceptions :func:`main` turns into exit codes 130 / 143; a DataWarning
    -> one line ``dataopt: warning: ...``. A signal someone set to be ignored stays ignored."""
    interrupt.clear()
    installed, wakeup = {}, None
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                installed[sig] = signal.signal(sig, _on_signal)
        wakeup = _watch_signals()
    show = warnings.showwarning

    def show_data_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"dataopt: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_data_warning
            yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        if wakeup is not None:
            signal.set_wakeup_fd(wakeup[0])
            os.close(wakeup[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dataopt`` command. Returns the exit code: 2 for a user error, 130 after
    Ctrl-C, 143 after SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _signals_and_warnings():
            return int(args.func(args) or 0)
    except UserError as err:
        print(f"dataopt: error: {_one_line(str(err))}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt as exc:
        interrupt.request_stop()
        code = getattr(exc, "exit_code", 130)
        print(f"dataopt: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
