"""Helpers for the shrimpio.msg tests: forked children that run a function
with a channel end and exit 0 if it returned, 1 if it raised."""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

from children import reap


def fork(fn: Callable[..., Any], *args: Any, close: tuple = ()) -> int:
    """Fork a child that closes ``close`` and runs ``fn(*args)``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for c in close:
                c.close()
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def join(pid: int, timeout: float = 60.0) -> None:
    assert reap(pid, timeout) == 0, "the child failed (its traceback is above)"


def cma_works() -> bool:
    """Can a forked child and its parent copy between each other here?"""
    from shrimpio.msg import _cma
    import ctypes
    token = ctypes.create_string_buffer(b"shrimpio-cma-ok!", 16)
    if not _cma.available():
        return False
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = _cma.verify(os.getppid(), ctypes.addressof(token), token.raw)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    ok = os.read(r, 1) == b"1"
    os.close(r)
    reap(pid, 10)
    return ok and _cma.verify(os.getpid(), ctypes.addressof(token), token.raw)
