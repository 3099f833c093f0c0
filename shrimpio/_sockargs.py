"""The shared-memory half of the socket calls whose arguments say more than
the data path: options and the message calls.

Theory of operation
-------------------
Over shared memory every call must raise what the stdlib raises, exception
type and errno alike (the conformance suite compares a table of them).
Rather than copy the stdlib's and the kernel's rules:

* ``setsockopt`` of anything but a plain int flag or size is first made on
  a fresh kernel TCP socket of the same family, which refuses what a real
  connection would (bad level or name, a value of the wrong type or size);
  the value is then kept as the kernel reads it back (normalised: a flag
  as 0 or 1, TOS without its ECN bits).  ``getsockopt`` answers the values
  the connection defines (type, error, the rings' sizes...) and those set;
  any other, and any ``buflen``, goes to such a socket too (a never-set
  option reads as on a fresh one; ``TCP_INFO`` with the state ESTABLISHED).
  The kernel socket costs three system calls, only on those paths.
* The message calls check their arguments in the stdlib's order, then do
  what one ``recv`` would (``recvmsg_into`` scatters); flags are checked in
  ``_fastpath`` (``check_recvmsg_flags``), with the data path's.
"""

from __future__ import annotations

import operator
import socket as _std
import struct
from typing import Any

from ._fastpath import check_recvmsg_flags

__all__ = ["NOARG", "getsockopt", "index_arg", "recvmsg", "recvmsg_into", "setsockopt"]

StdSocket = _std.socket
_STREAM = int(_std.SOCK_STREAM)
_MSG_PEEK, _MSG_WAITALL = int(_std.MSG_PEEK), int(_std.MSG_WAITALL)
_MSG_DONTWAIT = int(_std.MSG_DONTWAIT)

#: An argument not given (``None`` given is an error for the stdlib).
NOARG: Any = object()

# SOL_SOCKET options whose value is a struct (its size), not an int: read
# with a buflen, an unset one is that many zero bytes, as from the kernel.
_STRUCT_OPTS = {_std.SO_LINGER: struct.calcsize("ii"),
                _std.SO_RCVTIMEO: struct.calcsize("ll"),
                _std.SO_SNDTIMEO: struct.calcsize("ll")}
# Options whose value is a plain int (flags and sizes): a setsockopt of one
# with an int in C range needs no kernel opinion.
_INT_OPTS = frozenset(
    [(_std.SOL_SOCKET, o) for o in (_std.SO_KEEPALIVE, _std.SO_REUSEADDR, _std.SO_SNDBUF,
                                    _std.SO_RCVBUF, _std.SO_OOBINLINE,
                                    getattr(_std, "SO_REUSEPORT", _std.SO_REUSEADDR))]
    + [(_std.IPPROTO_TCP, _std.TCP_NODELAY)])
_BOOL_OPTS = _INT_OPTS - {(_std.SOL_SOCKET, _std.SO_SNDBUF), (_std.SOL_SOCKET, _std.SO_RCVBUF)}
# SOL_SOCKET options whose value the connection defines.
_CONN_OPTS = frozenset(o for o in (_std.SO_TYPE, _std.SO_ERROR, _std.SO_SNDBUF, _std.SO_RCVBUF,
                                   _std.SO_ACCEPTCONN, getattr(_std, "SO_DOMAIN", None),
                                   getattr(_std, "SO_PROTOCOL", None)) if o is not None)
_TCP_INFO = (_std.IPPROTO_TCP, getattr(_std, "TCP_INFO", -100))
_TCP_ESTABLISHED = 1


def index_arg(value: Any) -> int:
    """An integer argument as the socket module takes it (``__index__``;
    TypeError for a float)."""
    return value if type(value) is int else operator.index(value)


# -- options ------------------------------------------------------------------------

def setsockopt(sock: Any, level: int, optname: int, value: Any, optlen: Any) -> None:
    """Record an option on shrimpio socket ``sock`` (a connection), as the
    kernel would take it."""
    key = (level, optname)
    if optlen is NOARG and type(value) is int and key in _INT_OPTS \
            and -0x80000000 <= value <= 0x7fffffff:
        sock._opts[key] = (1 if value else 0) if key in _BOOL_OPTS else value
        return
    with StdSocket(sock.family, _STREAM) as shadow:
        if optlen is NOARG:
            StdSocket.setsockopt(shadow, level, optname, value)
        else:
            StdSocket.setsockopt(shadow, level, optname, value, optlen)
        raw = isinstance(value, (bytes, bytearray, memoryview))
        try:
            if raw:
                # Kept whole: struct options (SO_LINGER, ...) read back with
                # a buflen as the bytes that were set.
                stored: Any = StdSocket.getsockopt(shadow, level, optname,
                                                   max(1, min(1024, memoryview(value).nbytes)))
            else:
                stored = StdSocket.getsockopt(shadow, level, optname)
        except OSError:             # a write-only option: as it was given
            stored = bytes(value) if raw else (0 if value is None else int(value))
    sock._opts[key] = stored


def getsockopt(sock: Any, conn: Any, level: int, optname: int, buflen: Any) -> Any:
    """An option of shrimpio socket ``sock`` (a connection, ``conn``)."""
    key = (level, optname)
    opts = sock._opts
    known = key in opts or (level == _std.SOL_SOCKET and optname in _CONN_OPTS)
    if buflen is not NOARG or not known:
        with StdSocket(sock.family, _STREAM) as shadow:
            if buflen is NOARG:
                kernel = StdSocket.getsockopt(shadow, level, optname)
            else:
                kernel = StdSocket.getsockopt(shadow, level, optname, buflen)
        if not known:
            if key == _TCP_INFO and isinstance(kernel, bytes) and kernel:
                kernel = bytes([_TCP_ESTABLISHED]) + kernel[1:]   # tcpi_state
            elif key == _TCP_INFO and isinstance(kernel, int):
                kernel = (kernel & ~0xFF) | _TCP_ESTABLISHED
            return kernel
    value = opts.get(key, 0)
    raw = None
    if key not in opts and level == _std.SOL_SOCKET and optname in _STRUCT_OPTS:
        raw = bytes(_STRUCT_OPTS[optname])     # unset struct option: zeros of its size
    if isinstance(value, bytes):
        raw = value
        value = struct.unpack("i", raw[:4].ljust(4, b"\0"))[0]
    if level == _std.SOL_SOCKET:
        value = {
            _std.SO_TYPE: _STREAM,
            _std.SO_ERROR: 0,
            _std.SO_SNDBUF: conn.tx.capacity,
            _std.SO_RCVBUF: conn.rx.capacity,
            _std.SO_ACCEPTCONN: 0,
            getattr(_std, "SO_DOMAIN", -100): sock.family,
            getattr(_std, "SO_PROTOCOL", -100): _std.IPPROTO_TCP,
        }.get(optname, value)
    if buflen is NOARG or not buflen:      # 0 too: an int, as the stdlib
        return value
    if raw is not None and value == struct.unpack("i", raw[:4].ljust(4, b"\0"))[0]:
        return raw[:buflen]
    return struct.pack("i", value)[:buflen].ljust(min(buflen, 4), b"\0")


# -- message calls --------------------------------------------------------------------

def _ancbufsize_check(ancbufsize: Any) -> None:
    """recvmsg's ancillary buffer size, checked as the stdlib does (none is
    ever used over shared memory)."""
    n = index_arg(ancbufsize)
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("Python int too large to convert to C ssize_t")
    if not 0 <= n <= 0x7FFFFFFF:
        raise ValueError("invalid ancillary data buffer length")


def _await_readable(sock: Any, conn: Any, flags: int) -> None:
    """What an empty recvmsg does on TCP (unlike an empty recv, which
    CPython answers at once): wait as a read would, consume nothing."""
    conn.stream.recv(1, flags | _MSG_PEEK, sock.gettimeout())


def recvmsg(sock: Any, conn: Any, bufsize: Any, ancbufsize: Any, flags: Any) -> tuple:
    """``socket.recvmsg`` over shared memory."""
    bufsize = index_arg(bufsize)
    _ancbufsize_check(ancbufsize)
    flags = check_recvmsg_flags(flags)
    if bufsize < 0:
        raise ValueError("negative buffer size in recvmsg()")
    if bufsize == 0:
        _await_readable(sock, conn, flags)
        return b"", [], 0, None
    return sock.recv(bufsize, flags), [], 0, None


def recvmsg_into(sock: Any, conn: Any, buffers: Any, ancbufsize: Any, flags: Any) -> tuple:
    """``socket.recvmsg_into`` over shared memory."""
    try:
        items = iter(buffers)
    except TypeError:
        raise TypeError("recvmsg_into() argument 1 must be an iterable") from None
    views = []
    try:
        for item in items:
            try:
                view = memoryview(item)
            except TypeError:
                view = None
            if view is None or view.readonly or not view.contiguous:
                raise TypeError("recvmsg_into() argument 1 must be an iterable of "
                                "single-segment read-write buffers")
            views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        _ancbufsize_check(ancbufsize)
        flags = check_recvmsg_flags(flags)
        return _scatter(sock, conn, views, flags), [], 0, None
    finally:
        for view in views:
            view.release()


def _scatter(sock: Any, conn: Any, views: list, flags: int) -> int:
    """Fill ``views`` in turn as one ``recv`` fills one buffer: wait (per
    the timeout and flags) for the first bytes only, then take what is
    there (all of it with MSG_WAITALL)."""
    views = [v for v in views if len(v)]
    total = sum(len(v) for v in views)
    if total == 0:
        _await_readable(sock, conn, flags)
        return 0
    timeout = sock.gettimeout()
    stream = conn.stream
    if flags & _MSG_PEEK:
        data = stream.recv(total, flags, timeout)
        at = 0
        for v in views:
            piece = data[at:at + len(v)]
            v[:len(piece)] = piece
            at += len(piece)
        return len(data)
    got = 0
    for i, v in enumerate(views):
        if i == 0 or flags & _MSG_WAITALL:
            n = stream.recv_into(v, 0, flags, timeout)
        else:
            avail = conn.rx.readable()
            if not avail:
                break
            n = stream.recv_into(v, min(avail, len(v)), flags | _MSG_DONTWAIT, 0.0)
        got += n
        if n < len(v):
            break
    return got
