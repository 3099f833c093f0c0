"""Process-wide helpers of the control plane: this process's pid without a
system call, environment variables read without re-encoding their names on
every call (a connect reads several, any of which may change at any time),
and exit hooks that also run at the end of a multiprocessing child."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

__all__ = ["cpus", "environ_data", "getenv", "on_exit", "pid"]

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
# os.environ and its encoded dict, as last found: a connect and a close
# each read variables, and finding the dict again costs more than the
# read.  (CPython keeps one dict for the life of os.environ; a program
# that replaces os.environ itself is seen at the next read.)
_environ: object = None
_data: "dict | None" = None
# Variable names as the dict's keys (bytes), encoded once.
_keys: "dict[str, bytes]" = {}


def environ_data() -> dict | None:
    """CPython's encoded ``os.environ`` mapping (bytes to bytes), or None."""
    global _environ, _data
    env = os.environ
    if env is _environ:
        return _data
    data = getattr(env, "_data", None) if type(env) is _ENVIRON_TYPE else None
    _data = data if type(data) is dict else None
    _environ = env
    return _data


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, without its per-call key encoding (a
    connect reads several variables, each of which may change at any time):
    CPython's ``os.environ`` keeps the encoded variables in a dict."""
    data = _data if os.environ is _environ else environ_data()
    if data is None:
        return os.environ.get(name)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = name.encode()
    value = data.get(key)
    return None if value is None else os.fsdecode(value)


_cpus = (-1.0, 1)           # (when read, CPUs this process may run on)


def cpus() -> int:
    """How many CPUs this process may run on (its affinity), read again at
    most once a second (a system call: asked on the accept path)."""
    global _cpus
    when, n = _cpus
    now = time.monotonic()
    if now - when > 1.0:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        _cpus = (now, n)
    return n


def on_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` when this process exits normally: at interpreter exit,
    and at the end of a multiprocessing child (which leaves by os._exit,
    after its finalizers) if multiprocessing is in use."""
    import atexit
    atexit.register(fn)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, fn, exitpriority=100)
