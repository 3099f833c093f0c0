"""The connection factory and helpers the conformance tests run on.

``Net(kind)`` makes listeners, clients and connected pairs of one *kind*:

* ``"stdlib"``: ``socket.socket`` of the standard library, ``shrimpio.patch``
  disabled;
* ``"shm"``: ``shrimpio.socket.socket`` at both ends, patch enabled; every
  pair is checked to really run over shared memory;
* ``"tcp_fallback"``: shrimpio sockets at both ends, patch enabled, but each
  listening port is put under a ``shrimpio._route.add_tcp_rule`` so the
  connection falls back to kernel TCP (checked: path ``"tcp"`` and a reason).

Everything a ``Net`` makes (sockets, forked children) is cleaned up by
``Net.close()``, so a failing test does not leak into the next one.
"""

from __future__ import annotations

import os
import random
import select
import selectors
import signal
import socket
import time
import traceback
from typing import Any, Callable, Optional

import shrimpio.socket as ss
from shrimpio import _route

from conftest import wait_for
from result_thread import ResultThread

KINDS = ("stdlib", "shm", "tcp_fallback")
StdSocket = ss.StdSocket

#: How long a "ready" wait may take before the test fails (it returns as soon as ready).
READY = 5.0
#: How long a "must not be ready / must block" check waits.
QUIET = 0.05


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with StdSocket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class Net:
    """Factory of sockets of one kind; tracks everything for cleanup."""

    def __init__(self, kind: str) -> None:
        assert kind in KINDS
        self.kind = kind
        self.cls = StdSocket if kind == "stdlib" else ss.socket
        self._socks: list[Any] = []
        self._children: list[int] = []

    # -- sockets -------------------------------------------------------------

    def track(self, sock: Any) -> Any:
        self._socks.append(sock)
        return sock

    def socket(self, family: int = socket.AF_INET) -> Any:
        """A fresh, unconnected stream socket of this kind."""
        return self.track(self.cls(family, socket.SOCK_STREAM))

    def served(self, port: int) -> None:
        """Called for every listening port: tcp_fallback keeps it on TCP."""
        if self.kind == "tcp_fallback":
            _route.add_tcp_rule(str(port))

    def listener(self, host: str = "127.0.0.1", backlog: int = 16,
                 opts: tuple = ()) -> Any:
        """A listening socket on ``(host, ephemeral port)``; ``opts`` are
        ``(level, name, value)`` set before bind."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lst = self.socket(family)
        for level, name, value in opts:
            lst.setsockopt(level, name, value)
        lst.bind((host, 0))
        self.served(lst.getsockname()[1])
        lst.listen(backlog)
        return lst

    def create_server(self, address: tuple, **kw: Any) -> Any:
        """``socket.create_server`` (the module global: shrimpio's when patched)."""
        srv = self.track(socket.create_server(address, **kw))
        self.served(srv.getsockname()[1])
        return srv

    def connect(self, address: tuple, opts: tuple = ()) -> Any:
        """A client of this kind connected to ``address``."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        cli = self.socket(family)
        for level, name, value in opts:
            cli.setsockopt(level, name, value)
        cli.connect(address)
        return cli

    def accept(self, lst: Any) -> tuple[Any, Any]:
        conn, addr = lst.accept()
        self.track(conn)
        return conn, addr

    def pair(self, host: str = "127.0.0.1", opts: tuple = ()) -> tuple[Any, Any]:
        """A connected ``(client, server)`` pair; the listener is closed."""
        lst = self.listener(host, opts=opts)
        cli = self.connect(lst.getsockname()[:2], opts=opts)
        srv, _ = self.accept(lst)
        lst.close()
        self.check_path(cli, srv)
        return cli, srv

    def check_path(self, *socks: Any) -> None:
        """The connection really is of this kind."""
        for sock in socks:
            if self.kind == "stdlib":
                assert type(sock) is StdSocket, sock
                continue
            assert isinstance(sock, ss.socket), sock
            got = ss.info(sock)
            if self.kind == "shm":
                assert got["path"] == "shm", got
            else:
                assert got["path"] == "tcp", got
                assert got["reason"], got

    # -- processes -----------------------------------------------------------

    def fork(self, child: Callable[[], Optional[int]]) -> int:
        """Run ``child()`` in a forked process; its return value (or 1 on an
        exception) is the exit status.  The child never returns into pytest."""
        pid = os.fork()
        if pid == 0:                                   # pragma: no cover - child
            code = 1
            try:
                code = child() or 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self._children.append(pid)
        return pid

    def reap(self, pid: int, timeout: float = 15.0) -> int:
        """Wait (with a deadline) for a child; return its wait status."""
        def done() -> Optional[int]:
            got, status = os.waitpid(pid, os.WNOHANG)
            return (status,) if got == pid else None
        status = wait_for(done, timeout=timeout, what=f"child {pid} to exit")[0]
        self._children.remove(pid)
        return status

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.reap(pid)

    # -- cleanup -------------------------------------------------------------

    def close(self) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        self._children.clear()
        for sock in self._socks:
            sock.close()
        self._socks.clear()


# -- threads ------------------------------------------------------------------


class Worker(ResultThread):
    """A ``ResultThread`` started at once, whose ``result()`` waits 20 s."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(fn, *args, deadline=20.0)
        self.start()


def recv_exactly(sock: Any, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(n - got, 1 << 20))
        assert data, f"EOF after {got} of {n} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_until_eof(sock: Any) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes (reordered, duplicated or
    lost chunks are detected by comparing)."""
    return random.Random(seed).randbytes(n)


# -- pollers --------------------------------------------------------------------

#: The readiness APIs every poller test runs with ...
POLLERS = ("select", "poll", "epoll", "DefaultSelector")
#: ... and, for the core ones, also the selectors whose bound pollers
#: shrimpio.patch replaces.
ALL_POLLERS = POLLERS + ("PollSelector", "SelectSelector")


class Poller:
    """One readiness API, looked up at call time (so the patched one is used
    for shrimpio kinds), behind a uniform face:
    ``register(sock, read, write)`` then ``poll(timeout) -> {sock: (r, w)}``.
    The underlying object persists across polls, as in real event loops."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._socks: dict[int, tuple[Any, bool, bool]] = {}
        self._obj: Any = None
        if name == "poll":
            self._obj = select.poll()
        elif name == "epoll":
            self._obj = select.epoll()
        elif name != "select":
            self._obj = getattr(selectors, name)()

    def register(self, sock: Any, read: bool = True, write: bool = False) -> None:
        self._socks[sock.fileno()] = (sock, read, write)
        if self.name == "poll":
            self._obj.register(sock, (select.POLLIN if read else 0) | (select.POLLOUT if write else 0))
        elif self.name == "epoll":
            self._obj.register(sock, (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0))
        elif self.name != "select":
            self._obj.register(sock, (selectors.EVENT_READ if read else 0)
                               | (selectors.EVENT_WRITE if write else 0))

    def poll(self, timeout: Optional[float]) -> dict[Any, tuple[bool, bool]]:
        out: dict[Any, tuple[bool, bool]] = {}
        if self.name == "select":
            rl = [s for s, r, _ in self._socks.values() if r]
            wl = [s for s, _, w in self._socks.values() if w]
            r, w, _ = select.select(rl, wl, [], timeout)
            for s in set(r) | set(w):
                out[s] = (s in r, s in w)
        elif self.name in ("poll", "epoll"):
            if self.name == "poll":
                events = self._obj.poll(None if timeout is None else timeout * 1000)
                rbit, wbit = select.POLLIN, select.POLLOUT
            else:
                events = self._obj.poll(-1 if timeout is None else timeout)
                rbit, wbit = select.EPOLLIN, select.EPOLLOUT
            for fd, ev in events:
                sock, _, _ = self._socks[fd]
                out[sock] = (bool(ev & rbit), bool(ev & wbit))
        else:
            for key, ev in self._obj.select(timeout):
                out[key.fileobj] = (bool(ev & selectors.EVENT_READ), bool(ev & selectors.EVENT_WRITE))
        return out

    def readable(self, sock: Any, timeout: float) -> bool:
        return self.poll(timeout).get(sock, (False, False))[0]

    def writable(self, sock: Any, timeout: float) -> bool:
        return self.poll(timeout).get(sock, (False, False))[1]

    def close(self) -> None:
        if self._obj is not None and hasattr(self._obj, "close"):
            self._obj.close()

    def __enter__(self) -> "Poller":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def elapsed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    value = fn()
    return value, time.monotonic() - t0
