"""The shrimpio loop's client side: ``create_connection`` to a host and port.

Resolution and the order of addresses are asyncio's (``happy_eyeballs_delay``
and ``interleave`` included, which uvloop lacks); each address is tried with
a shrimpio socket, whose ``connect`` takes shared memory where
:mod:`shrimpio._route` allows and kernel TCP otherwise.  The connected socket
becomes a transport in :mod:`._make_transport`.
"""

from __future__ import annotations

import functools
import socket as _std
from asyncio.base_events import _ipaddr_info
from typing import Any, Callable, Optional

from ..socket import socket as ShmSocket
from ._make_transport import check_ssl_timeouts

__all__ = ["ConnectMixin"]


class ConnectMixin:
    """``create_connection`` over shrimpio sockets (the loop's, mixed in)."""

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
        check_ssl_timeouts(ssl, tls)
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

    async def _connect(self, host: Any, port: Any, family: int, proto: int, flags: int,
                       local_addr: Any, delay: Optional[float] = None,
                       interleave: Optional[int] = None, all_errors: bool = False) -> Any:
        """A connected shrimpio socket (over shared memory where the route
        allows, else kernel TCP), trying the addresses as asyncio does (in
        order, or staggered by ``delay``); None if a name does not resolve
        (uvloop then says why)."""
        try:
            # A numeric address needs no resolver (asyncio's rule: uvloop's
            # getaddrinfo costs a future and a C request per connect).
            infos = _numeric_info(host, port, family, proto) or await self.getaddrinfo(
                host, port, family=family, type=_std.SOCK_STREAM, proto=proto, flags=flags)
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


def _numeric_info(host: Any, port: Any, family: int, proto: int) -> Optional[list]:
    """What getaddrinfo says of a numeric IP address and port (one entry,
    as asyncio's ``_ipaddr_info``), or None to ask it (names, service
    names, scoped IPv6 addresses, ports it would refuse)."""
    if type(host) is not str or type(port) is not int or not 0 <= port <= 65535:
        return None
    info = _ipaddr_info(host, port, family, _std.SOCK_STREAM, proto)
    return None if info is None else [info]


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
