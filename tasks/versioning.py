"""DVC decides what is stale: the one cache of dataopt. The only module of dataopt that imports dvc.

``dataopt run`` asks DVC, stage by stage, whether the stage's deps, params and outs still match
``dvc.lock`` (``dvc status <stage>``), runs only the stages that do not, and records each finished stage
in ``dvc.lock`` (``dvc commit <stage>``), so that ``dvc repro`` then has nothing to do; after a
``dvc repro``, ``dataopt run`` reuses every stage. There is no second opinion to disagree with DVC's.

``dvc.yaml`` is rendered from ``dataopt/artifacts.py``, so the stages DVC checks are the declared ones.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from dvc.lock import LockError
from dvc.repo import Repo

from dataopt.artifacts import params as stage_params
from dataopt.config import Params
from dataopt.errors import UserError


def _describe(change: Any) -> str:
    """``{'changed deps': {'params.yaml': {'seed': 'modified'}}}`` ->
    ``changed deps: params.yaml: seed modified``."""
    if isinstance(change, dict):
        return ", ".join(f"{k}: {_describe(v)}" if isinstance(v, dict) else f"{k} {v}"
                         for k, v in change.items())
    return str(change)


class StageCache:
    """DVC's view of one project: :meth:`stale` and :meth:`commit` per stage. Use as a context manager."""

    def __init__(self, root: Path):
        # DVC logs "Updating lock file 'dvc.lock'" per commit; the run summary says it once
        logging.getLogger("dvc").setLevel(logging.WARNING)
        self.root = Path(root)
        self.repo = Repo(str(self.root))

    @classmethod
    def open(cls, root: Path) -> tuple[Optional["StageCache"], str]:
        """``(cache, note)``: no cache (every stage runs) outside a DVC project, and the note says why."""
        root = Path(root)
        if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").exists():
            return None, f"{root} is not a DVC project (no .dvc/ or dvc.yaml): every stage runs, " \
                         "dvc.lock not updated"
        return cls(root), ""

    def stale(self, stage: str) -> Optional[str]:
        """None when ``stage`` matches dvc.lock, else why not (``changed deps: ...``, ``not in dvc.lock``)."""
        try:
            status = self.repo.status(targets=[stage]).get(stage)
        except LockError:
            raise UserError(f"DVC is busy in {self.root}: another dvc command (e.g. `dvc repro`) holds "
                            ".dvc/tmp/lock; wait for it to finish") from None
        if not status:
            return None
        reasons = [item if isinstance(item, str) else _describe(item) for item in status]
        return "; ".join(reasons) or "not in dvc.lock"

    def commit(self, stage: str) -> None:
        """Record ``stage``'s current deps, params and outs in dvc.lock (and outs in DVC's cache)."""
        try:
            self.repo.commit(stage, force=True)
        except LockError:
            raise UserError(f"dvc commit {stage} failed: another dvc command holds .dvc/tmp/lock in "
                            f"{self.root}") from None
        except Exception as err:  # noqa: BLE001 - DVC raises many kinds; the user needs its message
            msg = str(err).strip() or type(err).__name__
            raise UserError(f"dvc commit {stage} failed: {msg}") from None

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> "StageCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def differs(name: str, params: Params, project_params: Optional[Params]) -> bool:
    """True when a params section of stage ``name`` differs from the project's params.yaml (the values
    DVC compares with): DVC's answer does not hold for this run, and dvc.lock must not record it."""
    if project_params is None:
        return True
    mine, theirs = params.model_dump(mode="json"), project_params.model_dump(mode="json")
    return any(_section(mine, s) != _section(theirs, s) for s in stage_params(name))


def _section(doc: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc[part]
    return doc


def track_data(root: Path) -> str:
    """``dvc add data``: record ``data/`` (batches and manifest) in ``data.dvc``; says what it did."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        return f"{root} is not a DVC project (no .dvc/): data/ not versioned; run `dvc init` to version it"
    logging.getLogger("dvc").setLevel(logging.WARNING)
    try:
        with Repo(str(root)) as repo:
            repo.add("data")
    except LockError:
        raise UserError(f"DVC is busy in {root}: another dvc command holds .dvc/tmp/lock; the batch is "
                        "in data/ but not yet in data.dvc: run `dvc add data` when it is done") from None
    return "data.dvc updated (dvc add data)"


def checkout(root: Path) -> None:
    """``dvc checkout --force``: the outputs ``dvc.lock`` records, back from DVC's cache (a rejected
    challenger's artifacts replaced by the champion's)."""
    logging.getLogger("dvc").setLevel(logging.WARNING)
    try:
        with Repo(str(root)) as repo:
            repo.checkout(force=True)
    except LockError:
        raise UserError(f"DVC is busy in {root}: another dvc command holds .dvc/tmp/lock") from None
    except Exception as err:  # noqa: BLE001 - DVC raises many kinds; the user needs its message
        raise UserError(f"dvc checkout failed in {root}: {str(err).strip() or type(err).__name__}") from None
