"""gevent's sockets over shared memory.

``gevent.monkey.patch_all()`` puts gevent's cooperative socket class in
place of ``socket.socket`` (shrimpio's, under ``shrimpio run``).  A gevent
socket wraps a native socket object (its ``_gevent_sock_class``) that it
drives non-blocking, and waits in gevent's hub on io watchers of its fd.
Under the patch, that native object is a shrimpio socket, so connect,
accept and the data calls are shrimpio's; what is left is the waiting,
which gevent does on the fd:

* a connection's fd is its data doorbell, rung only when our side said it
  sleeps: before a wait, the ring is armed (a wait that finds the ring ready
  returns at once), and the socket's watchers are moved to the connection's
  doorbells (data for reads, space for writes), so gevent's own close and
  ``cancel_wait`` keep working;
* a listener's shared-memory clients arrive on its registry socket (and on
  the control sockets of clients whose hello is late): ``accept()`` and
  gevent's ``StreamServer`` watch those beside the TCP fd;
* ``gevent.ssl`` runs OpenSSL on the fd itself: a shared-memory connection
  it wraps escapes to a kernel stream first (:mod:`shrimpio._escape`).

Installed by the patch when gevent's socket module is imported
(:mod:`shrimpio._fdhooks`), whether or not the program monkey-patches.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from . import socket as _ss
from ._fastpath import drain_bell, ring_arm

__all__ = ["install_socket", "install_server", "install_ssl", "uninstall_socket",
           "uninstall_server", "uninstall_ssl"]


class _Native(_ss.socket):
    """The native socket inside a gevent socket: shrimpio's, with the
    C-level ``_accept`` that gevent calls also serving registry clients."""

    __slots__ = ()

    def _accept(self) -> tuple[int, Any]:
        lst = self._lst
        if lst is None:
            return super()._accept()
        got = self._accept_shm(lst)
        if got is not None:
            sock, addr = got
            # gevent wraps the fd in a new socket, which adopts the
            # connection (shrimpio's hand-over: no escape).
            return sock._detach_keep(), addr
        return self._accept_nowait()


def _native(gsock: Any) -> Any:
    """The shrimpio socket of a gevent socket (StreamServer keeps the
    native one itself: that too)."""
    if isinstance(gsock, _ss.socket):
        return gsock
    inner = getattr(gsock, "_sock", None)
    return inner if isinstance(inner, _ss.socket) else None


def install_socket(mod: Any) -> None:
    """Make gevent's socket class (``mod`` is gevent._socket3) shrimpio-aware."""
    cls = mod.socket
    if getattr(cls, "_shrimpio_wait", None) is not None:
        return
    real_wait = cls._wait

    def _wait(self: Any, watcher: Any, timeout_exc: Any = None) -> None:
        inner = _native(self)
        conn = inner._shm if inner is not None else None
        if conn is not None and not conn.closed:
            reading = watcher is self._read_event
            _doorbell_watchers(self, conn)
            watcher = self._read_event if reading else self._write_event
            ring = conn.rx if reading else conn.tx
            try:
                if conn.gone or ring_arm(ring, not reading):
                    return
            except (OSError, ValueError):
                return                 # broken or closed: the call itself raises
            try:
                real_wait(self, watcher, timeout_exc)
            finally:
                if drain_bell(watcher.fd):
                    conn.gone = True
            return
        if inner is not None and inner._lst is not None and watcher is self._read_event:
            _wait_listener(self, inner, timeout_exc)
            return
        real_wait(self, watcher, timeout_exc)

    cls._shrimpio_wait = real_wait
    cls._shrimpio_native = cls._gevent_sock_class
    cls._wait = _wait
    cls._gevent_sock_class = _Native


def uninstall_socket(mod: Any) -> None:
    cls = mod.socket
    real_wait = cls.__dict__.get("_shrimpio_wait")
    if real_wait is not None:
        cls._wait = real_wait
        cls._gevent_sock_class = cls._shrimpio_native
        del cls._shrimpio_wait, cls._shrimpio_native


def _doorbell_watchers(gsock: Any, conn: Any) -> None:
    """Point the gevent socket's watchers at the connection's doorbells
    (once): reads wait on the data doorbell, writes on the space one (both
    also report the peer's death as end of file)."""
    bell, space = conn.bell_fd, conn.space.fileno()
    if gsock._read_event is not None and gsock._read_event.fd == bell:
        return
    io = gsock.hub.loop.io
    for old in (gsock._read_event, gsock._write_event):
        if old is not None:
            old.close()
    gsock._read_event = io(bell, 1)
    gsock._write_event = io(space, 1)


def _wait_listener(gsock: Any, inner: Any, timeout_exc: Any) -> None:
    """accept() on a shrimpio listener: wait until its TCP fd, registry
    socket or a late client's control socket is readable."""
    from gevent import select as gselect
    fds = inner._accept_fds()
    ready, _, _ = gselect.select(fds, [], [], gsock.timeout)
    if not ready:
        import socket as _std
        raise timeout_exc if timeout_exc is not None else _std.timeout("timed out")


# -- StreamServer ----------------------------------------------------------------

#: server -> its extra watchers (registry socket, late clients), by fd.
_extra: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()


def install_server(mod: Any) -> None:
    """Make gevent's servers (``mod`` is gevent.baseserver) watch a shrimpio
    listener's registry socket beside its TCP fd."""
    cls = mod.BaseServer
    if getattr(cls, "_shrimpio_start", None) is not None:
        return
    real_start, real_stop, real_do_read = cls.start_accepting, cls.stop_accepting, cls._do_read

    def start_accepting(self: Any) -> None:
        real_start(self)
        _sync_watchers(self)

    def stop_accepting(self: Any) -> None:
        for w in _extra.pop(self, {}).values():
            w.stop()
            w.close()
        real_stop(self)

    def _do_read(self: Any) -> None:
        real_do_read(self)
        if self._watcher is not None:
            _sync_watchers(self)

    cls._shrimpio_real = (real_start, real_stop, real_do_read)
    cls._shrimpio_start = real_start
    cls.start_accepting = start_accepting
    cls.stop_accepting = stop_accepting
    cls._do_read = _do_read


def uninstall_server(mod: Any) -> None:
    cls = mod.BaseServer
    real = cls.__dict__.get("_shrimpio_real")
    if real is not None:
        cls.start_accepting, cls.stop_accepting, cls._do_read = real
        del cls._shrimpio_real, cls._shrimpio_start


def _sync_watchers(server: Any) -> None:
    """Watch what the listener's accept may take besides its TCP fd: the
    registry socket and the clients whose hello is late (these change)."""
    inner = _native(getattr(server, "socket", None))
    if inner is None or inner._lst is None:
        return
    want = set(inner._accept_fds()) - {inner.fileno()}
    have = _extra.setdefault(server, {})
    for fd in list(have):
        if fd not in want:
            w = have.pop(fd)
            w.stop()
            w.close()
    for fd in want - set(have):
        w = server.loop.io(fd, 1)
        w.start(server._do_read)
        have[fd] = w


# -- gevent.ssl ----------------------------------------------------------------


def install_ssl(mod: Any) -> None:
    """``mod`` is gevent.ssl: its SSLSocket reads and writes the fd in C."""
    cls = mod.SSLSocket
    if "_shrimpio_init" in cls.__dict__:
        return
    real_init = cls.__init__

    def __init__(self: Any, sock: Any = None, *args: Any, **kwargs: Any) -> None:
        inner = _native(sock) if sock is not None else None
        if inner is not None and inner._shm is not None:
            from ._escape import escape
            escape(inner, "TLS by gevent.ssl")
        real_init(self, sock, *args, **kwargs)

    cls._shrimpio_init = real_init
    cls.__init__ = __init__


def uninstall_ssl(mod: Any) -> None:
    cls = mod.SSLSocket
    real_init = cls.__dict__.get("_shrimpio_init")
    if real_init is not None:
        cls.__init__ = real_init
        del cls._shrimpio_init


def installed() -> bool:
    """Has gevent's socket class been made shrimpio-aware in this process?"""
    mod = sys.modules.get("gevent._socket3")
    return mod is not None and getattr(mod.socket, "_shrimpio_wait", None) is not None

