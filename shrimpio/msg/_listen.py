"""Making channels: connect(), listen() and its Listener, Pipe().

Connections are shrimpio sockets, so the socket layer decides the path
(:mod:`shrimpio._route`): shared memory to a listener of this host and
user, kernel TCP otherwise, with the reason recorded
(``channel.info()``).  The Listener serves many senders: its ``recv``
takes messages from every channel it accepted, accepting new ones while it
waits.
"""

from __future__ import annotations

import errno
import socket as _std
import threading
from typing import Any, Optional

from ._base import ANY, Message, Status
from ._channel import Channel, Hub, Request, _iprobe, _poll_any, _post, _probe

__all__ = ["connect", "listen", "Listener", "Pipe", "socket_pair"]


def _sock_class() -> Any:
    from ..socket import socket
    return socket


def _family(address: Any) -> int:
    if isinstance(address, tuple) and len(address) in (2, 4) and isinstance(address[0], str):
        return _std.AF_INET6 if ":" in address[0] else _std.AF_INET
    raise TypeError(f"address must be a (host, port) tuple, not {address!r}")


def listening(sock: Any, address: Any, backlog: int, blocking: bool) -> Any:
    """``sock`` bound to ``address`` and listening (an inet one with
    SO_REUSEADDR, as multiprocessing's listeners); closed if that fails."""
    try:
        if sock.family != _std.AF_UNIX:
            sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEADDR, 1)
        sock.setblocking(blocking)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(address: Any, *, timeout: Optional[float] = None) -> Channel:
    """A channel to the shrimpio.msg listener at ``address`` ((host, port)):
    shared memory if it is on this host, kernel TCP otherwise."""
    sock = _sock_class()(_family(address), _std.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        return Channel(sock)
    except BaseException:
        sock.close()
        raise


def listen(address: Any = ("127.0.0.1", 0), backlog: int = 128) -> "Listener":
    """A :class:`Listener` bound to ``address`` ((host, port); port 0 picks one)."""
    return Listener(address, backlog)


class Listener:
    """Accepts channels at an address, and receives from all of them.

    ``accept()`` returns the next new :class:`Channel`; ``recv``, ``irecv``,
    ``probe``, ``iprobe`` and ``poll`` take messages from every channel
    accepted so far, and accept new ones while waiting (so a server need not
    call ``accept`` at all).  ``Message.source`` is the channel to answer on.
    """

    def __init__(self, address: Any = ("127.0.0.1", 0), backlog: int = 128) -> None:
        sock = listening(_sock_class()(_family(address), _std.SOCK_STREAM), address, backlog,
                         blocking=False)
        self._sock = sock
        self._address = sock.getsockname()
        self._hub = Hub()
        self._hub.listener = self
        self._fresh: list[Channel] = []       # accepted while waiting, not yet returned by accept()
        self._lock = threading.Lock()
        self._tried = 0.0                     # last accept attempt (monotonic)
        self.closed = False

    @property
    def address(self) -> Any:
        """The address clients connect to."""
        return self._address

    @property
    def channels(self) -> list[Channel]:
        """The live channels accepted so far."""
        return [c for c in self._hub.channels if not c.closed]

    def fileno(self) -> int:
        return self._sock.fileno()

    def _accept_ready(self) -> bool:
        """Accept every client waiting (the hub's lock is held)."""
        if self.closed:
            return False
        self._sweep()
        did = False
        while True:
            try:
                s, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return did
            except OSError:
                if self.closed:
                    return did
                raise
            s.setblocking(True)
            try:
                ch = Channel(s, self._hub)
            except OSError:
                s.close()
                continue
            self._fresh.append(ch)
            did = True

    def _sweep(self) -> None:
        """Let go of channels that ended and have nothing left to receive."""
        hub = self._hub
        dead = [c for c in hub.channels if c._dead_error() is not None]
        if not dead:
            return
        queued = {id(a.chan) for a in hub.queue}
        for c in dead:
            if id(c) not in queued and c not in self._fresh:
                hub.channels.remove(c)
                c._teardown()
                c._closed = True

    def accept(self, timeout: Optional[float] = None) -> Channel:
        """The next channel a client opened (``TimeoutError`` after ``timeout``)."""
        import time
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._hub.lock:
                self._accept_ready()
                if self._fresh:
                    return self._fresh.pop(0)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            from .. import _poll
            p = _poll.poll()
            p.register(self._sock.fileno(), _poll.POLLIN)
            p.poll(None if left is None else left * 1000.0)

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "the listener is closed")

    def irecv(self, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Request:
        """As :meth:`Channel.irecv`, from any channel of this listener."""
        self._check_open()
        return _post(self._hub, self, tag, source, into)

    def recv(self, tag: Any = ANY, source: Any = ANY, *, timeout: Optional[float] = None) -> Message:
        """The next matching message from any (or ``source``'s) channel."""
        return self.irecv(tag, source).wait(timeout)

    def recv_into(self, buf: Any, tag: Any = ANY, source: Any = ANY, *,
                  timeout: Optional[float] = None) -> Message:
        return self.irecv(tag, source, into=buf).wait(timeout)

    async def arecv(self, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Message:
        """Awaitable ``recv`` on the running loop."""
        from ._aio import arecv
        self._check_open()
        return await arecv(self, tag, source, into=into)

    async def aprobe(self, tag: Any = ANY, source: Any = ANY) -> Status:
        """Awaitable ``probe``."""
        from ._aio import aprobe
        self._check_open()
        return await aprobe(self, tag, source)

    def iprobe(self, tag: Any = ANY, source: Any = ANY) -> Optional[Status]:
        self._check_open()
        return _iprobe(self._hub, self, tag, source)

    def probe(self, tag: Any = ANY, source: Any = ANY, *, timeout: Optional[float] = None) -> Status:
        self._check_open()
        return _probe(self._hub, self, tag, source, timeout)

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        self._check_open()
        return _poll_any(self._hub, None, timeout)

    def close(self) -> None:
        """Stop listening and close every channel accepted."""
        if self.closed:
            return
        with self._hub.lock:
            self.closed = True
            chans = list(self._hub.channels)
            self._fresh.clear()
        self._sock.close()
        for c in chans:
            c.close()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shrimpio.msg.Listener {'closed' if self.closed else self.address}>"


def socket_pair() -> tuple[Any, Any]:
    """Two connected shrimpio sockets (shared memory unless shrimpio is
    disabled), through a listener of this process on a loopback port."""
    cls = _sock_class()
    lst = cls(_std.AF_INET, _std.SOCK_STREAM)
    a = b = None
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = cls(_std.AF_INET, _std.SOCK_STREAM)
        a.connect(lst.getsockname())
        lst.settimeout(10.0)
        b, _ = lst.accept()
        b.setblocking(True)
        return a, b
    except BaseException:
        if a is not None:
            a.close()
        raise
    finally:
        lst.close()


def Pipe(duplex: bool = True) -> tuple[Any, Any]:
    """Two connected channels for a parent and the child it forks, as
    ``multiprocessing.Pipe``: :class:`~shrimpio.msg.Connection` objects
    (the tagged API of :class:`Channel`, ``recv()`` returning the object
    alone); ``duplex=False`` gives (receive-only, send-only)."""
    from ._mpc import Connection
    a, b = socket_pair()
    try:
        if duplex:
            return Connection(a), Connection(b)
        return Connection(a, writable=False), Connection(b, readable=False)
    except BaseException:
        a.close()
        b.close()
        raise
