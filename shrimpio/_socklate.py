"""The client's half of the late fallback: a shared-memory connect that the
listener, short of fds, sent to kernel TCP after the client's ``connect()``
had returned.

Theory of operation
-------------------
(docs/control-plane.md, "Connection set-up", has the whole picture; the
listener's half is :func:`shrimpio._accept.refuse`.)

A client's ``connect()`` returns once its hello is queued; the listener
takes it later.  One that has no room for the hello's fds answers with a
refusal and closes the client's control socket, without ever reading the
rings.  The client finds out when it finds its peer gone (a read that
would return end of file or raise, a write that fails); the socket's data
calls then ask :func:`late_fallback`, which

* takes the refusal (:meth:`Connection.refused`: none, and the peer's
  death is what the call reports, as before);
* reads back what the program wrote into the ring (the listener never read
  a byte of it) and whether it shut its writing side;
* closes the connection, makes a kernel TCP socket bound to the local
  address the program was told (so that ``getsockname()`` stays true and the
  listener knows the client again, to report the same reason), connects it
  to the listener's TCP address, and sends those bytes first;
* puts it on the program's fd number (``dup2``; a patched epoll is told), so
  the socket object is a kernel TCP socket from then on, with the
  refusal's reason (``"fd limit"``) in ``shrimpio.info`` and the report.

The call that found the refusal is then made again on the kernel socket.
Nothing the program wrote is lost, nor read twice: the kernel connection
starts with exactly those bytes.
"""

from __future__ import annotations

import errno
import os
import socket as _std
import _socket as _csocket
from typing import Any

from . import _route, _stat
from ._connection import Connection
from ._sockindex import by_fd, fd_change_hooks, fd_changing

__all__ = ["late_fallback", "LATE_ERRNOS"]

#: What a failed call on a refused connection raises (the peer looks gone).
LATE_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
#: Longest the TCP connect and the sending of what was written may take
#: when the socket itself has no timeout (loopback, to a live listener:
#: at once, unless its backlog is full or it does not read).
REPLAY_TIMEOUT = 10.0

_SOCK_STREAM = int(_std.SOCK_STREAM)
_SOL_SOCKET, _SO_REUSEADDR = int(_std.SOL_SOCKET), int(_std.SO_REUSEADDR)


def late_fallback(sock: Any, conn: Connection) -> bool:
    """If the listener refused ``conn`` (``sock``'s connection), move
    ``sock`` onto a kernel TCP connection to it: True, and the caller makes
    its call again.  False: no refusal (the peer is really gone), or the
    TCP connect failed too (the listener is gone: the caller reports what
    it found, the connection reset)."""
    if sock._shm is not conn:
        return False
    reason = conn.refused()
    if reason is None:
        return False
    fd = sock.fileno()
    if fd_change_hooks:
        # A patched epoll lets go of the connection while it is still one
        # (it finds the fd's new file at its next poll).
        fd_changing(fd)
    timeout = sock.gettimeout()
    pending, shut = conn.unsent()
    local, peer = conn.local, conn.peer
    sent, received = conn.bytes_sent, conn.bytes_received
    # The connection goes first: its space socket's fd is then free for the
    # TCP socket (the process may be short of fds too).
    sock._shm = None
    conn.release()
    tcp = _csocket.socket(sock.family, _SOCK_STREAM, sock.proto)
    try:
        try:
            tcp.setsockopt(_SOL_SOCKET, _SO_REUSEADDR, 1)
            tcp.bind(local)           # the address the program (and the listener) know
        except OSError:
            pass                      # taken meanwhile: any, then
        tcp.settimeout(timeout if timeout else REPLAY_TIMEOUT)
        tcp.connect(peer)
        if pending:
            tcp.sendall(pending)
        if shut:
            tcp.shutdown(_std.SHUT_WR)
        os.dup2(tcp.fileno(), fd, inheritable=False)
    except OSError:
        tcp.close()
        sock._route = _route.Route(_route.TCP, reason)
        sock._local, sock._peer = local, peer
        return False
    tcp.close()
    if by_fd.get(fd) is sock:
        del by_fd[fd]
    sock._route = _route.Route(_route.TCP, reason)
    sock._local, sock._peer = local, peer
    sock._sent, sock._received = sent, received
    sock.settimeout(timeout)          # (O_NONBLOCK is the old file's)
    _stat.track_tcp(sock, reason)
    return True
