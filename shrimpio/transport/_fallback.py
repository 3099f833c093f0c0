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

One fd short of the limit there is no room for the dup, and a kernel
connection needs none more than its own (uvloop alone would serve it): the
handoff then takes the owner's fd itself (the owner lets go of it), and the
report line, written when uvloop is done, has the addresses and the reason
but no byte counts (the kernel's went with the fd).
"""

from __future__ import annotations

import errno
import os
import socket as _std
import weakref
from typing import Any, Callable, Optional

from .. import socket as _ss
from .._tcpinfo import tcp_counts

__all__ = ["Handoff", "handoff"]

#: The stdlib's class (``detach`` of the owner without shrimpio's own, which
#: is for fds that leave shrimpio's hands: this one stays in them).
_StdSocket = _ss.StdSocket

class Handoff(_std.socket):
    """The socket object uvloop gets for a connection a shrimpio socket
    owns: its ``detach()`` (uvloop's last call, after it closed the fd)
    ends the owner too."""

    __slots__ = ("_owner", "_on_end", "_active", "_given")

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
            if self._given:
                _report_given(owner)
            else:
                end(owner, self._active)
        if on_end is not None:
            on_end()


def handoff(owner: Any, on_end: Optional[Callable[[], None]] = None, *,
            active: bool = True) -> Handoff:
    """A :class:`Handoff` for ``owner`` (a connected shrimpio socket that
    took TCP); ``on_end`` runs when uvloop is done with it; ``active``: the
    connection was made by ``connect`` here (False: accepted)."""
    try:
        # Kept for the report: once the peer has closed, the kernel may no
        # longer tell.
        owner._peer = owner.getpeername()
    except OSError:
        pass
    try:
        fd, given = os.dup(owner.fileno()), False
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        # No fd to spare: uvloop gets the owner's own (see the module docstring).
        try:
            owner._local = owner.getsockname()
        except OSError:
            pass
        fd, given = _StdSocket.detach(owner), True
    sock = Handoff(owner.family, owner.type, owner.proto, fileno=fd)
    sock._owner = owner
    sock._on_end = on_end
    sock._active = active
    sock._given = given
    sock.setblocking(False)
    _handed.add(sock)
    # (Under the patch this class derives from shrimpio's, as uvloop's
    # socket.socket does: the owner writes the line, not this copy.)
    _ss._reportable.discard(sock)
    return sock


# Handoffs uvloop still holds: at exit, the owners of those still open take
# their byte counts from the kernel for their report lines.
_handed: "weakref.WeakSet[Handoff]" = weakref.WeakSet()


def _counts_at_exit() -> None:
    for sock in list(_handed):
        owner = sock._owner
        if owner is not None and sock._given and sock.fileno() >= 0:
            _report_given(owner, tcp_counts(sock, sock._active), open_at_exit=True)
        elif owner is not None and owner.fileno() >= 0:
            counts = tcp_counts(owner, sock._active)
            if counts is not None:
                owner._sent, owner._received = counts


def _info_of_fd(fd: int) -> Optional[dict]:
    """shrimpio.info() of uvloop's side of a handed-off connection (its
    transport's ``get_extra_info("socket")`` is on the handoff's fd): the
    owner's, with the byte counts the kernel kept."""
    for sock in list(_handed):
        owner = sock._owner
        if owner is not None and sock.fileno() == fd and (sock._given or owner.fileno() >= 0):
            out = _ss.info(owner)
            counts = tcp_counts(sock if sock._given else owner, sock._active)
            if counts is not None:
                out.update(bytes_sent=counts[0], bytes_received=counts[1])
            return out
    return None


_ss.report_exit_hooks.append(_counts_at_exit)
_ss.info_fd_hooks.append(_info_of_fd)


def _report_given(owner: Any, counts: Optional[tuple[int, int]] = None,
                  open_at_exit: bool = False) -> None:
    """The report line of an owner whose fd uvloop took (see handoff):
    written here, as its close has no fd to report on."""
    if not _ss._report_wanted() or not owner._peer or (_ss._reported_at_exit() and not open_at_exit):
        return                      # (nothing to say, or said at exit already)
    from .._report import connection_closing
    record = _ss.info(owner)
    record.update(local=owner._local, peer=owner._peer)
    if counts is not None:
        record.update(bytes_sent=counts[0], bytes_received=counts[1])
    else:
        record.update(bytes_sent=None, bytes_received=None)     # (the kernel's went with the fd)
    if open_at_exit:
        record["open_at_exit"] = True
    connection_closing(record)


def end(owner: Any, active: bool = True) -> None:
    """Close a handed-off shrimpio socket, with uvloop's byte counts."""
    if owner.fileno() >= 0:
        counts = tcp_counts(owner, active)
        if counts is not None:
            owner._sent, owner._received = counts
    owner.close()
