"""The MLflow model registry of the continuous loop: model versions, the ``champion`` and ``challenger``
aliases, and every promotion, rejection and rollback recorded as version tags with its reason.

- :func:`register` adds a logged model (the ``dataopt.model_uri`` of a tracked run) as a new version
  and points ``challenger`` at it.
- :func:`record_decision` writes the rule's decision (:func:`dataopt.evaluate.compare.decide_promotion`)
  on the version: ``dataopt.decision`` (promoted | rejected), ``dataopt.reason`` and the numbers; a
  promoted version becomes the champion through :func:`promote`, a rejected one leaves it alone.
- :func:`promote` moves ``champion`` and keeps the version it replaced in ``dataopt.previous_champion``,
  so that :func:`rollback` knows where to go back to.

Serving loads ``models:/<name>@champion``. Promotion and rollback only move an alias: no model file is
copied. The registry needs a database store (SQLite, or an MLflow server for several writers).
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Any, Optional

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from dataopt.errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION, REASON, PREVIOUS = "dataopt.decision", "dataopt.reason", "dataopt.previous_champion"
ACCURACY = "dataopt.accuracy"
TAG_VALUE_LIMIT = 5000  # MLflow's longest model version tag value


class RegistryError(UserError):
    """No such registered model or version, nothing to roll back to: one line for the user."""


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _text(value: Any) -> str:
    s = f"{value:.6g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)
    return s if len(s) <= TAG_VALUE_LIMIT else s[: TAG_VALUE_LIMIT - 3] + "..."


def _tag(client: MlflowClient, name: str, version: int, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), key, _text(value))


def _model_id(model_uri: str) -> Optional[str]:
    """``models:/<model_id>`` (a logged model) -> its id; other URIs (``runs:/``, ``models:/name/1``) -> None."""
    rest = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    return rest if rest and "/" not in rest and "@" not in rest else None


def store_exists(uri: str) -> bool:
    """False for a ``sqlite:///`` store whose file is not there (reading it would create it)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def _aliases(client: MlflowClient, uri: str, name: str) -> dict[str, int]:
    """``{alias: version}`` of registered model ``name``; RegistryError when there is none."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"no registered model {name!r} in {uri} (a retrain registers one)") from None
        raise
    return {alias: int(v) for alias, v in (model.aliases or {}).items()}


def _version(client: MlflowClient, uri: str, name: str, version: int | str) -> Any:
    _aliases(client, uri, name)  # a missing model is named as such, not as a missing version
    try:
        return client.get_model_version(name, str(int(version)))
    except (MlflowException, ValueError) as exc:
        if isinstance(exc, MlflowException) and not _missing(exc):
            raise
        known = ", ".join(str(v["version"]) for v in versions(uri, name)) or "none"
        raise RegistryError(f"registered model {name!r} has no version {version} (versions: {known})") from None


def register(tracking_uri: str, name: str, model_uri: str, run_id: Optional[str] = None,
             tags: Optional[dict[str, Any]] = None) -> int:
    """A new version of ``name`` (created when missing) from ``model_uri`` (``models:/<model_id>``,
    ``runs:/<run>/model``), aliased ``challenger``. The run's ``evaluate.accuracy`` is copied into the
    version's ``dataopt.accuracy`` tag unless ``tags`` give one. Returns the version number."""
    client = _client(tracking_uri)
    try:
        client.create_registered_model(name, description="dataopt models: aliases champion (serving) "
                                       "and challenger (the newest); decisions in version tags")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {k: _text(v) for k, v in (tags or {}).items() if v is not None}
    if run_id and ACCURACY not in tags:
        accuracy = client.get_run(run_id).data.metrics.get("evaluate.accuracy")
        if accuracy is not None:
            tags[ACCURACY] = _text(float(accuracy))
    tags.setdefault("dataopt.registered_at", _now())
    # MLflow's SQL registry looks a models:/<model_id> source up through the global tracking URI, not
    # the client's (a TODO in mlflow/store/model_registry/sqlalchemy_store.py): set it for this call
    with _use_tracking_uri(tracking_uri):
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                         model_id=_model_id(model_uri))
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return int(mv.version)


def set_alias(tracking_uri: str, name: str, alias: str, version: int | str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (which must exist)."""
    client = _client(tracking_uri)
    _version(client, tracking_uri, name, version)
    client.set_registered_model_alias(name, alias, str(int(version)))


def champion(tracking_uri: str, name: str) -> Optional[int]:
    """The version aliased ``champion``; None when there is none (or no registered model yet)."""
    try:
        return _aliases(_client(tracking_uri), tracking_uri, name).get(CHAMPION)
    except RegistryError:
        return None


def load(tracking_uri: str, name: str, ref: int | str = CHAMPION) -> Any:
    """The pyfunc model of version or alias ``ref`` of ``name`` (``models:/<name>@champion`` by default),
    resolved in this store (MLflow resolves ``models:/`` URIs through the global tracking URI)."""
    import mlflow.pyfunc

    ref = str(ref)
    with _use_tracking_uri(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}")


def _row(mv: Any, aliases: dict[str, int]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    accuracy = tags.get(ACCURACY)
    created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc)
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source,
            "aliases": sorted(a for a, v in aliases.items() if v == int(mv.version)),
            "created": created.strftime("%Y-%m-%d %H:%M:%S"), "decision": tags.get(DECISION),
            "reason": tags.get(REASON), "accuracy": float(accuracy) if accuracy else None, "tags": tags}


def versions(tracking_uri: str, name: str) -> list[dict[str, Any]]:
    """Every version of ``name``, oldest first: version, run_id, source, aliases, created (UTC),
    decision, reason, accuracy and all tags. RegistryError when ``name`` is not registered."""
    client = _client(tracking_uri)
    aliases = _aliases(client, tracking_uri, name)
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{quoted}'", page_token=token)
        out.extend(_row(mv, aliases) for mv in page)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda r: r["version"])


def show(tracking_uri: str, name: str, version: int | str) -> dict[str, Any]:
    """One version as a :func:`versions` row; ``version`` may be an alias (``champion``, ``challenger``)."""
    client = _client(tracking_uri)
    aliases = _aliases(client, tracking_uri, name)
    if isinstance(version, str) and not version.isdigit():
        if version not in aliases:
            raise RegistryError(f"registered model {name!r} has no alias {version!r} "
                                f"(aliases: {', '.join(sorted(aliases)) or 'none'})")
        version = aliases[version]
    return _row(_version(client, tracking_uri, name, version), aliases)


def promote(tracking_uri: str, name: str, version: int | str, reason: str, by: str = "rule") -> Optional[int]:
    """Make ``version`` the champion: move the alias, record ``reason``, who decided (``by``: the rule,
    or ``manual: <user>``) and the champion it replaces (``dataopt.previous_champion``, what
    :func:`rollback` goes back to). Returns that previous champion (None when there was none)."""
    client = _client(tracking_uri)
    version = int(_version(client, tracking_uri, name, version).version)
    previous = _aliases(client, tracking_uri, name).get(CHAMPION)
    if previous == version:
        raise RegistryError(f"version {version} of {name!r} is already the champion")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    _tag(client, name, version, {DECISION: "promoted", REASON: reason, "dataopt.decided_by": by,
                                 "dataopt.promoted_at": _now(), PREVIOUS: previous})
    if previous is None and PREVIOUS in (client.get_model_version(name, str(version)).tags or {}):
        client.delete_model_version_tag(name, str(version), PREVIOUS)  # from an earlier promotion
    return previous


def record_decision(tracking_uri: str, name: str, version: int | str, promotion: Any) -> None:
    """Record the rule's ``promotion`` (a :class:`dataopt.evaluate.compare.Promotion`) on ``version``:
    ``dataopt.decision`` (promoted | rejected), ``dataopt.reason`` and each number as ``dataopt.<key>``.
    A promoted version becomes the champion (:func:`promote`); a rejected one leaves the champion as it is."""
    client = _client(tracking_uri)
    version = int(_version(client, tracking_uri, name, version).version)
    _tag(client, name, version, {f"dataopt.{k}": v for k, v in promotion.numbers.items()})
    if promotion.promote:
        promote(tracking_uri, name, version, promotion.reason)
    else:
        _tag(client, name, version, {DECISION: "rejected", REASON: promotion.reason,
                                     "dataopt.decided_by": "rule", "dataopt.decided_at": _now()})


def rollback(tracking_uri: str, name: str, to: Optional[int | str] = None, reason: str = "rollback",
             by: str = "rule") -> tuple[int, int]:
    """Move ``champion`` back to the champion the current one replaced, or to version ``to``; records
    why on both versions (the one left: ``dataopt.decision=rolled_back``). Returns ``(from, to)``."""
    client = _client(tracking_uri)
    current = _aliases(client, tracking_uri, name).get(CHAMPION)
    if current is None:
        raise RegistryError(f"registered model {name!r} has no champion to roll back from")
    if to is None:
        previous = (client.get_model_version(name, str(current)).tags or {}).get(PREVIOUS)
        if previous is None:
            raise RegistryError(f"champion version {current} of {name!r} replaced no earlier champion; "
                                "name the version to go back to (--to VERSION)")
        to = previous
    target = int(_version(client, tracking_uri, name, to).version)
    if target == current:
        raise RegistryError(f"version {target} of {name!r} is already the champion")
    client.set_registered_model_alias(name, CHAMPION, str(target))
    when = _now()
    _tag(client, name, current, {DECISION: "rolled_back", REASON: f"rolled back to version {target}: {reason}",
                                 "dataopt.decided_by": by, "dataopt.rolled_back_at": when})
    _tag(client, name, target, {DECISION: "promoted", REASON: f"champion again (rollback from version "
                                f"{current}): {reason}", "dataopt.decided_by": by, "dataopt.promoted_at": when})
    return current, target


def manual(who: Optional[str] = None) -> str:
    """``by`` of a decision made by hand: ``manual: <user>``."""
    try:
        who = who or getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return f"manual: {who}"
