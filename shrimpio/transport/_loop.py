"""The shrimpio event loop: uvloop, plus shared-memory connections.

``Loop`` subclasses ``uvloop.Loop``.  Where a connection can go over shared
memory (the decision is :mod:`shrimpio._route`'s, made by the socket layer's
connect), it builds a :class:`ShmTransport`; everything else is uvloop's
own, unchanged.  A server listens with a shrimpio listener socket: uvloop
serves its TCP side, and the loop watches its registry socket for
shared-memory clients.
"""

from __future__ import annotations

import asyncio
import os
import errno
import socket as _std
import sys
import time
import warnings
from asyncio import sslproto, trsock
from typing import Any, Awaitable, Callable, Optional

import uvloop

from ..socket import socket as ShmSocket
from . import _fallback
from ._transport import ShmTransport

__all__ = ["Loop", "new_event_loop", "run", "EventLoopPolicy", "install"]


#: create_connection keywords the shrimpio path handles; with others
#: (happy_eyeballs_delay, interleave...) uvloop connects on its own.
_OUR_KW = {"ssl_handshake_timeout", "ssl_shutdown_timeout"}
_ACCEPT_RETRY_DELAY = 1.0


def _is_shm(sock: Any) -> bool:
    return isinstance(sock, ShmSocket) and sock._shm is not None


class _Server(asyncio.AbstractServer):
    """A server on shrimpio listener sockets: their registry sockets for
    shared-memory clients, their kernel sockets for TCP clients.  Both are
    accepted here, so that every connection is a shrimpio socket that knows
    its path and why; TCP ones are then driven by uvloop's transports
    (:mod:`._fallback`)."""

    def __init__(self, loop: "Loop", listeners: list, factory: Callable, ssl: Any,
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
            self._loop.add_reader(lsock.fileno(), self._accept_tcp, lsock)
            if lsock._lst is not None:
                self._loop.add_reader(lsock._lst.usock.fileno(), self._accept_shm, lsock)
        self._watching = True

    def _unwatch(self) -> None:
        self._unwatch_late()
        if not self._watching:
            return
        self._watching = False
        for lsock in self._listeners:
            if lsock.fileno() >= 0:
                self._loop.remove_reader(lsock.fileno())
            if lsock._lst is not None:
                self._loop.remove_reader(lsock._lst.usock.fileno())

    def _accept_tcp(self, lsock: Any) -> None:
        for _ in range(self._backlog):
            try:
                fd, addr = lsock._accept_nowait()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of a resource: as asyncio, stop accepting for a
                    # second rather than spin on a listener that stays readable.
                    self._loop.call_exception_handler({
                        "message": "socket.accept() out of system resource", "exception": exc,
                        "socket": trsock.TransportSocket(lsock)})
                    self._unwatch()
                    self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._watch)
                return                       # ECONNABORTED and the like: the next one
            sock = lsock._kernel_accepted(fd, addr)
            self._loop.create_task(self._loop._serve_tcp(sock, self._factory, self._ssl, self,
                                                          self._hs_timeout, self._sd_timeout))

    def _accept_shm(self, lsock: Any) -> None:
        # The late clients' readers go first: accepting may close their fds.
        self._unwatch_late()
        try:
            for _ in range(64):
                lst = lsock._lst
                if lst is None:
                    return
                try:
                    got = lsock._accept_shm(lst)
                except OSError as exc:
                    self._loop.call_exception_handler({"message": "shrimpio accept failed",
                                                       "exception": exc})
                    return
                if got is None:
                    return
                conn, _addr = got
                conn.setblocking(False)
                self._loop.create_task(self._loop._serve_shm(conn, self._factory, self._ssl, self,
                                                              self._hs_timeout, self._sd_timeout))
        finally:
            if self._watching:
                self._watch_late()

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
                self._loop.add_reader(fd, self._accept_shm, lsock)
            d = lst.next_deadline()
            if d is not None and (first is None or d < first[0]):
                first = (d, lsock)
        if first is not None:
            delay = max(0.0, first[0] - time.monotonic()) + 0.001
            self._late_timer = self._loop.call_later(delay, self._accept_shm, first[1])

    def _unwatch_late(self) -> None:
        for fd in self._late:
            self._loop.remove_reader(fd)
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

    async def __aenter__(self) -> "_Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()


class Loop(uvloop.Loop):
    """``uvloop.Loop`` that runs shrimpio connections over shared memory."""

    # -- building transports ----------------------------------------------

    async def _set_up_accepted(self, setup: Awaitable, message: str,
                               cleanup: Optional[Callable[[], Any]] = None) -> None:
        """Await an accepted connection's setup.  A failure (a TLS handshake
        that failed, a client gone at once) concerns that connection only:
        it is closed and, in debug mode, reported, as uvloop does."""
        try:
            await setup
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if cleanup is not None:
                cleanup()
            if self.get_debug():
                self.call_exception_handler({"message": message, "exception": exc})

    async def _serve_shm(self, sock: Any, factory: Callable, ssl: Any, server: Any,
                         hs_timeout: Any, sd_timeout: Any) -> None:
        await self._set_up_accepted(
            self._make_shm_transport(sock, factory, ssl, server_side=True, server=server,
                                     ssl_handshake_timeout=hs_timeout, ssl_shutdown_timeout=sd_timeout),
            "shrimpio connection setup failed")

    async def _make_shm_transport(self, sock: Any, factory: Callable, ssl: Any = None, *,
                                  server_side: bool = False, server_hostname: Optional[str] = None,
                                  server: Any = None, ssl_handshake_timeout: Any = None,
                                  ssl_shutdown_timeout: Any = None) -> tuple:
        protocol = factory()
        waiter = self.create_future()
        if ssl:
            sslcontext = ssl if not isinstance(ssl, bool) else None
            if sslcontext is None:
                import ssl as _ssl
                sslcontext = _ssl.create_default_context()
            ssl_protocol = sslproto.SSLProtocol(
                self, protocol, sslcontext, waiter, server_side, server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
            transport = ShmTransport(self, sock, ssl_protocol, None, server)
        else:
            transport = ShmTransport(self, sock, protocol, waiter, server)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if ssl:
            return ssl_protocol._app_transport, protocol
        return transport, protocol

    async def _serve_tcp(self, sock: Any, factory: Callable, ssl: Any, server: Any,
                         hs_timeout: Any, sd_timeout: Any) -> None:
        server._attach()
        handed = _fallback.handoff(sock, server._detach)
        await self._set_up_accepted(
            super().connect_accepted_socket(factory, handed, ssl=ssl, ssl_handshake_timeout=hs_timeout,
                                            ssl_shutdown_timeout=sd_timeout),
            "TCP connection setup failed", handed.close)

    # -- client side ---------------------------------------------------------

    async def create_connection(self, protocol_factory: Callable, host: Any = None, port: Any = None,
                                *, ssl: Any = None, family: int = 0, proto: int = 0, flags: int = 0,
                                sock: Any = None, local_addr: Any = None,
                                server_hostname: Optional[str] = None, **kw: Any) -> tuple:
        # uvloop's argument checks, made first: the shared-memory path must
        # refuse what uvloop refuses (a missing server_hostname would
        # otherwise leave the TLS handshake waiting forever).
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl and not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        _check_ssl_timeouts(ssl, kw)
        if sock is not None and (host is not None or port is not None):
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock is None and host is not None and port is not None and not set(kw) - _OUR_KW:
            sock = await self._connect(host, port, family, proto, flags, local_addr)
            hostname = server_hostname or (host if ssl else None)
            if sock is None:
                pass                 # unresolvable: uvloop raises its own error below
            elif sock._shm is not None:
                return await self._make_shm_transport(
                    sock, protocol_factory, ssl, server_hostname=hostname,
                    ssl_handshake_timeout=kw.get("ssl_handshake_timeout"),
                    ssl_shutdown_timeout=kw.get("ssl_shutdown_timeout"))
            else:
                # Kernel TCP: uvloop's transport on a socket we own (see _fallback).
                handed = _fallback.handoff(sock)
                try:
                    return await super().create_connection(
                        protocol_factory, ssl=ssl, sock=handed, server_hostname=hostname, **kw)
                except BaseException:
                    handed.close()
                    raise
        elif sock is not None and (_is_shm(sock) or _adoptable(sock)):
            if not isinstance(sock, ShmSocket):     # a stdlib socket connected by sock_connect
                sock = ShmSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            sock.setblocking(False)
            return await self._make_shm_transport(
                sock, protocol_factory, ssl, server_hostname=server_hostname,
                ssl_handshake_timeout=kw.get("ssl_handshake_timeout"),
                ssl_shutdown_timeout=kw.get("ssl_shutdown_timeout"))
        return await super().create_connection(
            protocol_factory, host, port, ssl=ssl, family=family, proto=proto, flags=flags, sock=sock,
            local_addr=local_addr, server_hostname=server_hostname, **kw)

    async def _connect(self, host: Any, port: Any, family: int, proto: int, flags: int,
                       local_addr: Any) -> Any:
        """A connected shrimpio socket (over shared memory where the route
        allows, else kernel TCP), trying the addresses in order as asyncio
        does; None if a name does not resolve (uvloop then says why)."""
        try:
            infos = await self.getaddrinfo(host, port, family=family, type=_std.SOCK_STREAM,
                                           proto=proto, flags=flags)
            local_infos = None if local_addr is None else await self.getaddrinfo(
                *local_addr, family=family, type=_std.SOCK_STREAM, proto=proto, flags=flags)
        except OSError:
            return None
        errors: list = []
        for fam, typ, prt, _canon, addr in infos:
            if fam not in (_std.AF_INET, _std.AF_INET6):
                continue
            sock = ShmSocket(fam, typ, prt)
            try:
                sock.setblocking(False)
                if local_infos is not None:
                    _bind_local(sock, fam, local_infos)
                await self.sock_connect(sock, addr)
                return sock
            except OSError as exc:
                sock.close()
                errors.append(exc)
            except BaseException:
                sock.close()
                raise
        if not errors:
            return None
        if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
            raise errors[0]
        raise OSError("Multiple exceptions: {}".format(", ".join(str(e) for e in errors)))

    async def connect_accepted_socket(self, protocol_factory: Callable, sock: Any, *, ssl: Any = None,
                                      **kw: Any) -> tuple:
        if _is_shm(sock):
            _check_ssl_timeouts(ssl, kw)           # as uvloop's
            sock.setblocking(False)
            return await self._make_shm_transport(
                sock, protocol_factory, ssl, server_side=True,
                ssl_handshake_timeout=kw.get("ssl_handshake_timeout"),
                ssl_shutdown_timeout=kw.get("ssl_shutdown_timeout"))
        return await super().connect_accepted_socket(protocol_factory, sock, ssl=ssl, **kw)

    # -- server side -----------------------------------------------------------

    async def create_server(self, protocol_factory: Callable, host: Any = None, port: Any = None,
                            *, family: int = _std.AF_UNSPEC, flags: int = _std.AI_PASSIVE,
                            sock: Any = None, backlog: int = 100, ssl: Any = None,
                            reuse_address: Optional[bool] = None, reuse_port: Optional[bool] = None,
                            ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None,
                            start_serving: bool = True) -> Any:
        _check_ssl_timeouts(ssl, {"ssl_handshake_timeout": ssl_handshake_timeout,
                                  "ssl_shutdown_timeout": ssl_shutdown_timeout})
        if sock is not None:
            if not isinstance(sock, ShmSocket) or sock.type & 0xF != _std.SOCK_STREAM:
                return await super().create_server(
                    protocol_factory, sock=sock, backlog=backlog, ssl=ssl,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    ssl_shutdown_timeout=ssl_shutdown_timeout, start_serving=start_serving)
            listeners = [sock]
        else:
            listeners = await self._listeners(host, port, family, flags, backlog, reuse_address,
                                              reuse_port)
        server = _Server(self, listeners, protocol_factory, ssl, ssl_handshake_timeout,
                         ssl_shutdown_timeout, backlog)
        for lsock in listeners:
            lsock.setblocking(False)
        if start_serving:
            await server.start_serving()
        return server

    async def _listeners(self, host: Any, port: Any, family: int, flags: int, backlog: int,
                         reuse_address: Optional[bool], reuse_port: Optional[bool]) -> list:
        hosts = [None] if host in (None, "") else ([host] if isinstance(host, str) else list(host))
        infos = []
        for h in hosts:
            infos += await self.getaddrinfo(h, port, family=family, type=_std.SOCK_STREAM, flags=flags)
        infos = list(dict.fromkeys(infos))
        if reuse_address is None:
            reuse_address = True
        listeners = []
        try:
            for fam, typ, prt, _canon, addr in infos:
                sock = ShmSocket(fam, typ, prt)
                listeners.append(sock)
                if reuse_address:
                    sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEPORT, 1)
                if fam == _std.AF_INET6:
                    sock.setsockopt(_std.IPPROTO_IPV6, _std.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as err:
                    raise OSError(err.errno, f"error while attempting to bind on address {addr!r}: "
                                             f"{err.strerror.lower()}") from None
                # listen() waits for _Server.start_serving, as uvloop's does.
        except BaseException:
            for s in listeners:
                s.close()
            raise
        return listeners

    # -- sock_* ------------------------------------------------------------------

    async def _shm_wait(self, sock: Any, writable: bool) -> None:
        """Wait until a shm socket's ring is readable (or writable)."""
        from .._fastpath import drain_bell, ring_arm
        conn = sock._shm
        ring = conn.tx if writable else conn.rx
        if ring_arm(ring, writable) or conn.gone:
            return
        fd = conn.space.fileno() if writable else conn.bell_fd
        fut = self.create_future()
        self.add_reader(fd, _done, fut)
        try:
            await fut
        finally:
            self.remove_reader(fd)
            if drain_bell(fd):
                conn.gone = True

    async def sock_recv(self, sock: Any, n: int) -> bytes:
        if not _is_shm(sock):
            return await super().sock_recv(sock, n)
        while True:
            try:
                return sock._shm.stream.recv(n, 0, 0.0)
            except BlockingIOError:
                if sock._shm.gone:
                    return b""
                await self._shm_wait(sock, False)

    async def sock_recv_into(self, sock: Any, buf: Any) -> int:
        if not _is_shm(sock):
            return await super().sock_recv_into(sock, buf)
        while True:
            try:
                return sock._shm.stream.recv_into(buf, 0, 0, 0.0)
            except BlockingIOError:
                if sock._shm.gone:
                    return 0
                await self._shm_wait(sock, False)

    async def sock_sendall(self, sock: Any, data: Any) -> None:
        if not _is_shm(sock):
            return await super().sock_sendall(sock, data)
        view = memoryview(data).cast("B")
        while view:
            try:
                n = sock._shm.stream.send(view, 0, 0.0)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                if n == 0 and sock._shm.gone:
                    # The peer died without shutting the ring: no room will
                    # ever come, and _shm_wait returns at once (a busy loop
                    # that never yields).  EPIPE, as TCP after a reset.
                    raise BrokenPipeError(errno.EPIPE, "Broken pipe")
                await self._shm_wait(sock, True)

    async def sock_connect(self, sock: Any, address: Any) -> None:
        if isinstance(sock, ShmSocket) and sock._is_tcp() and sock._shm is None and sock._lst is None:
            if sock._try_shm(address):
                return
        elif _plain_tcp(sock) and _connect_plain_over_shm(sock, address):
            return
        return await super().sock_connect(sock, address)

    async def sock_accept(self, sock: Any) -> tuple:
        if not isinstance(sock, ShmSocket) or sock._lst is None:
            return await super().sock_accept(sock)
        while True:
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
                return conn, addr
            except BlockingIOError:
                pass
            fut = self.create_future()
            fds = sock._accept_fds()
            for fd in fds:
                self.add_reader(fd, _done, fut)
            try:
                await fut
            finally:
                for fd in fds:
                    self.remove_reader(fd)

    # -- TLS ---------------------------------------------------------------------

    async def start_tls(self, transport: Any, protocol: Any, sslcontext: Any, *,
                        server_side: bool = False, server_hostname: Optional[str] = None,
                        ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None) -> Any:
        if not isinstance(transport, ShmTransport):
            return await super().start_tls(
                transport, protocol, sslcontext, server_side=server_side,
                server_hostname=server_hostname, ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout)
        waiter = self.create_future()
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=False)
        transport.pause_reading()
        transport.set_protocol(ssl_protocol)
        conmade = self.call_soon(ssl_protocol.connection_made, transport)
        resume = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            conmade.cancel()
            resume.cancel()
            raise
        return ssl_protocol._app_transport


def _bind_local(sock: Any, family: int, local_infos: list) -> None:
    """Bind to the first local address of the socket's family that binds
    (asyncio's rule for ``local_addr``; the bind error as uvloop raises it)."""
    error = None
    for fam, _typ, _prt, _canon, laddr in local_infos:
        if fam != family:
            continue
        try:
            sock.bind(laddr)
            return
        except OSError as exc:
            error = exc
    raise error or OSError(f"no matching local address with family={family} found")


def _check_ssl_timeouts(ssl: Any, kw: dict) -> None:
    for name in ("ssl_handshake_timeout", "ssl_shutdown_timeout"):
        if kw.get(name) is not None and not ssl:
            raise ValueError(f"{name} is only meaningful with ssl")


def _plain_tcp(sock: Any) -> bool:
    """A stdlib (not shrimpio) TCP socket, not yet connected."""
    return (isinstance(sock, _std.socket) and not isinstance(sock, ShmSocket)
            and sock.family in (_std.AF_INET, _std.AF_INET6)
            and sock.type & 0xF == _std.SOCK_STREAM and sock.fileno() >= 0)


def _connect_plain_over_shm(sock: Any, address: Any) -> bool:
    """Connect a stdlib socket over shared memory if the route allows.

    Libraries that make their own sockets (aiohttp's happy eyeballs) hand
    the loop a stdlib ``socket.socket``; the shrimpio loop should not need
    the patch for them.  A shrimpio socket on a dup of the fd does the
    handshake, the control socket is then put on the caller's fd too, and the
    connection waits (as a detached one) for ``create_connection(sock=...)``
    to adopt it by the fd's inode."""
    twin = ShmSocket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    try:
        twin.setblocking(False)
        if not twin._try_shm(address):
            return False
        os.dup2(twin.fileno(), sock.fileno(), inheritable=False)
        os.close(twin._detach_keep())   # the connection now lives on the caller's fd
        return True
    finally:
        twin.close()


def _adoptable(sock: Any) -> bool:
    """A stdlib socket whose fd holds a detached shrimpio connection."""
    if isinstance(sock, ShmSocket) or not isinstance(sock, _std.socket) or sock.fileno() < 0:
        return False
    from .. import socket as _ss
    try:
        return _ss._inode(sock.fileno()) in _ss._detached
    except OSError:
        return False


def _done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def new_event_loop() -> Loop:
    """A new shrimpio event loop (a ``uvloop.Loop`` subclass)."""
    return Loop()


def run(main: Any, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
        debug: Optional[bool] = None, **run_kwargs: Any) -> Any:
    """Run a coroutine on a shrimpio loop, as ``uvloop.run`` / ``asyncio.run``."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory, **run_kwargs) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Event loop policy whose loops are shrimpio loops (as uvloop's)."""

    def _loop_factory(self) -> Loop:       # type: ignore[override]
        return new_event_loop()


def install() -> None:
    """Make shrimpio loops the default (``asyncio.set_event_loop_policy``)."""
    if sys.version_info >= (3, 12):
        warnings.warn("shrimpio.install() is deprecated in favor of shrimpio.run() "
                      "(asyncio event loop policies are deprecated since Python 3.12)",
                      DeprecationWarning, stacklevel=1)
    asyncio.set_event_loop_policy(EventLoopPolicy())
