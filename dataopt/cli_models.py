"""``dataopt models [list|show|promote|rollback]``: the MLflow model registry of the continuous loop
(versions, the champion and challenger aliases, each decision and its reason). Registered on the main
parser by :func:`add_commands`; the registry itself is ``tasks/registry.py``."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from dataopt.cli_service import use_servers
from dataopt.config import load_params
from dataopt.errors import UserError
from dataopt.paths import Paths

MODELS_EPILOG = """\
Every retrain registers its model as a new version of params.yaml's promotion.registered_model
(alias `challenger`); the champion/challenger rule (promotion section) decides whether it becomes
the `champion` (what serving loads: models:/<name>@champion). Each decision is recorded on the
version with its reason and numbers; promotion and rollback move the alias, nothing else.

examples:
  dataopt models                               # = dataopt models list
  dataopt models show                          # the champion
  dataopt models show 3
  dataopt models promote 3 --reason "better on the new night images"   # manual override, recorded
  dataopt models rollback                      # back to the champion the current one replaced
  dataopt models rollback --to 1 --reason "v3 misroutes class cat"
"""


ACTIONS = ("list", "show", "promote", "rollback")


def add_commands(sub: Any, common: argparse.ArgumentParser, set_option: Callable, fmt: Any,
                 locate: Callable) -> None:
    # one parser with ACTION as a positional, not sub-parsers: a sub-parser's defaults would reset
    # the options given before its name (`dataopt models --project X list`)
    p = sub.add_parser("models", parents=[common], formatter_class=fmt, epilog=MODELS_EPILOG,
                       help="list, show, promote or roll back registered model versions",
                       description="The model registry: versions, champion and challenger, decisions.")
    p.add_argument("action", nargs="?", default="list", choices=ACTIONS, metavar="ACTION",
                   help="list (default): a table of the versions | show [VERSION]: one version in full "
                        "(default: the champion) | promote VERSION --reason TEXT: make it the champion "
                        "by hand (recorded) | rollback [--to VERSION]: move the champion back")
    p.add_argument("version", nargs="?", metavar="VERSION",
                   help="show, promote: a version number (show: also an alias, champion or challenger)")
    p.add_argument("--to", metavar="VERSION", help="rollback: the version to go back to (default: the "
                   "champion the current one replaced)")
    p.add_argument("--reason", metavar="TEXT", help="promote (required), rollback: why (recorded on the version)")
    set_option(p)
    p.set_defaults(func=lambda args: cmd_models(args, locate))


def cmd_models(args: argparse.Namespace, locate: Callable) -> int:
    """Check the action's arguments before MLflow is touched, then run it."""
    if args.version is not None and args.action not in ("show", "promote"):
        raise UserError(f"models {args.action} takes no VERSION" +
                        (" (use --to VERSION)" if args.action == "rollback" else ""))
    if args.to is not None and args.action != "rollback":
        raise UserError(f"--to is for models rollback, not models {args.action}")
    if args.reason is not None and args.action not in ("promote", "rollback"):
        raise UserError(f"--reason is for models promote and rollback, not models {args.action}")
    if args.action == "promote" and (args.version is None or not args.reason):
        raise UserError("models promote needs VERSION and --reason TEXT (the reason is recorded)")
    return {"list": cmd_list, "show": cmd_show, "promote": cmd_promote,
            "rollback": cmd_rollback}[args.action](args, locate)


def _registry(args: argparse.Namespace, locate: Callable) -> tuple[Any, str, str]:
    """``(tasks.registry, tracking URI, registered model name)`` for this project; only the params
    schema is checked (no plug-ins: these commands train nothing)."""
    root, params_file = locate(args)
    use_servers(root)  # through the project's MLflow server when `dataopt server start` runs one
    params = load_params(params_file, getattr(args, "overrides", None))
    from tasks import registry  # why: MLflow, only for these commands
    from tasks.tracking import tracking_uri  # why: MLflow, only for these commands

    uri = tracking_uri(params, Paths.at(root))
    if not registry.store_exists(uri):
        raise UserError(f"no MLflow store at {uri} (nothing tracked or registered yet)")
    return registry, uri, params.promotion.registered_model


def _version(text: str) -> int:
    if not text.isdigit():
        raise UserError(f"version must be a number, got {text!r}")
    return int(text)


def _accuracy(row: dict[str, Any]) -> str:
    return f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"


def models_table(rows: list[dict[str, Any]], width: int = 100) -> str:
    lines = [f"{'version':>7}  {'aliases':<20} {'decision':<11} {'accuracy':>8}  {'created (UTC)':<19}  reason"]
    for r in rows:
        reason = r["reason"] or ""
        reason = reason if len(reason) <= width else reason[: width - 3] + "..."
        lines.append(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['decision'] or '-':<11} "
                     f"{_accuracy(r):>8}  {r['created']:<19}  {reason}")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace, locate: Callable) -> int:
    registry, uri, name = _registry(args, locate)
    rows = registry.versions(uri, name)
    if not rows:
        raise UserError(f"registered model {name!r} has no version yet ({uri})")
    print(f"dataopt models: {name!r} in {uri}")
    print(models_table(rows))
    return 0


def version_text(name: str, row: dict[str, Any]) -> str:
    lines = [f"{name} version {row['version']}" + (f" ({', '.join(row['aliases'])})" if row["aliases"] else ""),
             f"  decision:  {row['decision'] or '-'}", f"  reason:    {row['reason'] or '-'}",
             f"  accuracy:  {_accuracy(row)}", f"  created:   {row['created']} UTC",
             f"  run:       {row['run_id'] or '-'}", f"  source:    {row['source']}",
             f"  load with: models:/{name}/{row['version']}"]
    extra = {k: v for k, v in row["tags"].items() if k not in ("dataopt.decision", "dataopt.reason")}
    if extra:
        lines.append("  tags:")
        lines.extend(f"    {k} = {v}" for k, v in sorted(extra.items()))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace, locate: Callable) -> int:
    registry, uri, name = _registry(args, locate)
    print(version_text(name, registry.show(uri, name, args.version or "champion")))
    return 0


def cmd_promote(args: argparse.Namespace, locate: Callable) -> int:
    registry, uri, name = _registry(args, locate)
    version = _version(args.version)
    previous = registry.promote(uri, name, version, f"manual override: {args.reason}", by=registry.manual())
    print(f"dataopt models: version {version} of {name!r} is the champion"
          + (f" (was version {previous}; `dataopt models rollback` goes back)" if previous else ""))
    return 0


def cmd_rollback(args: argparse.Namespace, locate: Callable) -> int:
    registry, uri, name = _registry(args, locate)
    to = _version(args.to) if args.to is not None else None
    old, new = registry.rollback(uri, name, to, args.reason or "manual rollback", by=registry.manual())
    print(f"dataopt models: champion of {name!r} rolled back from version {old} to version {new}")
    return 0
