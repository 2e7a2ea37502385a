"""A process-wide stop request, so that Ctrl-C or SIGTERM also stops work in worker threads.

Python delivers a signal to the main thread only. A stage that runs in a worker thread (Prefect's
thread pool under ``dataopt run``) would go on to its end, and the interpreter waits for it before
exiting. The ``dataopt`` command calls :func:`request_stop` on SIGINT / SIGTERM; long loops (every
training step) call :func:`check`, which raises KeyboardInterrupt once a stop was requested.
"""
from __future__ import annotations

import threading

_stop = threading.Event()


def request_stop() -> None:
    _stop.set()


def requested() -> bool:
    return _stop.is_set()


def clear() -> None:
    """Forget an earlier request (a new command in the same process)."""
    _stop.clear()


def check() -> None:
    """Raise KeyboardInterrupt when a stop was requested (cheap: one flag read)."""
    if _stop.is_set():
        raise KeyboardInterrupt("stop requested")
