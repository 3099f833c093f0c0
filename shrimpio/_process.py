"""Process-wide helpers of the control plane: this process's pid without a
system call, environment variables read without re-encoding their names on
every call (a connect reads several, any of which may change at any time),
and exit hooks that also run at the end of a multiprocessing child."""

from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["environ_data", "getenv", "on_exit", "pid"]

#: This process's pid.  ``os.getpid()`` is a system call each time (glibc
#: no longer caches it), and a connection asks several times (whose kit,
#: whose listener queue, whose report); an at-fork hook keeps this one
#: right in a child.  (A child made by a raw ``fork()`` that runs no
#: at-fork hooks, e.g. from C, would see its parent's.)
pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

_ENVIRON_TYPE = type(os.environ) if os.name == "posix" else None


def environ_data() -> dict | None:
    """CPython's encoded ``os.environ`` mapping (bytes to bytes), or None."""
    env = os.environ
    data = getattr(env, "_data", None) if type(env) is _ENVIRON_TYPE else None
    return data if type(data) is dict else None


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, without its per-call key encoding (a
    connect reads several variables, each of which may change at any time):
    CPython's ``os.environ`` keeps the encoded variables in a dict."""
    data = environ_data()
    if data is None:
        return os.environ.get(name)
    value = data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def on_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` when this process exits normally: at interpreter exit,
    and at the end of a multiprocessing child (which leaves by os._exit,
    after its finalizers) if multiprocessing is in use."""
    import atexit
    atexit.register(fn)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, fn, exitpriority=100)
