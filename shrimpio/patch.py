"""``import shrimpio.patch``: unmodified programs get shrimpio sockets.

Importing this module calls :func:`enable`.  It replaces ``socket.socket``
with :class:`shrimpio.socket.socket` (so ``socket.create_connection``,
``create_server``, ``fromfd``, ``socketserver``, ``http``, ``xmlrpc`` ... make
shrimpio sockets) and the pollers in ``select`` and ``selectors`` with ones
that understand shared-memory connections, makes every way to get an
event loop (``asyncio``'s policy, ``uvloop.new_event_loop``/``Loop``/``run``/
``install``/``EventLoopPolicy``) give the shrimpio loop, and installs the
``os.sendfile``, ``subprocess`` and ``multiprocessing`` hooks for connection
fds (:mod:`shrimpio._fdhooks`).  :func:`disable` puts the stdlib back.
``SHRIMPIO_DISABLE=1`` makes every connection take kernel TCP (the patch
stays in place, so ``shrimpio.info`` still says why).

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
from typing import Any

from . import _epoll, _fdhooks, _poll
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
        _select.epoll = _epoll.epoll
    _selectors.SelectSelector._select = staticmethod(_poll.select)
    _selectors.PollSelector._selector_cls = _poll.poll
    if hasattr(_selectors, "EpollSelector"):
        _selectors.EpollSelector._selector_cls = _epoll.epoll
    _fdhooks.install()
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
    """Every way to get an event loop gets the shrimpio loop: plain
    ``asyncio.run()``/``asyncio.new_event_loop()`` (through the policy), and
    uvloop's own entry points (``uvloop.new_event_loop``, ``uvloop.Loop``,
    ``uvloop.run``, ``uvloop.install``, ``uvloop.EventLoopPolicy``), which
    uvicorn, hypercorn and others call directly."""
    import asyncio

    import uvloop

    from . import transport
    _saved_policy.append(asyncio.get_event_loop_policy())
    asyncio.set_event_loop_policy(transport.EventLoopPolicy())
    for name, ours in (("new_event_loop", transport.new_event_loop), ("Loop", transport.Loop),
                       ("run", _uvloop_run), ("install", _uvloop_install),
                       ("EventLoopPolicy", transport.EventLoopPolicy)):
        # (install and EventLoopPolicy come from the module's __getattr__:
        # not in its dict, so disable() deletes ours again.)
        _saved_uvloop[name] = uvloop.__dict__.get(name, _MISSING)
        setattr(uvloop, name, ours)


_saved_policy: list = []
_saved_uvloop: dict = {}
_MISSING = object()


def _uvloop_run(main: Any, *, loop_factory: Any = None, debug: Any = None, **run_kwargs: Any) -> Any:
    """``uvloop.run`` under the patch: the same, on a shrimpio loop (a
    ``loop_factory`` given by the caller is used as given)."""
    from . import transport
    return transport.run(main, loop_factory=loop_factory or transport.new_event_loop, debug=debug,
                         **run_kwargs)


def _uvloop_install() -> None:
    """``uvloop.install`` under the patch: the shrimpio loop's policy."""
    import asyncio

    from . import transport
    asyncio.set_event_loop_policy(transport.EventLoopPolicy())


def disable() -> None:
    """Put the stdlib's socket class and pollers back."""
    if _saved_policy:
        import asyncio

        import uvloop
        asyncio.set_event_loop_policy(_saved_policy.pop())
        for name, value in _saved_uvloop.items():
            if value is _MISSING:
                delattr(uvloop, name)
            else:
                setattr(uvloop, name, value)
        _saved_uvloop.clear()
    for (owner, name), value in _saved.items():
        if value is not None:
            setattr(owner, name, value)
    _saved.clear()
    _fdhooks.uninstall()
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
