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
* ``sendmsg`` with ancillary data or an address parses them as the stdlib
  does, then answers as Linux TCP does: the address of a connected stream
  is ignored, and so are ancillary items of any level but ``SOL_SOCKET``;
  of those, ``SCM_RIGHTS`` and ``SCM_CREDENTIALS`` are accepted and ignored
  (TCP carries no fds: none leaves the process), ``SO_MARK`` (privileged)
  and ``SO_TIMESTAMPING`` (transmit flags) are accepted, and anything else
  is ``EINVAL``.  An address is parsed by ``connect`` on a fresh UDP socket
  (no packet is sent), so that its errors are the stdlib's.
"""

from __future__ import annotations

import errno
import operator
import socket as _std
import struct
import sys
from typing import Any

from ._fastpath import check_recvmsg_flags

__all__ = ["NOARG", "c_int_arg", "getsockopt", "index_arg", "recvmsg", "recvmsg_into", "sendmsg",
           "setsockopt"]

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
# sendmsg: the SOL_SOCKET ancillary items Linux TCP accepts (see sendmsg).
_SOL_SOCKET = int(_std.SOL_SOCKET)
_SCM_IGNORED = (int(_std.SCM_RIGHTS), int(getattr(_std, "SCM_CREDENTIALS", 2)))
_SO_MARK = int(getattr(_std, "SO_MARK", 36))
_SO_TIMESTAMPING = (37, 65)             # SO_TIMESTAMPING_OLD, SO_TIMESTAMPING_NEW
_TX_RECORD_MASK = 0x303                 # SOF_TIMESTAMPING_TX_{HARDWARE,SOFTWARE,SCHED,ACK}
_SO_TXTIME = int(getattr(_std, "SO_TXTIME", 61))   # its item (SCM_TXTIME): only if the option is set
_MSG_CMSG_COMPAT = -0x80000000
_MSG_FASTOPEN = int(getattr(_std, "MSG_FASTOPEN", 0x20000000))
_TCP_ESTABLISHED = 1


def index_arg(value: Any) -> int:
    """An integer argument as the socket module takes it (``__index__``;
    TypeError for a float)."""
    return value if type(value) is int else operator.index(value)


def c_int_arg(value: Any) -> int:
    """An argument the socket module converts to a C ``int`` (``shutdown``'s
    ``how``...): ``index_arg``, and OverflowError outside the C range."""
    value = index_arg(value)
    if not -0x80000000 <= value <= 0x7FFFFFFF:
        raise OverflowError("Python int too large to convert to C int")
    return value


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
            getattr(_std, "SO_DOMAIN", -100): int(sock.family),     # an int, not the enum
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


def address_check(sock: Any, address: Any, call: str) -> None:
    """Parse ``address`` as the stdlib would for ``call`` on ``sock`` (a
    connected stream, which then ignores it): the same TypeError,
    OverflowError or ``gaierror``.  Only the type is checked here; the rest
    by ``connect`` on a fresh UDP socket of the family (which sends
    nothing; whether it could reach the address does not matter)."""
    if not isinstance(address, tuple):
        raise TypeError(f"{call}(): AF_INET{'6' if sock.family == _std.AF_INET6 else ''} "
                        f"address must be tuple, not {type(address).__name__}")
    with StdSocket(sock.family, _std.SOCK_DGRAM) as shadow:
        try:
            StdSocket.connect(shadow, address)
        except _std.gaierror:
            raise
        except OSError:
            pass


def _c_int(value: Any) -> int:
    """An argument CPython parses with the ``i`` format (sendmsg's flags,
    an ancillary item's level and type)."""
    value = index_arg(value)
    if value > 0x7FFFFFFF:
        raise OverflowError("signed integer is greater than maximum")
    if value < -0x80000000:
        raise OverflowError("signed integer is less than minimum")
    return value


def _cmsg_items(ancdata: Any) -> list:
    """sendmsg's ancillary data as ``(level, type, memoryview)``, with the
    stdlib's errors."""
    try:
        items = list(ancdata)
    except TypeError:
        raise TypeError("sendmsg() argument 2 must be an iterable") from None
    where = "[sendmsg() ancillary data items]()"
    out = []
    for item in items:
        if isinstance(item, (bytes, dict)) or not hasattr(type(item), "__getitem__"):
            raise TypeError(f"{where} argument must be 3-item sequence, not {type(item).__name__}")
        if len(item) != 3:
            raise TypeError(f"{where} argument must be sequence of length 3, not {len(item)}")
        level, kind = _c_int(item[0]), _c_int(item[1])
        data = memoryview(item[2])
        if not data.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
        out.append((level, kind, data.cast("B") if data.ndim != 1 or data.format != "B" else data))
    return out


def _optmem_max() -> int:
    try:
        with open("/proc/sys/net/core/optmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 20480


def _may_mark(family: int) -> bool:
    """May this process set SO_MARK (CAP_NET_RAW or CAP_NET_ADMIN)?  The
    kernel says, on a fresh socket."""
    with StdSocket(family, _std.SOCK_STREAM) as shadow:
        try:
            StdSocket.setsockopt(shadow, _std.SOL_SOCKET, _SO_MARK, 0)
        except OSError:
            return False
    return True


def _cmsg_accepted(sock: Any, level: int, kind: int, data: memoryview) -> bool:
    """Does Linux TCP's sendmsg accept this ancillary item (and ignore it)?"""
    if level != _SOL_SOCKET or kind in _SCM_IGNORED:
        return True
    if kind == _SO_MARK:
        return len(data) == 4 and _may_mark(sock.family)
    if kind in _SO_TIMESTAMPING:
        return len(data) == 4 and not int.from_bytes(data, sys.byteorder) & ~_TX_RECORD_MASK
    if kind == _SO_TXTIME:
        return len(data) == 8 and bool(sock._opts.get((_SOL_SOCKET, _SO_TXTIME)))
    return False


def sendmsg(sock: Any, conn: Any, buffers: Any, ancdata: Any, flags: Any, address: Any) -> int:
    """``socket.sendmsg`` over shared memory with ancillary data or an
    address: checked in the stdlib's order (flags, address, buffers,
    ancillary items), then as Linux TCP (see the module docstring); the
    data goes as without them."""
    flags = _c_int(flags)
    if address is not None:
        address_check(sock, address, "sendmsg")
    try:
        bufs = list(buffers)
    except TypeError:
        raise TypeError("sendmsg() argument 1 must be an iterable") from None
    for buf in bufs:
        memoryview(buf).release()       # TypeError for what is not bytes-like
    items = _cmsg_items(ancdata)
    if flags & _MSG_CMSG_COMPAT:
        raise OSError(errno.EINVAL, "Invalid argument")
    if items and sum(_std.CMSG_SPACE(len(d)) for _, _, d in items) >= _optmem_max():
        raise OSError(errno.ENOBUFS, "No buffer space available")
    if flags & _MSG_FASTOPEN:
        raise OSError(errno.EISCONN, "Transport endpoint is already connected")
    for level, kind, data in items:
        if not _cmsg_accepted(sock, level, kind, data):
            raise OSError(errno.EINVAL, "Invalid argument")
    return conn.stream.sendmsg(bufs, flags, sock.gettimeout())
