"""The shrimpio event loop: uvloop, plus shared-memory connections.

``Loop`` subclasses ``uvloop.Loop``.  Where a connection can go over shared
memory (the decision is :mod:`shrimpio._route`'s, made by the socket layer's
connect), it builds a :class:`ShmTransport`; connections on kernel TCP get
uvloop's own transport, on a socket the shrimpio layer owns so that they
report their path and why (:mod:`._fallback`).  Servers are
:class:`._server.Server`; the ``sock_*`` calls and sendfile are in
:mod:`._sock`, the fd callbacks (``add_reader`` ...) in :mod:`._watch`.
"""

from __future__ import annotations

import asyncio
import functools
import socket as _std
import sys
import warnings
from asyncio import sslproto
from typing import Any, Awaitable, Callable, Optional

import uvloop

from .. import _route
from .. import socket as _ss
from ..socket import StdSocket, socket as ShmSocket
from . import _fallback, _watch
from ._server import Server
from ._signals import SignalMixin
from ._sock import SockMixin, is_shm, take_twin, tcp_reason
from ._transport import ShmTransport

__all__ = ["Loop", "new_event_loop", "run", "EventLoopPolicy", "install"]


class Loop(SignalMixin, SockMixin, _watch.WatchMixin, uvloop.Loop):
    """``uvloop.Loop`` that runs shrimpio connections over shared memory."""

    def __init__(self) -> None:
        super().__init__()
        self._watch_init()

    def close(self) -> None:
        super().close()
        self._watch_close()
        if self._twin_timer is not None:
            self._twin_timer.cancel()
            self._twin_timer = None

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
        handed = _fallback.handoff(sock, server._detach, active=False)
        await self._set_up_accepted(
            super().connect_accepted_socket(factory, handed, ssl=ssl, ssl_handshake_timeout=hs_timeout,
                                            ssl_shutdown_timeout=sd_timeout),
            "TCP connection setup failed", handed.close)

    # -- client side ---------------------------------------------------------

    async def create_connection(self, protocol_factory: Callable, host: Any = None, port: Any = None,
                                *, ssl: Any = None, family: int = 0, proto: int = 0, flags: int = 0,
                                sock: Any = None, local_addr: Any = None,
                                server_hostname: Optional[str] = None,
                                ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None,
                                happy_eyeballs_delay: Optional[float] = None,
                                interleave: Optional[int] = None, all_errors: bool = False) -> tuple:
        # uvloop's argument checks, made first: the shared-memory path must
        # refuse what uvloop refuses (a missing server_hostname would
        # otherwise leave the TLS handshake waiting forever).
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl and not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        tls = {"ssl_handshake_timeout": ssl_handshake_timeout,
               "ssl_shutdown_timeout": ssl_shutdown_timeout}
        _check_ssl_timeouts(ssl, tls)
        if sock is not None and (host is not None or port is not None):
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock is None:
            if host is not None and port is not None:
                # happy_eyeballs_delay and interleave (asyncio's; uvloop has
                # neither) are served here too: every socket is shrimpio's.
                sock = await self._connect(host, port, family, proto, flags, local_addr,
                                           happy_eyeballs_delay, interleave, all_errors)
            if sock is None:
                # No host or port, or a name that does not resolve: uvloop
                # raises its own error.
                return await super().create_connection(
                    protocol_factory, host, port, ssl=ssl, family=family, proto=proto, flags=flags,
                    local_addr=local_addr, server_hostname=server_hostname, **tls)
            if ssl and server_hostname is None:
                server_hostname = host
        return await self._on_socket(protocol_factory, sock, ssl, False, server_hostname, tls)

    async def _on_socket(self, factory: Callable, sock: Any, ssl: Any, server_side: bool,
                         server_hostname: Optional[str], tls: dict) -> tuple:
        """A transport for a connected socket: ours over shared memory, else
        uvloop's (on a socket the shrimpio layer owns, for the report)."""
        shm = _shm_of(sock)
        if shm is not None:
            shm.setblocking(False)
            return await self._make_shm_transport(shm, factory, ssl, server_side=server_side,
                                                  server_hostname=server_hostname, **tls)
        owner = _kernel_owner(sock)
        if owner is None:               # not TCP (a Unix socket...): uvloop's alone
            handed = sock
        else:
            handed = _fallback.handoff(owner, active=not server_side)
        try:
            if server_side:
                return await super().connect_accepted_socket(factory, handed, ssl=ssl, **tls)
            return await super().create_connection(factory, ssl=ssl, sock=handed,
                                                   server_hostname=server_hostname, **tls)
        except BaseException:
            if owner is not None:
                handed.close()
            raise

    async def _connect(self, host: Any, port: Any, family: int, proto: int, flags: int,
                       local_addr: Any, delay: Optional[float] = None,
                       interleave: Optional[int] = None, all_errors: bool = False) -> Any:
        """A connected shrimpio socket (over shared memory where the route
        allows, else kernel TCP), trying the addresses as asyncio does (in
        order, or staggered by ``delay``); None if a name does not resolve
        (uvloop then says why)."""
        try:
            infos = await self.getaddrinfo(host, port, family=family, type=_std.SOCK_STREAM,
                                           proto=proto, flags=flags)
            local_infos = None if local_addr is None else await self.getaddrinfo(
                *local_addr, family=family, type=_std.SOCK_STREAM, proto=proto, flags=flags)
        except OSError:
            return None
        infos = [i for i in infos if i[0] in (_std.AF_INET, _std.AF_INET6)]
        if not infos:
            return None
        if delay is not None and interleave is None:
            interleave = 1
        if interleave:
            infos = _interleave(infos, interleave)
        errors: list = []
        if delay is None:
            for info in infos:
                sock = await self._connect_one(info, local_infos, errors)
                if sock is not None:
                    return sock
        else:
            from asyncio import staggered
            sock, _, _ = await staggered.staggered_race(
                [functools.partial(self._connect_one, info, local_infos, errors) for info in infos],
                delay)
            if sock is not None:
                return sock
        if all_errors:
            raise ExceptionGroup("create_connection failed", errors)
        if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
            raise errors[0]
        raise OSError("Multiple exceptions: {}".format(", ".join(str(e) for e in errors)))

    async def _connect_one(self, info: tuple, local_infos: Any, errors: list) -> Any:
        fam, typ, prt, _canon, addr = info
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
            return None
        except BaseException:
            sock.close()
            raise

    async def connect_accepted_socket(self, protocol_factory: Callable, sock: Any, *, ssl: Any = None,
                                      ssl_handshake_timeout: Any = None,
                                      ssl_shutdown_timeout: Any = None) -> tuple:
        tls = {"ssl_handshake_timeout": ssl_handshake_timeout,
               "ssl_shutdown_timeout": ssl_shutdown_timeout}
        _check_ssl_timeouts(ssl, tls)               # as uvloop's
        return await self._on_socket(protocol_factory, sock, ssl, True, None, tls)

    # -- server side -----------------------------------------------------------

    async def create_server(self, protocol_factory: Callable, host: Any = None, port: Any = None,
                            *, family: int = _std.AF_UNSPEC, flags: int = _std.AI_PASSIVE,
                            sock: Any = None, backlog: int = 100, ssl: Any = None,
                            reuse_address: Optional[bool] = None, reuse_port: Optional[bool] = None,
                            ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None,
                            start_serving: bool = True) -> Any:
        _check_ssl_timeouts(ssl, {"ssl_handshake_timeout": ssl_handshake_timeout,
                                  "ssl_shutdown_timeout": ssl_shutdown_timeout})
        if sock is None and host is None and port is None:
            raise ValueError("Neither host/port nor sock were specified")      # as uvloop
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
        server = Server(self, listeners, protocol_factory, ssl, ssl_handshake_timeout,
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


def _shm_of(sock: Any) -> Optional[ShmSocket]:
    """The shrimpio socket over shared memory that ``sock`` stands for: itself,
    the twin of a stdlib socket connected by ``sock_connect`` (adopted), or
    a stdlib socket on the fd of a detached shrimpio connection."""
    if is_shm(sock):
        return sock
    if not isinstance(sock, StdSocket) or isinstance(sock, ShmSocket) or sock.fileno() < 0:
        return None
    twin = take_twin(sock)
    if twin is not None:
        return twin
    try:
        detached = _ss._inode(sock.fileno()) in _ss._detached
    except OSError:
        return None
    if detached:
        return ShmSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    return None


def _kernel_owner(sock: Any) -> Optional[ShmSocket]:
    """The shrimpio socket that owns (and reports) a kernel TCP connection
    given to the loop: a shrimpio socket on kernel TCP is its own; a stdlib
    one is taken over (its object is detached).  None if not TCP."""
    if isinstance(sock, ShmSocket):
        return sock if sock._is_tcp() and sock._lst is None else None
    if not isinstance(sock, StdSocket) or sock.fileno() < 0 \
            or sock.family not in (_std.AF_INET, _std.AF_INET6) \
            or sock.type & 0xF != _std.SOCK_STREAM:
        return None
    route = tcp_reason(sock) or _route.Route(_route.TCP, "kernel socket given to the loop (sock=)")
    owner = ShmSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    owner._route = route
    return owner


def _interleave(infos: list, first_family_count: int) -> list:
    """Addresses by family, alternating (``first_family_count`` of the first
    family first), as asyncio's ``interleave``."""
    by_family: dict = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    lists = list(by_family.values())
    out: list = []
    if first_family_count > 1 and lists:
        out += lists[0][:first_family_count - 1]
        lists[0] = lists[0][first_family_count - 1:]
    while any(lists):
        for lst in lists:
            if lst:
                out.append(lst.pop(0))
    return out


def _check_ssl_timeouts(ssl: Any, kw: dict) -> None:
    for name in ("ssl_handshake_timeout", "ssl_shutdown_timeout"):
        if kw.get(name) is not None and not ssl:
            raise ValueError(f"{name} is only meaningful with ssl")


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
