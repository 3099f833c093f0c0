"""Connections of the shrimpio loop that take kernel TCP.

uvloop drives them (its transports are fast and correct for TCP), but the
shrimpio socket layer still owns them, so that they say which path they took
and why (``SHRIMPIO_REPORT``), as blocking sockets do.

Theory of operation
-------------------
uvloop gets a :class:`Handoff`: a stdlib socket object on a *dup* of the
connection's fd.  The shrimpio socket keeps the original fd.  When the
transport closes, uvloop closes its dup and calls ``detach()`` on the
handoff; that is our hook: the shrimpio socket, whose fd is still open,
reads the byte counts from ``TCP_INFO`` (uvloop moved the bytes, so the
socket layer's own counters saw none), writes its report line and closes.
Holding the original fd a moment longer delays nothing: the kernel sends
FIN when the last fd closes, which is this close, at once.
"""

from __future__ import annotations

import os
import socket as _std
import struct
from typing import Any, Callable, Optional

__all__ = ["Handoff", "handoff", "tcp_counts"]

# struct tcp_info: tcpi_state is the first byte; tcpi_bytes_acked and
# tcpi_bytes_received (Linux 4.1 and 4.6) are the u64s at offset 120.
_TCP_INFO_COUNTS = 120
_FIN_ACKED_STATES = (5, 6, 7)      # FIN_WAIT2, TIME_WAIT, CLOSE


def tcp_counts(sock: _std.socket) -> Optional[tuple[int, int]]:
    """(bytes sent and acknowledged, bytes received) of a kernel TCP
    connection, from ``TCP_INFO``; None where the kernel does not say."""
    try:
        raw = sock.getsockopt(_std.IPPROTO_TCP, _std.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(raw) < _TCP_INFO_COUNTS + 16:
        return None
    acked, received = struct.unpack_from("QQ", raw, _TCP_INFO_COUNTS)
    # The kernel counts the SYN as one acknowledged byte, and our FIN once
    # the peer acknowledged it.
    acked -= 1 + (raw[0] in _FIN_ACKED_STATES)
    return max(acked, 0), received


class Handoff(_std.socket):
    """The socket object uvloop gets for a connection a shrimpio socket
    owns: its ``detach()`` (uvloop's last call, after it closed the fd)
    ends the owner too."""

    __slots__ = ("_owner", "_on_end")

    def detach(self) -> int:
        fd = super().detach()
        self._end()
        return fd

    def close(self) -> None:
        super().close()
        self._end()

    def _end(self) -> None:
        """Once: end the owner, then tell whoever waits for the end."""
        owner, self._owner = self._owner, None
        on_end, self._on_end = self._on_end, None
        if owner is not None:
            end(owner)
        if on_end is not None:
            on_end()


def handoff(owner: Any, on_end: Optional[Callable[[], None]] = None) -> Handoff:
    """A :class:`Handoff` for ``owner`` (a connected shrimpio socket that
    took TCP); ``on_end`` runs when uvloop is done with it."""
    try:
        # Kept for the report: once the peer has closed, the kernel may no
        # longer tell.
        owner._peer = owner.getpeername()
    except OSError:
        pass
    sock = Handoff(owner.family, owner.type, owner.proto, fileno=os.dup(owner.fileno()))
    sock._owner = owner
    sock._on_end = on_end
    sock.setblocking(False)
    return sock


def end(owner: Any) -> None:
    """Close a handed-off shrimpio socket, with uvloop's byte counts."""
    if owner.fileno() >= 0:
        counts = tcp_counts(owner)
        if counts is not None:
            owner._sent, owner._received = counts
    owner.close()
