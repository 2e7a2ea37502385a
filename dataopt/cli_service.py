"""``dataopt server start|stop|status`` and ``dataopt serve``: the continuous loop, unattended.

``server start`` starts a persistent Prefect server and an MLflow tracking server, both on 127.0.0.1,
as background processes (logs and pids in ``.dataopt/``); every later ``dataopt`` command of the
project then talks to them (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``; a value set by the user wins),
so that schedules and both UIs survive between commands and every MLflow writer goes through one server
(SQLite alone does not take concurrent writers). ``serve`` serves the loop's deployments."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from dataopt.errors import UserError
from dataopt.lock import process_alive

SERVERS = ".dataopt/servers.json"

SERVER_EPILOG = """\
examples:
  dataopt server start                 # Prefect UI http://127.0.0.1:4200, MLflow UI http://127.0.0.1:5000
  dataopt server status
  dataopt server stop
"""

SERVE_EPILOG = """\
Serves the deployments watch (every schedule.watch_interval s), check-drift and retrain (on demand;
retrain also on schedule.full_retrain_cron) until Ctrl-C. Drop a batch into schedule.incoming
(data/incoming/): <name>/ or <name>.parquet|.csv, then an empty <name>.ready file when the copy is
complete. Decisions: .dataopt/decisions.jsonl, the Prefect UI, the MLflow UI, `dataopt models`.

examples:
  dataopt server start && dataopt serve
  cp demo.parquet data/incoming/ && touch data/incoming/demo.parquet.ready
"""


def add_commands(sub: Any, common: argparse.ArgumentParser, fmt: Any, load: Callable) -> None:
    p = sub.add_parser("server", formatter_class=fmt, epilog=SERVER_EPILOG,
                       help="start/stop the local Prefect and MLflow servers (127.0.0.1)",
                       description="Persistent local Prefect and MLflow servers for this project.")
    ssub = p.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    start = ssub.add_parser("start", parents=[common], formatter_class=fmt, epilog=SERVER_EPILOG,
                            help="start both servers in the background")
    start.add_argument("--prefect-port", type=int, default=4200)
    start.add_argument("--mlflow-port", type=int, default=5000)
    start.set_defaults(func=lambda a: cmd_server_start(a, load))
    for name, fn, text in (("stop", cmd_server_stop, "stop both servers"),
                           ("status", cmd_server_status, "say whether they run, and where")):
        q = ssub.add_parser(name, parents=[common], formatter_class=fmt, help=text)
        q.set_defaults(func=lambda a, fn=fn: fn(a, load))
    s = sub.add_parser("serve", parents=[common], formatter_class=fmt, epilog=SERVE_EPILOG,
                       help="serve the continuous loop: watch, check-drift, retrain",
                       description="Serve the continuous loop's Prefect deployments.")
    s.set_defaults(func=lambda a: cmd_serve(a, load))


def read_servers(root: Path) -> dict[str, Any]:
    """The servers started for this project and still running (empty when none)."""
    f = root / SERVERS
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in info.items() if process_alive(v.get("pid", -1))}


def use_servers(root: Path) -> dict[str, Any]:
    """Point this process (and its children) at the project's running servers, unless the user set
    ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` already."""
    running = read_servers(root)
    if "prefect" in running:
        os.environ.setdefault("PREFECT_API_URL", running["prefect"]["url"] + "/api")
    if "mlflow" in running:
        os.environ.setdefault("MLFLOW_TRACKING_URI", running["mlflow"]["url"])
    return running


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _start(name: str, cmd: list[str], health: str, root: Path, env: dict[str, str]) -> int:
    log = root / ".dataopt" / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # outlives this command; `server stop` ends it
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the {name} server exited at start (code {proc.returncode}); see {log}")
        if _healthy(health):
            return proc.pid
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the {name} server did not answer {health} within 120 s; see {log}")


def cmd_server_start(args: argparse.Namespace, load: Callable) -> int:
    params, paths = load(args)
    root = paths.root
    (root / ".dataopt").mkdir(exist_ok=True)
    running = read_servers(root)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(root / ".prefect")}
    bin_dir = Path(sys.executable).parent
    if "prefect" not in running:
        url = f"http://127.0.0.1:{args.prefect_port}"
        pid = _start("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(args.prefect_port)], url + "/api/health", root, env)
        running["prefect"] = {"pid": pid, "url": url}
    if "mlflow" not in running:
        url = f"http://127.0.0.1:{args.mlflow_port}"
        store = params.tracking.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        pid = _start("mlflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                                "--default-artifact-root", (root / "mlruns").as_uri(), "--host", "127.0.0.1",
                                "--port", str(args.mlflow_port)], url + "/health", root, env)
        running["mlflow"] = {"pid": pid, "url": url}
    (root / SERVERS).write_text(json.dumps(running, indent=2))
    print(f"dataopt: Prefect UI {running['prefect']['url']}, MLflow UI {running['mlflow']['url']} "
          f"(127.0.0.1; logs in {root / '.dataopt'}); every dataopt command here now uses them; "
          "`dataopt server stop` stops them")
    return 0


def cmd_server_stop(args: argparse.Namespace, load: Callable) -> int:
    _, paths = load(args)
    running = read_servers(paths.root)
    for name, info in running.items():
        try:
            os.killpg(info["pid"], signal.SIGTERM)  # the server and the workers it started
        except ProcessLookupError:
            pass
        print(f"dataopt: stopped the {name} server (pid {info['pid']})")
    (paths.root / SERVERS).unlink(missing_ok=True)
    if not running:
        print("dataopt: no server of this project is running")
    return 0


def cmd_server_status(args: argparse.Namespace, load: Callable) -> int:
    _, paths = load(args)
    running = read_servers(paths.root)
    for name in ("prefect", "mlflow"):
        info = running.get(name)
        print(f"{name:<8} " + (f"running, pid {info['pid']}, {info['url']}" if info else "not running"))
    return 0


def cmd_serve(args: argparse.Namespace, load: Callable) -> int:
    params, paths = load(args)
    running = use_servers(paths.root)
    if "PREFECT_API_URL" not in os.environ:
        raise UserError("dataopt serve needs a Prefect server: run `dataopt server start` first "
                        "(or set PREFECT_API_URL)")
    (paths.resolve(params.schedule.incoming) or paths.data / "incoming").mkdir(parents=True, exist_ok=True)
    from flows.serve import serve_all  # why: Prefect, only for this command

    print(f"dataopt: serving watch (every {params.schedule.watch_interval} s), check-drift, retrain against "
          f"{os.environ['PREFECT_API_URL']}; landing folder {paths.resolve(params.schedule.incoming)}; "
          f"MLflow {os.environ.get('MLFLOW_TRACKING_URI', 'sqlite (no server)')}"
          + ("" if running else " (servers not started by dataopt)"), flush=True)
    serve_all(params, paths.root)
    return 0
