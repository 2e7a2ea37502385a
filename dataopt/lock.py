"""One writer per workspace: the lock every command that writes artifacts takes.

``dataopt run`` holds it for the whole flow; ``dataopt stage`` (what ``dvc repro`` runs) and ``dataopt
track`` hold it for their own work. The lock is an OS file lock (``filelock`` on ``.dataopt/lock``), so
the kernel releases it when its holder dies, even by ``kill -9``: a lock left by a dead process is taken
over at once, and the holder file it left behind is reported as stale. A second writer waits up to
``timeout`` seconds (``orchestration.lock_timeout``; 0 = fail at once) and then fails with one line that
names the holder: pid, command and since when.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout

from dataopt.errors import UserError


class WorkspaceBusy(UserError):
    """Another process writes this workspace."""


def process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, since {since})"


class WorkspaceLock:
    """``with WorkspaceLock(root, "dataopt run"):`` — the workspace's single-writer lock.

    Re-entrant within one process (a flow that calls stages in-process takes it once).
    """

    _held: dict[str, int] = {}  # lock path -> depth, in this process

    def __init__(self, root: str | os.PathLike, command: str, timeout: float = 0.0):
        self.root = Path(root)
        self.command = command
        self.timeout = timeout
        self.folder = self.root / ".dataopt"
        self.path = self.folder / "lock"
        self.info = self.folder / "lock.json"
        self.stale_: Optional[dict[str, Any]] = None

    def holder(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "WorkspaceLock":
        self._key = str(self.path.resolve())  # resolve() needs no existing file
        if WorkspaceLock._held.get(self._key):
            WorkspaceLock._held[self._key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=self.timeout)  # filelock: < 0 waits forever
        try:
            self._lock.acquire(poll_interval=0.2)
        except Timeout:
            holder = self.holder()
            who = describe(holder) if holder else "another process"
            waited = f" after waiting {self.timeout:g} s" if self.timeout > 0 else ""
            raise WorkspaceBusy(f"{self.root} is in use by {who}{waited}: wait for it to finish, or set "
                                "orchestration.lock_timeout to wait longer") from None
        previous = self.holder()
        try:
            pid = int((previous or {}).get("pid", 0))
        except (TypeError, ValueError):  # a damaged holder file: nothing to report
            pid = 0
        if previous and pid != os.getpid() and not process_alive(pid):
            self.stale_ = previous  # its process died holding the lock: the kernel released it
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "since": time.time(), "argv": sys.argv}
        tmp = self.info.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, self.info)
        WorkspaceLock._held[self._key] = 1
        return self

    def __exit__(self, *exc: Any) -> None:
        WorkspaceLock._held[self._key] -= 1
        if WorkspaceLock._held[self._key]:
            return
        del WorkspaceLock._held[self._key]
        try:
            self.info.unlink()
        except FileNotFoundError:
            pass
        self._lock.release()
