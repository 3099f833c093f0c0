"""The listening side of shrimpio's socket: ``listen()`` and ``accept()``.

A shrimpio listener is a kernel TCP listening socket (for remote and
unpatched clients) plus, when the route allows, a registry entry for
shrimpio clients of this host (:class:`shrimpio._accept.Listener`).
``accept()`` serves both: it takes a shared-memory client whose hello is
there (:func:`shrimpio._accept.accept_shm`), else a pending TCP client,
else it busy-polls both fds for an adaptive budget and then sleeps in the
kernel's ``poll`` on them and on the fds of clients whose hello is late.
Listeners still open at exit take their registry entries with them.
"""

from __future__ import annotations

import errno
import os
import select as _select
import _socket as _csocket
import socket as _std
import threading
import time
import weakref
from typing import Any

from . import _accept, _connection, _control, _handshake, _route, _stat
from ._accept import Listener as _Listener
from ._fastpath import spin_readable
from ._sockindex import by_fd, ebadf as _ebadf, fd_change_hooks, fd_changing

StdSocket = _std.socket
#: The kernel's poll, whatever the patch does to select.poll: shrimpio's own
#: waits watch kernel fds only (the patched poller would treat a listener's
#: own fd as a listener again, and accept ahead for it).
_real_poll = _select.poll
_registry = _handshake.registry


def listen(lsock: Any, backlog: int) -> None:
    """After the kernel's ``listen()``: a TCP listener also registers in the
    registry for shrimpio clients of this host (when the route allows)."""
    if lsock._lst is not None or not lsock._is_tcp():
        return
    host, port = StdSocket.getsockname(lsock)[:2]
    route = _route.class_rule(lsock) or _route.listener_allowed(host, port)
    if route.path != _route.SHM:
        lsock._route = route
        return
    v6only = lsock.family == _std.AF_INET6 and _handshake.unspecified(host) \
        and bool(StdSocket.getsockopt(lsock, _std.IPPROTO_IPV6, _std.IPV6_V6ONLY))
    name = _route.entry_name(lsock.family, host, port, v6only)
    try:
        name, usock = _accept.register_listener(lsock, name, max(backlog, 128) if backlog >= 0 else 128)
    except FileExistsError as exc:
        lsock._route = _route.Route(_route.TCP, str(exc.args[0]))
        return
    except (OSError, ValueError) as exc:
        # The TCP listener is up; a registry we cannot use (entry path
        # longer than a Unix socket address, bad permissions...) only
        # costs the fast path: listen() must not fail for it.
        lsock._route = _route.Route(_route.TCP, f"registry unusable: {exc}")
        return
    usock.setblocking(False)
    # (The TCP listener's fd keeps the blocking mode its timeout gives
    # it, as the stdlib's: see accept_nowait.)
    lsock._lst = _Listener(name, usock)
    by_fd[lsock.fileno()] = lsock
    listening(lsock._lst)
    if fd_change_hooks:
        fd_changing(lsock.fileno())          # (registered in an epoll before listen)


def adopt_listener(lsock: Any, name: str, usock_fd: int) -> None:
    """This kernel listening socket came from another process with its
    registry socket (see _mpconn): share that entry's queue of clients."""
    usock = _csocket.socket(_std.AF_UNIX, _std.SOCK_SEQPACKET, 0, usock_fd)
    usock.setblocking(False)
    os.set_blocking(lsock.fileno(), False)
    lsock._lst = _Listener(name, usock)
    lsock._lst.share_with_others()     # see _accept.Listener.close
    lsock._route = None
    by_fd[lsock.fileno()] = lsock
    listening(lsock._lst)


def accept(lsock: Any) -> tuple[Any, Any]:
    """As ``socket.accept``; serves TCP and shared-memory clients."""
    lst = lsock._lst
    if lst is None:
        fd, addr = lsock._accept()
        sock = lsock._kernel_accepted(fd, addr)
        if _std.getdefaulttimeout() is None and lsock.gettimeout():
            sock.setblocking(True)
        return sock, addr
    timeout = lsock.gettimeout()
    deadline = None if not timeout else time.monotonic() + timeout
    poller = watched = None
    spin_from = -1.0      # when the busy-poll phase began (-1: not yet)
    spun = False
    lfd, ufd = lsock.fileno(), lst.usock.fileno()
    while True:
        got = None
        if spin_from >= 0 or lst.ready or lst.waiting or timeout == 0 \
                or spin_readable((lfd, ufd), 0.0):
            # (Else nobody is there, as a server that keeps up with its
            # clients finds most of the time: on to the wait, without an
            # accept attempt of each kind, a system call and an exception.)
            got = lsock._accept_shm(lst)
            if got is None:
                try:
                    fd, addr = lsock._accept_nowait()
                except (BlockingIOError, InterruptedError):
                    pass
                else:
                    sock = lsock._kernel_accepted(fd, addr)
                    if _std.getdefaulttimeout() is None:
                        sock.setblocking(True)
                    got = sock, addr
        if got is not None:
            if spin_from >= 0:
                lst.adapt(spun, time.monotonic() - spin_from)
            return got
        if timeout == 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        if spin_from < 0:
            # Busy-poll first (as a ring reader does): a client that
            # connects soon is then served without our being put to
            # sleep and woken up, which costs both sides more than the
            # connection itself.  The budget adapts (see _Listener).
            # Closed connections' unmapping waited for this moment.
            _connection.reap()
            spin_from = time.monotonic()
            budget = lst.spin_budget()
            if deadline is not None:
                budget = min(budget, max(0.0, deadline - spin_from))
            if budget > 0 and spin_readable((lsock.fileno(), lst.usock.fileno()), budget):
                spun = True
                continue
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        if wait_ms == 0:
            raise TimeoutError("timed out")
        # Clients whose hello is late are watched too, until their time
        # is up (the next accept attempt then drops them).
        fds = lsock._accept_fds()
        first = lst.next_deadline()
        if first is not None:
            left = max(0, int((first - time.monotonic()) * 1000) + 1)
            wait_ms = left if wait_ms is None else min(wait_ms, left)
        if poller is None or fds != watched:
            poller, watched = _real_poll(), fds
            for fd in fds:
                poller.register(fd, _select.POLLIN)
        poller.poll(wait_ms)
        if lsock.fileno() < 0 or lsock._lst is None:
            raise _ebadf()


def kernel_accepted(lsock: Any, fd: int, addr: Any) -> Any:
    """The socket object for a connection accepted by the kernel, with
    its reason: the listener's own (disabled, ruled out, no registry) if
    it offered no shared memory, else the client's not being shrimpio."""
    sock = type(lsock)(lsock.family, lsock.type, lsock.proto, fileno=fd)
    if lsock._is_tcp():
        if lsock._lst is None and lsock._route is not None and lsock._route.path == _route.TCP:
            sock._route = lsock._route
        else:
            # (A client this listener sent to TCP says why: see _accept.refuse.)
            late = _accept.late_reason(lsock.family, addr) if _accept.late_clients else None
            sock._route = _route.Route(_route.TCP, late or "peer is not shrimpio")
        sock._peer = addr
        _stat.track_tcp(sock, sock._route.reason)
    return sock


def accept_nowait(lsock: Any) -> tuple[int, Any]:
    """Accept a pending TCP connection, or raise BlockingIOError at once.
    (``_accept`` on this object would first wait up to its timeout for
    the TCP side, while shared-memory clients queue unseen.)

    A listener's fd has the blocking mode the stdlib gives it (blocking
    without a timeout, as ``fcntl`` shows).  A blocking one is asked
    first whether a client is there (one ``poll``) and accepted under
    the listener's lock, so no thread of ours takes that client in
    between; one shared with other processes (a fork, a listener
    pickled for multiprocessing), any of which could take it, is made
    non-blocking instead, and stays so."""
    lst = lsock._lst
    if lst is not None and lsock.gettimeout() is None and not lst.shared:
        with tcp_accept_lock(lst):
            if not spin_readable((lsock.fileno(),), 0.0):
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            return _csocket.socket._accept(lsock)
    tmp = _csocket.socket(lsock.family, lsock.type, lsock.proto, lsock.fileno())
    try:
        tmp.settimeout(0.0)
        return tmp._accept()
    except OSError as exc:
        # (The kernel takes an fd before it looks for a client: out of fds,
        # EMFILE although nobody waits, maybe while a shared-memory client
        # holds our last fd until its hello comes; see _accept.refuse.)
        if exc.errno in (errno.EMFILE, errno.ENFILE) and not spin_readable((lsock.fileno(),), 0.0):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable") from None
        raise
    finally:
        tmp.detach()


# Listeners of this process with a registry entry, so that the entries go
# when the process exits without closing them (and, once per process, the
# stale entries of listeners that died go when one starts listening).
_listeners: "weakref.WeakSet[_Listener]" = weakref.WeakSet()
_listen_hooked = 0          # the pid that hooked its exit and swept


_tcp_locks: "weakref.WeakKeyDictionary[_Listener, threading.Lock]" = weakref.WeakKeyDictionary()
_tcp_locks_lock = threading.Lock()


def tcp_accept_lock(lst: _Listener) -> threading.Lock:
    """The lock of a listener's TCP accepts (see accept_nowait)."""
    lock = _tcp_locks.get(lst)
    if lock is None:
        with _tcp_locks_lock:
            lock = _tcp_locks.setdefault(lst, threading.Lock())
    return lock


def listening(lst: _Listener) -> None:
    global _listen_hooked
    _listeners.add(lst)
    if _listen_hooked == os.getpid():
        return
    _listen_hooked = os.getpid()
    _control.on_exit(close_listeners)
    try:
        _registry().sweep()
    except OSError:
        pass


def close_listeners() -> None:
    """At exit: the registry entries of listeners still open go (a forked
    child's copy of a listener removes the entry only if nobody else
    listens there, see _accept.Listener.close)."""
    for lst in list(_listeners):
        try:
            lst.close()
        except OSError:
            pass
