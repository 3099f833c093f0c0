"""eventlet's green sockets: kernel TCP, and said so.

eventlet makes its green sockets from a fresh copy of the ``socket`` module
(``eventlet.patcher.original``), imported apart from the patched one, and
its hub waits with an unpatched ``select``: it watches the fd in the
kernel, where a shared-memory connection's fd is its doorbell, honest for
reads only (docs/fd.md, "Pollers that are not shrimpio's").  So its
connections stay on kernel TCP.  Left alone they would be invisible to
shrimpio (no report, ``shrimpio.info`` knowing nothing, and its listeners
unknown to the registry, which is right); the patch instead gives eventlet
a shrimpio socket class that never takes shared memory (its ``_only_tcp``
reason), so that every green connection and listener says why it is TCP.

Installed by the patch when ``eventlet.greenio.base`` is imported
(:mod:`shrimpio._fdhooks`).
"""

from __future__ import annotations

from typing import Any

from . import socket as _ss

__all__ = ["REASON", "install", "uninstall"]

#: What eventlet's connections report.
REASON = "eventlet (its hub polls the fd in the kernel)"


class GreenNative(_ss.socket):
    """The socket inside an eventlet ``GreenSocket`` under the patch: a
    shrimpio socket on kernel TCP, with eventlet's reason."""

    __slots__ = ()
    _only_tcp = REASON


_saved: dict[int, Any] = {}


def install(mod: Any) -> None:
    """Give ``eventlet.greenio.base`` our class (it looks the name up on
    each new green socket)."""
    original = getattr(mod, "_original_socket", None)
    if original is None or original is GreenNative:
        return
    _saved[id(mod)] = original
    mod._original_socket = GreenNative


def uninstall(mod: Any) -> None:
    """Put eventlet's own class back."""
    original = _saved.pop(id(mod), None)
    if original is not None and getattr(mod, "_original_socket", None) is GreenNative:
        mod._original_socket = original
