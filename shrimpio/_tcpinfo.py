"""Byte counts of a kernel TCP connection, from ``TCP_INFO``: for the
connections whose bytes shrimpio's methods did not move (uvloop's TCP
transports, OpenSSL's C engine on a TLS socket)."""

from __future__ import annotations

import socket as _std
import struct
from typing import Optional

__all__ = ["tcp_counts"]

# struct tcp_info (linux/tcp.h): tcpi_state is the first byte; then, as
# offsets: tcpi_bytes_acked and tcpi_bytes_received (u64, Linux 4.1/4.6),
# tcpi_notsent_bytes (u32, 4.6), tcpi_bytes_sent and tcpi_bytes_retrans
# (u64, 4.19).
_ACKED_RECEIVED = 120
_NOTSENT = 144
_SENT_RETRANS = 200
_FIN_WAIT1, _FIN_WAIT2, _TIME_WAIT, _CLOSE = 4, 5, 6, 7
_CLOSE_WAIT, _LAST_ACK, _CLOSING = 8, 9, 11
# States in which the peer's FIN has certainly arrived (a socket whose
# connection went through TIME_WAIT or LAST_ACK reads as CLOSE: see below).
_PEER_FIN_STATES = (_CLOSE_WAIT, _LAST_ACK, _CLOSING, _TIME_WAIT)
# States in which our own FIN is queued or in flight, not yet acknowledged.
_OWN_FIN_PENDING = (_FIN_WAIT1, _LAST_ACK, _CLOSING)


def tcp_counts(sock: _std.socket, active: bool = True) -> Optional[tuple[int, int]]:
    """(bytes the program sent, bytes it received) on a kernel TCP
    connection, from ``TCP_INFO``: data only, whoever closed first; None
    where the kernel does not say.  ``active``: this end made the connection
    (``connect``), not ``accept``.

    The kernel's counters run over sequence space, in which the SYN and FIN
    take one number each: ``tcpi_bytes_acked`` counts our SYN (only when we
    sent it: an accepted connection's starts after the handshake) and our
    FIN once acknowledged; ``tcpi_bytes_received`` counts the peer's FIN once
    it arrived, never its SYN.  Sent data is taken from the data-only
    counters where the kernel has them (payload transmitted, less
    retransmissions, plus what is queued and not yet sent)."""
    try:
        raw = sock.getsockopt(_std.IPPROTO_TCP, _std.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(raw) < _ACKED_RECEIVED + 16:
        return None
    state = raw[0]
    acked, received = struct.unpack_from("QQ", raw, _ACKED_RECEIVED)
    data_acked = acked - active
    if len(raw) >= _SENT_RETRANS + 16:
        (notsent,) = struct.unpack_from("I", raw, _NOTSENT)
        transmitted, retransmitted = struct.unpack_from("QQ", raw, _SENT_RETRANS)
        sent = transmitted - retransmitted + notsent
        if notsent and state in _OWN_FIN_PENDING:
            sent -= 1                   # our FIN is queued behind data: it counts in notsent
        own_fin_acked = data_acked > sent
    else:
        own_fin_acked = state in (_FIN_WAIT2, _TIME_WAIT, _CLOSE)
        sent = data_acked - own_fin_acked
    # CLOSE is where a connection ends whichever way it ended: after both
    # FINs (through LAST_ACK or TIME_WAIT), or on a reset (no FIN from the
    # peer, perhaps none from us).  Our FIN acknowledged there means the
    # orderly end.
    peer_fin = state in _PEER_FIN_STATES or (state == _CLOSE and own_fin_acked)
    return max(sent, 0), max(received - peer_fin, 0)
