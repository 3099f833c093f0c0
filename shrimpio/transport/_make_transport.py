"""The transport a connected socket gets on the shrimpio loop.

A socket over shared memory gets a :class:`ShmTransport` (with asyncio's
``SSLProtocol`` over it for ``ssl=`` and ``start_tls``); a socket on kernel
TCP gets uvloop's own transport, on a shrimpio socket that owns the
connection so that it reports its path and why (:mod:`._fallback`).  This is
the one place where that choice is made for the loop: for
``create_connection`` once connected, for ``create_connection(sock=…)`` /
``connect_accepted_socket``, and for the connections a
:class:`._server.Server` accepts (``_serve_shm``, ``_serve_tcp``).

Theory of operation: which socket stands for the connection
-----------------------------------------------------------
A socket handed to the loop is not always the object that owns the
connection.  A stdlib socket connected by ``sock_connect`` has a shrimpio
*twin* that did the hand-shake (:mod:`._sock`), and a stdlib socket made
from the fd of a detached shrimpio connection must be rebuilt as a shrimpio
socket on that fd; both are served over shared memory (``_shm_of``).  A
stdlib socket on kernel TCP is taken over by a shrimpio socket at once (its
object detached), so that the connection reports as every other one does
(``_kernel_owner``).
"""

from __future__ import annotations

import socket as _std
from asyncio import sslproto
from typing import Any, Awaitable, Callable, Optional

from .. import _route, _socklate
from .. import socket as _ss
from ..socket import StdSocket, socket as ShmSocket
from . import _fallback
from ._sock import is_shm, take_twin, tcp_reason
from ._transport import ShmTransport

__all__ = ["MakeTransportMixin", "check_ssl_timeouts"]


class MakeTransportMixin:
    """Transports for connected sockets (the loop's, mixed in)."""

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

    def _serve_shm(self, sock: Any, factory: Callable, ssl: Any, server: Any,
                   hs_timeout: Any, sd_timeout: Any) -> None:
        """Serve a shared-memory connection a server accepted.  Without TLS
        its transport is made here, in the accepting callback, as uvloop's
        servers make theirs (the protocol's ``connection_made`` follows in a
        callback of its own): no task, no future, no loop turn.  With TLS a
        task awaits the handshake."""
        if ssl:
            self.create_task(self._set_up_accepted(
                self._make_shm_transport(sock, factory, ssl, server_side=True, server=server,
                                         ssl_handshake_timeout=hs_timeout,
                                         ssl_shutdown_timeout=sd_timeout),
                "shrimpio connection setup failed"))
            return
        try:
            ShmTransport(self, sock, factory(), None, server)
        except (SystemExit, KeyboardInterrupt):
            sock.close()
            raise
        except BaseException as exc:
            # (A protocol factory that raised: that connection alone is
            # dropped, and said in debug mode, as uvloop does.)
            sock.close()
            if self.get_debug():
                self.call_exception_handler({"message": "shrimpio connection setup failed",
                                             "exception": exc})

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

    async def _on_socket(self, factory: Callable, sock: Any, ssl: Any, server_side: bool,
                         server_hostname: Optional[str], tls: dict) -> tuple:
        """A transport for a connected socket: ours over shared memory, else
        uvloop's (on a socket the shrimpio layer owns, for the report)."""
        shm = _shm_of(sock)
        if shm is not None:
            if server_side or await _socklate.settled(shm):
                if shm.gettimeout() != 0.0:
                    shm.setblocking(False)
                return await self._make_shm_transport(shm, factory, ssl, server_side=server_side,
                                                      server_hostname=server_hostname, **tls)
            sock = shm          # the listener sent it to TCP meanwhile (see _socklate)
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

    async def connect_accepted_socket(self, protocol_factory: Callable, sock: Any, *, ssl: Any = None,
                                      ssl_handshake_timeout: Any = None,
                                      ssl_shutdown_timeout: Any = None) -> tuple:
        tls = {"ssl_handshake_timeout": ssl_handshake_timeout,
               "ssl_shutdown_timeout": ssl_shutdown_timeout}
        check_ssl_timeouts(ssl, tls)               # as uvloop's
        return await self._on_socket(protocol_factory, sock, ssl, True, None, tls)

    async def start_tls(self, transport: Any, protocol: Any, sslcontext: Any, *,
                        server_side: bool = False, server_hostname: Optional[str] = None,
                        ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None) -> Any:
        if not isinstance(transport, ShmTransport):
            return await super().start_tls(
                transport, protocol, sslcontext, server_side=server_side,
                server_hostname=server_hostname, ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout)
        # As asyncio's start_tls: no byte may reach the old protocol once the
        # TLS one is set, and the TLS protocol sees connection_made before any
        # data, so reading pauses first and resumes in a later callback.
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


def check_ssl_timeouts(ssl: Any, kw: dict) -> None:
    for name in ("ssl_handshake_timeout", "ssl_shutdown_timeout"):
        if kw.get(name) is not None and not ssl:
            raise ValueError(f"{name} is only meaningful with ssl")
