"""The shrimpio loop's ``sock_*`` calls, ``sendfile`` and ``sock_sendfile``.

A shrimpio socket over shared memory is served by its rings, with the waits
of :mod:`._watch`; every other socket goes to uvloop.

Theory of operation: stdlib sockets
-----------------------------------
Libraries that make their own sockets (aiohttp's happy eyeballs) hand the
loop a *stdlib* ``socket.socket`` to ``sock_connect`` and then to
``create_connection(sock=…)``; the shrimpio loop should not need the patch for
them.  Such a socket cannot become a shrimpio socket (its class is fixed), so
``sock_connect`` connects a *twin*: a shrimpio socket on a duplicate of its
fd, which does the hand-shake (its own fd number then carries the control
socket).  The caller's fd stays what it was, a TCP socket that is bound but
not connected: code that bypasses the loop (``sock.send``, ``sock.recv``)
gets an error (``EPIPE``, ``ENOTCONN``), never the control socket's bytes.
Every call of the loop given that socket object, or its fd, uses the twin:
``sock_recv``, ``sock_recv_into``, ``sock_sendall``, ``sock_sendfile``,
``add_reader``/``add_writer``, and ``create_connection(sock=…)`` /
``connect_accepted_socket``, which adopt the twin and close the caller's fd.
The twin is closed when its socket object is closed (seen by the loop's next
socket call, or a check every quarter second while twins exist) or collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import socket as _std
import stat
import weakref
from typing import Any, Optional

from .. import _socklate
from .. import socket as _ss
from .._handshake import late_hellos
from ..socket import StdSocket, socket as ShmSocket
from . import _watch
from ._transport import ShmTransport

__all__ = ["SockMixin", "twin_of", "take_twin", "is_shm", "plain_tcp"]

_SWEEP_EVERY = 0.25
_SENDFILE_CHUNK = 256 * 1024


def is_shm(sock: Any) -> bool:
    return isinstance(sock, ShmSocket) and sock._shm is not None


def plain_tcp(sock: Any) -> bool:
    """A stdlib (not shrimpio) TCP socket with an open fd."""
    return (isinstance(sock, StdSocket) and not isinstance(sock, ShmSocket)
            and sock.family in (_std.AF_INET, _std.AF_INET6)
            and sock.type & 0xF == _std.SOCK_STREAM and sock.fileno() >= 0)


# ---------------------------------------------------------------------------
# Twins of stdlib sockets


class _Twin:
    __slots__ = ("ref", "twin", "fd", "inode", "finalizer")


_twins: "dict[int, _Twin]" = {}           # id(stdlib socket object) -> its twin
_twin_reasons: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _connect_twin(sock: Any, address: Any) -> bool:
    """Connect a stdlib socket's twin over shared memory if the route
    allows; False (the reason kept for the report) to take TCP."""
    twin = ShmSocket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    try:
        twin.setblocking(False)
        ok = twin._try_shm(address)
    except BaseException:
        twin.close()
        raise
    if not ok:
        _twin_reasons[sock] = twin._route
        twin.close()
        return False
    t = _Twin()
    t.ref = weakref.ref(sock)
    t.twin = twin
    t.fd = sock.fileno()
    t.inode = _ss._inode(t.fd)
    t.finalizer = weakref.finalize(sock, _twin_collected, id(sock), t)
    _twins[id(sock)] = t
    return True


def _twin_collected(key: int, t: _Twin) -> None:
    if _twins.get(key) is t:
        del _twins[key]
    t.twin.close()


def _still_open(t: _Twin) -> bool:
    """Is the caller's fd still open (held by its object, or detached and
    held elsewhere)?"""
    sock = t.ref()
    if sock is not None and sock.fileno() == t.fd:
        return True
    try:
        return _ss._inode(t.fd) == t.inode
    except OSError:
        return False


def sweep() -> bool:
    """Close the twins whose stdlib socket was closed; True if twins remain."""
    for key, t in list(_twins.items()):
        if not _still_open(t):
            _twins.pop(key, None)
            t.finalizer.detach()
            t.twin.close()
    return bool(_twins)


def twin_of(obj: Any, fd: Optional[int] = None) -> Optional[ShmSocket]:
    """The twin of a stdlib socket object (or of an fd number) connected by
    ``sock_connect``, if it is one."""
    if not _twins:
        return None
    t = _twins.get(id(obj))
    if t is not None and t.ref() is obj and obj.fileno() == t.fd:
        return t.twin
    if fd is None:
        try:
            fd = obj.fileno() if not isinstance(obj, int) else obj
        except (AttributeError, OSError, ValueError):
            return None
    if fd < 0:
        return None
    for t in _twins.values():
        if t.fd == fd:
            try:
                same = _ss._inode(fd) == t.inode
            except OSError:
                same = False
            return t.twin if same else None
    return None


def take_twin(sock: Any) -> Optional[ShmSocket]:
    """Adopt a stdlib socket's twin (create_connection(sock=…)): the caller's
    object is detached and its fd closed; the twin is the connection now."""
    twin = twin_of(sock)
    if twin is None:
        return None
    for key, t in list(_twins.items()):
        if t.twin is twin:
            del _twins[key]
            t.finalizer.detach()
    os.close(sock.detach())
    return twin


def tcp_reason(sock: Any) -> Any:
    """Why a stdlib socket that ``sock_connect`` connected took TCP (a Route), if known."""
    return _twin_reasons.get(sock)


# ---------------------------------------------------------------------------
# The loop's calls


class SockMixin:
    """``sock_*`` and sendfile of the shrimpio loop (mixed into ``Loop``)."""

    _twin_timer: Optional[asyncio.TimerHandle] = None

    def _shm_sock(self, sock: Any) -> Optional[ShmSocket]:
        """The shrimpio socket whose rings serve ``sock``, if any (checks,
        as uvloop, that the socket is non-blocking in debug mode)."""
        if is_shm(sock):
            target = sock
        elif _twins and isinstance(sock, StdSocket):
            target = twin_of(sock)
            if target is None:
                return None
        else:
            return None
        if self.get_debug() and sock.gettimeout() != 0:      # type: ignore[attr-defined]
            raise ValueError("the socket must be non-blocking")
        return target

    async def _settled_shm(self, sock: Any) -> Optional[ShmSocket]:
        """``_shm_sock``, for a socket connected by its own ``connect()``
        once the listener has taken its hello (None if the listener sent
        it to TCP meanwhile: it is a kernel socket now; see
        ``_socklate.settled``)."""
        shm = self._shm_sock(sock)
        if shm is not None and shm._shm in late_hellos and not await _socklate.settled(shm):
            return None
        return shm

    async def sock_recv(self, sock: Any, n: int) -> bytes:
        shm = await self._settled_shm(sock)
        if shm is None:
            return await super().sock_recv(sock, n)          # type: ignore[misc]
        while True:
            conn = _conn(shm)
            try:
                return conn.stream.recv(n, 0, 0.0)
            except BlockingIOError:
                if conn.gone:
                    return b""
            await _watch.wait(self, shm, False)

    async def sock_recv_into(self, sock: Any, buf: Any) -> int:
        shm = await self._settled_shm(sock)
        if shm is None:
            return await super().sock_recv_into(sock, buf)   # type: ignore[misc]
        while True:
            conn = _conn(shm)
            try:
                return conn.stream.recv_into(buf, 0, 0, 0.0)
            except BlockingIOError:
                if conn.gone:
                    return 0
            await _watch.wait(self, shm, False)

    async def sock_sendall(self, sock: Any, data: Any) -> None:
        shm = await self._settled_shm(sock)
        if shm is None:
            return await super().sock_sendall(sock, data)    # type: ignore[misc]
        await self._sendall_shm(shm, memoryview(data).cast("B"))

    async def _sendall_shm(self, shm: ShmSocket, view: memoryview) -> None:
        while view:
            conn = _conn(shm)
            try:
                n = conn.stream.send(view, 0, 0.0)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                if n == 0 and conn.gone:
                    # The peer died without shutting the ring: no room will
                    # ever come.  EPIPE, as TCP after a reset.
                    raise BrokenPipeError(errno.EPIPE, "Broken pipe")
                await _watch.wait(self, shm, True)

    async def sock_connect(self, sock: Any, address: Any) -> None:
        if isinstance(sock, ShmSocket) and sock._is_tcp() and sock._shm is None and sock._lst is None:
            if self.get_debug() and sock.gettimeout() != 0:  # type: ignore[attr-defined]
                raise ValueError("the socket must be non-blocking")
            if sock._try_shm(address):
                self._now_shm(sock)                          # type: ignore[attr-defined]
                return
        elif plain_tcp(sock) and twin_of(sock) is None:
            if self.get_debug() and sock.gettimeout() != 0:  # type: ignore[attr-defined]
                raise ValueError("the socket must be non-blocking")
            sweep()
            if _connect_twin(sock, address):
                self._sweep_later()
                return
        return await super().sock_connect(sock, address)     # type: ignore[misc]

    def _sweep_later(self) -> None:
        if self._twin_timer is None:
            self._twin_timer = self.call_later(_SWEEP_EVERY, self._sweep_twins)  # type: ignore[attr-defined]

    def _sweep_twins(self) -> None:
        self._twin_timer = None
        if sweep():
            self._sweep_later()

    async def sock_accept(self, sock: Any) -> tuple:
        if not isinstance(sock, ShmSocket) or sock._lst is None:
            return await super().sock_accept(sock)           # type: ignore[misc]
        if self.get_debug() and sock.gettimeout() != 0:      # type: ignore[attr-defined]
            raise ValueError("the socket must be non-blocking")
        while True:
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
                return conn, addr
            except BlockingIOError:
                pass
            await _watch.wait(self, sock, False)

    # -- sendfile ------------------------------------------------------------

    async def sock_sendfile(self, sock: Any, file: Any, offset: int = 0,
                            count: Optional[int] = None, *, fallback: bool = True) -> int:
        """As asyncio's: every byte of the file from ``offset`` (``count``
        of them, or to its end); the file position is left after the last
        byte sent.  A shared-memory socket gets the file copied into its
        ring; others by reads and ``sock_sendall`` (uvloop has no sendfile)."""
        if self.get_debug() and sock.gettimeout() != 0:      # type: ignore[attr-defined]
            raise ValueError("the socket must be non-blocking")
        _check_sendfile_params(sock, file, offset, count)
        shm = self._shm_sock(sock)
        if shm is None and not fallback:
            raise asyncio.SendfileNotAvailableError(
                f"syscall sendfile is not available for socket {sock!r} and file {file!r} combination")
        total = 0
        try:
            async with contextlib.aclosing(_file_chunks(file, offset, count)) as chunks:
                async for view in chunks:
                    if shm is not None:
                        await self._sendall_shm(shm, view)
                    else:
                        await self.sock_sendall(sock, view)
                    total += len(view)
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)

    async def sendfile(self, transport: Any, file: Any, offset: int = 0,
                       count: Optional[int] = None, *, fallback: bool = True) -> int:
        """As asyncio's, on every transport of this loop (uvloop has no
        sendfile): the file is copied into the transport, by its own writes
        (into the ring, for a shared-memory transport), with flow control."""
        if transport.is_closing():
            raise RuntimeError("Transport is closing")
        _check_sendfile_params(None, file, offset, count)
        total = 0
        proto = _SendfileProtocol(self, transport)
        shm = isinstance(transport, ShmTransport)
        try:
            async with contextlib.aclosing(_file_chunks(file, offset, count)) as chunks:
                async for view in chunks:
                    await proto.drain()
                    # A shared-memory transport copies at once; uvloop's may
                    # keep the object until it is written: give it its own bytes.
                    transport.write(view if shm else bytes(view))
                    total += len(view)
            await proto.drain()
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)
            proto.restore()


def _conn(shm: ShmSocket) -> Any:
    conn = shm._shm
    if conn is None or conn.closed:
        raise OSError(errno.EBADF, "Bad file descriptor")
    return conn


def _check_sendfile_params(sock: Any, file: Any, offset: Any, count: Any) -> None:
    # asyncio's checks and messages.
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if sock is not None and not sock.type == _std.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")


async def _file_chunks(file: Any, offset: int, count: Optional[int]) -> Any:
    """The file's bytes from ``offset`` (``count`` of them, or to its end),
    as views: straight over a mapping of a regular file (the ring copy is
    then the only one), else read into a buffer."""
    end = None if count is None else offset + count
    mapped = _map(file, offset)
    if mapped is not None:
        size = len(mapped)
        stop = size if end is None else min(end, size)
        # (Not closed here: the caller may still hold the last view; the
        # mapping goes with the last reference.)
        view = memoryview(mapped)
        pos = offset
        while pos < stop:
            n = min(_SENDFILE_CHUNK, stop - pos)
            yield view[pos:pos + n]
            pos += n
        return
    if offset:
        file.seek(offset)
    buf = bytearray(_SENDFILE_CHUNK if count is None else min(count, _SENDFILE_CHUNK))
    pos = offset
    while end is None or pos < end:
        want = len(buf) if end is None else min(len(buf), end - pos)
        n = file.readinto(memoryview(buf)[:want])
        if not n:
            return
        yield memoryview(buf)[:n]
        pos += n


def _map(file: Any, offset: int) -> Optional[mmap.mmap]:
    try:
        fd = file.fileno()
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size <= offset:
        return None
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


class _SendfileProtocol(asyncio.Protocol):
    """Stands in for a transport's protocol while ``sendfile`` writes (as
    asyncio's fallback does): reading is paused, and ``pause_writing`` /
    ``resume_writing`` gate the writes."""

    def __init__(self, loop: Any, transport: Any) -> None:
        self._loop = loop
        self._transport = transport
        self._proto = transport.get_protocol()
        self._resume_reading = transport.is_reading()
        self._resume_writing = bool(getattr(transport, "_protocol_paused", False))
        transport.pause_reading()
        transport.set_protocol(self)
        self._ready: Optional[asyncio.Future] = loop.create_future() if self._resume_writing else None

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("Connection closed by peer")
        if self._ready is not None:
            await self._ready

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc or ConnectionError("Connection is closed by peer"))
        self._proto.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._ready is None:
            self._ready = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._ready is not None:
            if not self._ready.done():
                self._ready.set_result(None)
            self._ready = None

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("Invalid state: reading should be paused")

    def eof_received(self) -> None:
        raise RuntimeError("Invalid state: reading should be paused")

    def restore(self) -> None:
        self._transport.set_protocol(self._proto)
        if self._resume_reading:
            self._transport.resume_reading()
        if self._ready is not None:
            self._ready.cancel()
            self._ready = None
        if self._resume_writing:
            self._proto.resume_writing()
