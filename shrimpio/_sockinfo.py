"""What a socket says about its path: ``shrimpio.info()`` and ``SHRIMPIO_REPORT``.

``info(sock)`` answers for a shrimpio socket from what the object recorded
(its connection, listener or route), and for anything else that stands for
a connection (an asyncio transport, a ``StreamWriter``, asyncio's
``TransportSocket``, an object on the fd of a known connection) by finding
the shrimpio socket or hook that knows it.  With ``SHRIMPIO_REPORT`` set,
every connected socket writes one line when it closes (:mod:`shrimpio._report`),
and those still open at exit write theirs then, marked ``open_at_exit``.
"""

from __future__ import annotations

import socket as _std
import sys
import weakref
from typing import TYPE_CHECKING, Any, Optional

from . import _control, _process
from ._sockindex import by_fd
from ._tcpinfo import tcp_counts

if TYPE_CHECKING:
    from .socket import socket

_STREAM = _std.SOCK_STREAM
_TYPE_MASK = ~(getattr(_std, "SOCK_NONBLOCK", 0) | getattr(_std, "SOCK_CLOEXEC", 0))


def report_wanted() -> bool:
    return bool(_control.getenv("SHRIMPIO_REPORT"))


# SHRIMPIO_REPORT at exit: the sockets of this process that may still hold
# a connection then (one whose makefile() was never closed, or that the
# program just left open) write their line, marked "open_at_exit".
reportable: "weakref.WeakSet[socket]" = weakref.WeakSet()
_report_hooked = 0          # the pid whose exit is hooked
_exit_reported = 0          # the pid that wrote its at-exit lines: no second line after
#: Called at exit before those lines are written (the asyncio loop's TCP
#: connections take their byte counts from the kernel then).
report_exit_hooks: list = []


def report_at_exit(sock: "socket") -> None:
    global _report_hooked
    reportable.add(sock)
    if _report_hooked != _process.pid:
        _report_hooked = _process.pid
        _control.on_exit(report_open)


def reported_at_exit() -> bool:
    """Whether this process wrote its at-exit lines (a socket closed after
    that writes no second line)."""
    return _exit_reported == _process.pid


def report_open() -> None:
    """At exit: a line for each connection still open."""
    global _exit_reported
    if _exit_reported == _process.pid:
        return
    for hook in report_exit_hooks:
        try:
            hook()
        except Exception:
            pass
    from ._report import connection_closing
    for sock in list(reportable):
        try:
            if sock.fileno() < 0 or sock._esc is not None:
                continue        # closed (and reported), or its relay reports
            record = report_record(sock)
        except Exception:
            continue
        if record is not None:
            record["open_at_exit"] = True
            connection_closing(record)
    _exit_reported = _process.pid


def report_record(sock: "socket") -> Optional[dict]:
    """What ``SHRIMPIO_REPORT`` says about a connected socket (None for
    listeners and unconnected or non-TCP sockets)."""
    if sock._lst is not None or not sock._is_tcp():
        return None
    try:
        local = sock.getsockname()
    except OSError:
        return None
    try:
        peer = sock.getpeername()
    except OSError:          # a kernel connection the peer already closed
        peer = sock._peer
    if not peer:
        return None          # never connected
    out = info(sock)
    out.update(local=local, peer=peer)
    return out


#: Called by info() with the fd of an object that is not a shrimpio socket:
#: a hook that knows whose connection that fd is returns its info (the
#: asyncio loop's TCP connections, driven by uvloop on a copy of the fd).
info_fd_hooks: list = []


def info(sock: Any) -> dict:
    """Which path a connection took, why, and its byte counts.

    ``{"path": "shm" | "tcp" | None, "reason": str, "bytes_sent": int,
    "bytes_received": int}``; ``path`` is None for sockets that are neither
    (UDP, Unix, unconnected).  ``sock``: a socket, an asyncio transport or
    ``StreamWriter``, or the object a transport's
    ``get_extra_info("socket")`` returns."""
    from .socket import socket      # (socket imports this module)
    if not isinstance(sock, socket):
        return _info_of_other(sock, 0)
    conn = sock._shm
    if conn is not None or sock._lst is not None:
        out: dict = {"path": "shm", "reason": ""}
    elif sock._route is not None:
        out = {"path": sock._route.path, "reason": sock._route.reason}
    else:
        out = {"path": "tcp" if sock._is_tcp() else None, "reason": ""}
    if conn is not None:
        out.update(bytes_sent=conn.bytes_sent, bytes_received=conn.bytes_received,
                   ring_bytes=(conn.tx.capacity, conn.rx.capacity))
    elif sock._esc is not None:
        relayed = sock._esc.relay.conn          # the relay counts what crossed
        out.update(bytes_sent=relayed.bytes_sent, bytes_received=relayed.bytes_received)
    elif (counts := tls_kernel_counts(sock)) is not None:
        out.update(bytes_sent=counts[0], bytes_received=counts[1])
    else:
        out.update(bytes_sent=sock._sent, bytes_received=sock._received)
    if sock._lst is not None:
        out["listener"] = sock._lst.name
    return out


def tls_kernel_counts(sock: Any) -> Optional[tuple[int, int]]:
    """(sent, received) of a TLS socket whose engine is the stdlib's C one on
    the kernel fd: OpenSSL moves the bytes itself, past our counters, so
    they are the kernel's (ciphertext, as on the wire).  None for others."""
    engine = getattr(sock, "_sslobj", None)
    if engine is None or type(engine).__module__ != "_ssl":
        return None
    return tcp_counts(sock, active=not sock.server_side) or (0, 0)


def _info_of_other(obj: Any, depth: int) -> dict:
    """info() of what is not a shrimpio socket: a transport or stream
    writer (its ``get_extra_info``), asyncio's ``TransportSocket`` (the
    socket it wraps), or an object on the fd of a connection shrimpio knows
    (uvloop's ``PseudoSocket``, ``socket.socket(fileno=...)`` in an
    unpatched module)."""
    from .socket import socket
    get_extra = getattr(obj, "get_extra_info", None)
    if callable(get_extra) and depth < 4:
        try:
            found = get_extra("shrimpio")
            inner = get_extra("socket") if found is None else None
        except Exception:
            found = inner = None
        if isinstance(found, dict):
            return dict(found)
        if inner is not None and inner is not obj:
            return _info_of_other(inner, depth + 1) if not isinstance(inner, socket) else info(inner)
    trsock = sys.modules.get("asyncio.trsock")
    if trsock is not None and isinstance(obj, trsock.TransportSocket) and depth < 4:
        inner = obj._sock
        return info(inner) if isinstance(inner, socket) else _info_of_other(inner, depth + 1)
    try:
        fd = obj.fileno()
    except Exception:
        fd = -1
    if isinstance(fd, int) and fd >= 0:
        owner = by_fd.get(fd)
        if owner is not None and owner is not obj and owner.fileno() == fd:
            return info(owner)
        for hook in info_fd_hooks:
            found = hook(fd)
            if found is not None:
                return found
    return {"path": "tcp" if _is_stream_inet(obj) else None,
            "reason": "not a shrimpio socket", "bytes_sent": 0, "bytes_received": 0}


def _is_stream_inet(sock: Any) -> bool:
    try:
        return (sock.family in (_std.AF_INET, _std.AF_INET6)
                and sock.type & _TYPE_MASK == _STREAM)
    except (AttributeError, OSError):
        return False
