"""Fault injection for the reliability tests.

``SPARSEBENCH_KILL_AT=NAME`` (or ``NAME#N`` for the N-th time) makes the process kill
itself with SIGKILL when it reaches checkpoint NAME, exactly as a crash or ``kill -9``
would: no handler, no cleanup. Without the variable a checkpoint does nothing.
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def checkpoint(name: str) -> None:
    target = os.environ.get("SPARSEBENCH_KILL_AT")
    if not target:
        return
    want, _, nth = target.partition("#")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
