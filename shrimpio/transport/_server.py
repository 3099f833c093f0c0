"""The shrimpio loop's servers: shrimpio listener sockets, both kinds of client.

A server listens with shrimpio listener sockets; uvloop would serve only
their TCP side, so this server accepts both itself: shared-memory clients
from each listener's registry socket (and those whose hello is late), TCP
clients from its kernel socket.  Every accepted connection is then a
shrimpio socket that knows its path and why; shared-memory ones get a
``ShmTransport``, TCP ones uvloop's transport (``_fallback``).
"""

from __future__ import annotations

import asyncio
import errno
import time
from asyncio import trsock
from typing import Any, Callable, Optional

import uvloop

__all__ = ["Server"]

_ACCEPT_RETRY_DELAY = 1.0
#: accept() errors that say "out of a resource, try later" (asyncio's list).
_OUT_OF_RESOURCE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# The server's own readers (not callbacks of the program: see _watch).
_add_reader = uvloop.Loop.add_reader
_remove_reader = uvloop.Loop.remove_reader


class Server(asyncio.AbstractServer):
    """A server on shrimpio listener sockets: their registry sockets for
    shared-memory clients, their kernel sockets for TCP clients.  Both are
    accepted here, so that every connection is a shrimpio socket that knows
    its path and why; TCP ones are then driven by uvloop's transports
    (:mod:`._fallback`)."""

    def __init__(self, loop: Any, listeners: list, factory: Callable, ssl: Any,
                 ssl_handshake_timeout: Any, ssl_shutdown_timeout: Any, backlog: int = 100) -> None:
        self._loop = loop
        self._backlog = backlog
        self._listeners = listeners
        self._factory = factory
        self._ssl = ssl
        self._hs_timeout = ssl_handshake_timeout
        self._sd_timeout = ssl_shutdown_timeout
        self._retry: Optional[asyncio.TimerHandle] = None
        self._serving = False
        self._watching = False        # readers on the listeners are installed
        # Shared-memory clients whose hello is late (see _accept.Listener):
        # fd -> its listener, watched until the hello comes or time runs out.
        self._late: dict[int, Any] = {}
        self._late_timer: Optional[asyncio.TimerHandle] = None
        self._closed = False
        self._active = 0
        self._waiters: list = []
        self._serving_forever: Optional[asyncio.Future] = None

    def _attach(self) -> None:
        self._active += 1

    def _detach(self) -> None:
        self._active -= 1
        if self._active == 0 and self._closed:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple:
        return tuple(trsock.TransportSocket(s) for s in self._listeners if s.fileno() >= 0)

    async def start_serving(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        # As uvloop and asyncio, a server made with start_serving=False is
        # bound but not listening: connections are refused until it serves
        # (listen() also publishes the registry entry; a no-op repeat for a
        # listener passed as sock=).
        for lsock in self._listeners:
            lsock.listen(self._backlog)
        self._watch()

    def _watch(self) -> None:
        self._retry = None
        for lsock in self._listeners:
            _add_reader(self._loop, lsock.fileno(), self._accept_tcp, lsock)
            if lsock._lst is not None:
                _add_reader(self._loop, lsock._lst.usock.fileno(), self._accept_shm, lsock)
        self._watching = True

    def _unwatch(self) -> None:
        self._unwatch_late()
        if not self._watching:
            return
        self._watching = False
        for lsock in self._listeners:
            if lsock.fileno() >= 0:
                _remove_reader(self._loop, lsock.fileno())
            if lsock._lst is not None:
                _remove_reader(self._loop, lsock._lst.usock.fileno())

    def _accept_tcp(self, lsock: Any) -> None:
        for i in range(self._backlog):
            try:
                fd, addr = lsock._accept_nowait()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # (The kernel's accept takes an fd before it looks for a
                # client: having just taken the last fd for one, it says
                # EMFILE although nobody may be waiting.  Then the listener
                # says whether someone is, on the next turn, as uvloop's.)
                if exc.errno in _OUT_OF_RESOURCE and i == 0:
                    self._pause(lsock, exc)
                return                       # ECONNABORTED and the like: the next one
            sock = lsock._kernel_accepted(fd, addr)
            self._loop.create_task(self._loop._serve_tcp(sock, self._factory, self._ssl, self,
                                                          self._hs_timeout, self._sd_timeout))

    def _accept_shm(self, lsock: Any) -> None:
        # The late clients' readers go first: accepting may close their fds.
        self._unwatch_late()
        try:
            for i in range(64):
                lst = lsock._lst
                if lst is None:
                    return
                try:
                    got = lsock._accept_shm(lst)
                except OSError as exc:
                    if exc.errno in _OUT_OF_RESOURCE and i == 0:
                        # The client waits (in the registry's backlog, or
                        # parked with its hello unread), as TCP's would.
                        self._pause(lsock, exc)
                    elif exc.errno not in _OUT_OF_RESOURCE:    # (see _accept_tcp)
                        self._loop.call_exception_handler({"message": "shrimpio accept failed",
                                                           "exception": exc})
                    return
                if got is None:
                    return
                conn, _addr = got
                conn.setblocking(False)
                self._loop._serve_shm(conn, self._factory, self._ssl, self, self._hs_timeout,
                                      self._sd_timeout)
        finally:
            if self._watching:
                self._watch_late()

    def _pause(self, lsock: Any, exc: OSError) -> None:
        """Out of a resource (fds, memory): as asyncio, say so and stop
        accepting for a second, rather than spin on a listener (or a
        waiting client) that stays readable."""
        self._loop.call_exception_handler({
            "message": "socket.accept() out of system resource", "exception": exc,
            "socket": trsock.TransportSocket(lsock)})
        self._unwatch()
        if self._retry is None:
            self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._closed:
            return
        self._watch()
        # A client already taken from the registry waits parked: its
        # hello is not news to the registry socket's reader.
        for lsock in self._listeners:
            if lsock._lst is not None and self._watching:
                self._accept_shm(lsock)

    def _watch_late(self) -> None:
        """Readers on the clients whose hello is late, and a timer for the
        first one's time running out (an accept then drops it)."""
        first = None
        for lsock in self._listeners:
            lst = lsock._lst
            if lst is None or not lst.waiting:
                continue
            for fd in lst.waiting:
                self._late[fd] = lsock
                _add_reader(self._loop, fd, self._accept_shm, lsock)
            d = lst.next_deadline()
            if d is not None and (first is None or d < first[0]):
                first = (d, lsock)
        if first is not None:
            delay = max(0.0, first[0] - time.monotonic()) + 0.001
            self._late_timer = self._loop.call_later(delay, self._accept_shm, first[1])

    def _unwatch_late(self) -> None:
        for fd in self._late:
            _remove_reader(self._loop, fd)
        self._late.clear()
        if self._late_timer is not None:
            self._late_timer.cancel()
            self._late_timer = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._serving = False
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for lsock in self._listeners:
            lsock.close()
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
        if self._active == 0:
            self._wake()

    async def wait_closed(self) -> None:
        # As uvloop's Server (and asyncio's before 3.12): called after
        # close(), return at once, active connections or not; called before,
        # wait for close() and then for the last connection.  (Waiting for
        # shared-memory connections only would make a server that uvloop
        # closes at once hang on its keep-alive clients.)
        if self._closed:
            return
        w = self._loop.create_future()
        self._waiters.append(w)
        await w

    async def serve_forever(self) -> None:
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        await self.start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()
