"""DVC decides what is stale: the one cache of dataopt. The only module of dataopt that imports dvc.

``dataopt run`` asks DVC, stage by stage, whether the stage's deps, params and outs still match
``dvc.lock`` (``dvc status <stage>``), runs only the stages that do not, and records each finished stage
in ``dvc.lock`` (``dvc commit <stage>``), so that ``dvc repro`` then has nothing to do; after a
``dvc repro``, ``dataopt run`` reuses every stage. There is no second opinion to disagree with DVC's.

``dvc.yaml`` is rendered from ``dataopt/artifacts.py``, so the stages DVC checks are the declared ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Decision:
    """Whether one stage runs in this execution: ``status`` ``"run"``, ``"cached"`` (dvc.lock holds it)
    or ``"skipped"`` (a stage beside the chain that this execution may not bring up to date), and
    ``reason``, why (``params differ from params.yaml``, DVC's ``changed deps: ...``, ...)."""

    stage: str
    status: str
    reason: str

    @property
    def run(self) -> bool:
        return self.status == "run"


class StagePlan:
    """Which stages of one execution run and why, and which of them ``dvc.lock`` may record.

    Ask :meth:`decide` stage by stage, in pipeline order, each after the stages before it ran: DVC's
    answer for a stage depends on the outputs of those before it. A stage runs when ``force`` says so
    (``--no-cache``), when its params differ from the project's params.yaml (DVC's answer is not about
    this run's params), outside a DVC project, or when ``dvc status`` says it is stale. Once one
    stage has run with params that are not the project's, the execution is *tainted*: nothing after it
    is recorded in dvc.lock (:meth:`ran`), and the stages beside the chain are not brought up to date.
    """

    def __init__(self, cache: Optional[StageCache], params: Params, project_params: Optional[Params],
                 force: Optional[str] = None):
        self.cache, self.params, self.project_params, self.force = cache, params, project_params, force
        self.tainted = False

    @property
    def recorded(self) -> bool:
        """Whether what ran so far goes into dvc.lock."""
        return self.cache is not None and not self.tainted

    def decide(self, name: str, beside: bool = False) -> Decision:
        """Whether stage ``name`` runs now; ``beside``: a stage beside the chain (``SIDE_STAGES``),
        run only to keep dvc.lock current, so only when DVC says it is stale and the run is recorded."""
        if beside:
            if not self.recorded:
                return Decision(name, "skipped", "no DVC project" if self.cache is None
                                else "params differ from params.yaml: dvc.lock does not record this run")
            why = self.cache.stale(name)
        else:
            own = differs(name, self.params, self.project_params)
            self.tainted = self.tainted or own
            why = self.force or ("params differ from params.yaml" if own else "no DVC project"
                                 if self.cache is None else self.cache.stale(name))
        return Decision(name, "cached", "dvc.lock up to date") if why is None else Decision(name, "run", why)

    def ran(self, name: str) -> None:
        """Stage ``name`` has run: record it in dvc.lock when this execution is recorded."""
        if self.recorded:
            self.cache.commit(name)


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
