"""The shrimpio loop's ``create_server``: shrimpio listening sockets.

Each listener is a shrimpio socket, so it has both a kernel TCP listening
socket (remote and unpatched clients) and a registry entry (shrimpio
clients); :class:`._server.Server` accepts from both.  A ``sock=`` that is not
a shrimpio stream socket is uvloop's to serve.
"""

from __future__ import annotations

import socket as _std
from typing import Any, Callable, Optional

from ..socket import socket as ShmSocket
from ._make_transport import check_ssl_timeouts
from ._server import Server

__all__ = ["ListenMixin"]


class ListenMixin:
    """``create_server`` with shrimpio listeners (the loop's, mixed in)."""

    async def create_server(self, protocol_factory: Callable, host: Any = None, port: Any = None,
                            *, family: int = _std.AF_UNSPEC, flags: int = _std.AI_PASSIVE,
                            sock: Any = None, backlog: int = 100, ssl: Any = None,
                            reuse_address: Optional[bool] = None, reuse_port: Optional[bool] = None,
                            ssl_handshake_timeout: Any = None, ssl_shutdown_timeout: Any = None,
                            start_serving: bool = True) -> Any:
        check_ssl_timeouts(ssl, {"ssl_handshake_timeout": ssl_handshake_timeout,
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
