"""``import shrimpio.patch``: unmodified programs get shrimpio sockets.

Importing this module calls :func:`enable`.  It replaces ``socket.socket``
with :class:`shrimpio.socket.socket` (so ``socket.create_connection``,
``create_server``, ``fromfd``, ``socketserver``, ``http``, ``xmlrpc`` ... make
shrimpio sockets) and the pollers in ``select`` and ``selectors`` with ones
that understand shared-memory connections.  :func:`disable` puts the stdlib
back.  ``SHRIMPIO_DISABLE=1`` makes every connection take kernel TCP (the
patch stays in place, so ``shrimpio.info`` still says why).

Python children inherit the patch: :func:`enable` puts a directory with a
``sitecustomize.py`` on ``PYTHONPATH`` and sets ``SHRIMPIO_PATCH=1``
(``subprocess``, ``multiprocessing`` with spawn or forkserver; forked
children share the patched modules anyway).

TLS: ``ssl.SSLContext.sslsocket_class`` becomes :class:`shrimpio._tls.SSLSocket`
(a subclass of ``ssl.SSLSocket``), so ``wrap_socket`` of a shared-memory
connection runs TLS over its rings; kernel connections keep the stdlib's
class.  Being a class attribute, it reaches contexts made before the patch.
"""

from __future__ import annotations

import os
import select as _select
import selectors as _selectors
import socket as _std

from . import _poll
from .socket import StdSocket, socket

__all__ = ["enable", "disable", "enabled"]

_saved: dict = {}
_saved_env: dict = {}

#: Directory whose sitecustomize.py patches child interpreters.
BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")


def child_environment(env: "dict[str, str] | os._Environ[str]") -> None:
    """Make Python children started with ``env`` patch themselves."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    # The package itself must be importable in the child, wherever it lives.
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in (pkg_parent, BOOT_DIR):
        if p in paths:
            paths.remove(p)
    env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, pkg_parent] + paths)
    env["SHRIMPIO_PATCH"] = "1"


def enable() -> None:
    """Install shrimpio sockets and pollers (idempotent)."""
    if _saved:
        return
    _saved.update({
        (_std, "socket"): _std.socket,
        (_select, "select"): _select.select,
        (_select, "poll"): _select.poll,
        (_select, "epoll"): getattr(_select, "epoll", None),
        # The selector classes bound the stdlib pollers at import time.
        (_selectors.SelectSelector, "_select"): _selectors.SelectSelector.__dict__["_select"],
        (_selectors.PollSelector, "_selector_cls"): _selectors.PollSelector._selector_cls,
    })
    if hasattr(_selectors, "EpollSelector"):
        _saved[(_selectors.EpollSelector, "_selector_cls")] = _selectors.EpollSelector._selector_cls
    _std.socket = socket
    _select.select = _poll.select
    _select.poll = _poll.poll
    if hasattr(_select, "epoll"):
        _select.epoll = _poll.epoll
    _selectors.SelectSelector._select = staticmethod(_poll.select)
    _selectors.PollSelector._selector_cls = _poll.poll
    if hasattr(_selectors, "EpollSelector"):
        _selectors.EpollSelector._selector_cls = _poll.epoll
    _install_ssl()
    _install_loop_policy()
    _saved_env.update({k: os.environ.get(k) for k in ("PYTHONPATH", "SHRIMPIO_PATCH")})
    child_environment(os.environ)


def _install_ssl() -> None:
    """``SSLContext.wrap_socket`` of a shrimpio socket makes shrimpio's
    ``SSLSocket`` (unless a program already put its own class there)."""
    try:
        import ssl
    except ImportError:          # a Python built without OpenSSL
        return
    from . import _tls
    if ssl.SSLContext.sslsocket_class is _tls.StdSSLSocket:
        _saved[(ssl.SSLContext, "sslsocket_class")] = _tls.StdSSLSocket
        ssl.SSLContext.sslsocket_class = _tls.SSLSocket


def _install_loop_policy() -> None:
    """Plain ``asyncio.run()`` gets the shrimpio loop (uvloop-based)."""
    import asyncio

    from .transport import EventLoopPolicy
    _saved_policy.append(asyncio.get_event_loop_policy())
    asyncio.set_event_loop_policy(EventLoopPolicy())


_saved_policy: list = []


def disable() -> None:
    """Put the stdlib's socket class and pollers back."""
    if _saved_policy:
        import asyncio
        asyncio.set_event_loop_policy(_saved_policy.pop())
    for (owner, name), value in _saved.items():
        if value is not None:
            setattr(owner, name, value)
    _saved.clear()
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()
    assert _std.socket is StdSocket


def enabled() -> bool:
    """Is the patch installed?"""
    return bool(_saved)


enable()
