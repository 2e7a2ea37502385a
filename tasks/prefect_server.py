"""Crash-clean Prefect: the temporary API of a one-shot run dies with it, and flow runs left RUNNING by a
dead process are marked Crashed.

Without a configured server Prefect starts its API as a child process (``SubprocessASGIServer``) and
stops it when the flow ends; a run killed by SIGKILL never gets there, and the orphan server kept
listening. On Linux the child is started with ``PR_SET_PDEATHSIG`` so the kernel sends it SIGTERM
when its parent dies. Elsewhere nothing changes (and :func:`install` says so).
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import os
import socket
from typing import Any

import prefect.server.api.server as prefect_server
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from dataopt.lock import process_alive

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _SubprocessDyingWithParent:
    """Stands in for the ``subprocess`` module inside Prefect's server module only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the module's name
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return subprocess.Popen(*args, **kwargs)


def install() -> bool:
    """Make the temporary server die with this process; False where that is not possible."""
    if not sys.platform.startswith("linux") or not hasattr(prefect_server, "subprocess"):
        return False
    prefect_server.subprocess = _SubprocessDyingWithParent()
    return True


def process_tag(pid: int | None = None) -> str:
    """The tag a dataopt flow run carries: which process on which host runs it."""
    return f"dataopt-pid:{pid or os.getpid()}@{socket.gethostname()}"



def crash_dead_runs() -> list[str]:
    """Mark Crashed the RUNNING flow runs of this host whose dataopt process has died (killed by
    SIGKILL, say); returns their names."""
    host, crashed = socket.gethostname(), []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
        ))
        for run in runs:
            owner = next((t for t in run.tags if t.startswith("dataopt-pid:")), None)
            if owner is None:
                continue
            pid, _, where = owner[len("dataopt-pid:"):].partition("@")
            if where != host or not pid.isdigit() or process_alive(int(pid)):
                continue
            client.set_flow_run_state(run.id, Crashed(message=f"its process (pid {pid}) died; marked "
                                                              "by the next dataopt run"), force=True)
            crashed.append(run.name)
    return crashed
