"""The byte path under a channel: a shared-memory connection's rings, or a
kernel socket (another host, or a connection that fell back to TCP).

Both give the channel the same few calls: write a frame (gather), read
exactly n bytes into a buffer, try to read a header without waiting, wait
until something can be read.  Bytes read from the rings go straight into
the destination the channel chose (``read_into``): the only receiver-side
copy of an eager message's buffers.
"""

from __future__ import annotations

import select
import socket as _std
from typing import Any, Optional, Sequence

from . import _cma
from ._frame import HEADER

__all__ = ["RingWire", "SockWire", "wire_for"]

_HLEN = HEADER.size


class _Wire:
    shm = False
    bytes_in = 0
    bytes_out = 0

    def fileno(self) -> int:
        raise NotImplementedError

    def write(self, parts: Sequence[Any]) -> None:
        raise NotImplementedError

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` (waiting as needed); EOF in the middle is a reset."""
        raise NotImplementedError

    def try_header(self, buf: bytearray) -> Optional[bool]:
        """Read a header into ``buf`` if one has begun to arrive: True; None
        if nothing is there; False at end of stream."""
        raise NotImplementedError

    def wait_readable(self, timeout: Optional[float]) -> bool:
        raise NotImplementedError


class RingWire(_Wire):
    """A shared-memory connection: write into the peer's ring, read ours."""

    shm = True

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        conn = sock._shm
        self.conn = conn
        self.tx = conn.tx
        self.rx = conn.rx
        self.stream = conn.stream

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, parts: Sequence[Any]) -> None:
        n = self.tx.writev(parts, None, True)
        self.stream.bytes_sent += n
        self.bytes_out += n

    def read_into(self, view: memoryview) -> None:
        rx = self.rx
        got, want = 0, len(view)
        while got < want:
            n = rx.read_into(view[got:] if got else view, want - got, None)
            if n == 0:
                raise ConnectionResetError("the peer closed the channel in the middle of a message")
            got += n
        self.stream.bytes_received += want
        self.bytes_in += want

    def try_header(self, buf: bytearray) -> Optional[bool]:
        try:
            n = self.rx.read_into(buf, _HLEN, 0.0)
        except BlockingIOError:
            return None
        if n == 0:
            return False
        if n < _HLEN:
            self.stream.bytes_received += n
            self.bytes_in += n
            self.read_into(memoryview(buf)[n:])
            return True
        self.stream.bytes_received += n
        self.bytes_in += n
        return True

    def readable_now(self) -> bool:
        return self.rx.readable() > 0

    def wait_readable(self, timeout: Optional[float]) -> bool:
        return self.rx.wait_readable(timeout)


class SockWire(_Wire):
    """A kernel stream socket (blocking), with a small read-ahead buffer."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        sock.setblocking(True)
        try:
            sock.setsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY, 1)
        except OSError:
            pass
        self._buf = bytearray(65536)
        self._lo = self._hi = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, parts: Sequence[Any]) -> None:
        total = sum(memoryview(p).nbytes for p in parts)
        if total <= 65536:
            self.sock.sendall(b"".join(parts))
        else:
            for p in parts:
                self.sock.sendall(p)
        self.bytes_out += total

    def _fill(self, timeout: Optional[float]) -> int:
        if self._lo == self._hi:
            self._lo = self._hi = 0
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(memoryview(self._buf)[self._hi:])
        finally:
            self.sock.settimeout(None)
        self._hi += n
        return n

    def read_into(self, view: memoryview) -> None:
        got, want = 0, len(view)
        have = self._hi - self._lo
        if have:
            k = min(have, want)
            view[:k] = self._buf[self._lo:self._lo + k]
            self._lo += k
            got = k
        while got < want:
            if want - got >= 16384:
                n = self.sock.recv_into(view[got:])
            else:
                n = self._fill(None)
                if n:
                    k = min(n, want - got)
                    view[got:got + k] = self._buf[self._lo:self._lo + k]
                    self._lo += k
                    n = k
            if n == 0:
                raise ConnectionResetError("the peer closed the channel in the middle of a message")
            got += n
        self.bytes_in += want

    def try_header(self, buf: bytearray) -> Optional[bool]:
        if self._hi - self._lo == 0:
            try:
                if self._fill(0.0) == 0:
                    return False
            except (BlockingIOError, TimeoutError):
                return None
        self.read_into(memoryview(buf))
        return True

    def readable_now(self) -> bool:
        if self._hi > self._lo:
            return True
        r, _, _ = select.select([self.sock.fileno()], [], [], 0)
        return bool(r)

    def wait_readable(self, timeout: Optional[float]) -> bool:
        if self._hi > self._lo:
            return True
        r, _, _ = select.select([self.sock.fileno()], [], [], timeout)
        return bool(r)


def wire_for(sock: Any) -> _Wire:
    if getattr(sock, "_shm", None) is not None:
        return RingWire(sock)
    return SockWire(sock)


def copy_in(dest: memoryview, src: Any) -> None:
    """A receiver-side copy from our queue into a posted buffer (counted)."""
    dest[:] = src
    _cma.stats["received_copied"] += len(dest)
