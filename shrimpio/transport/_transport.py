"""The asyncio transport of a shared-memory connection.

Theory of operation
-------------------
The transport drives the same :class:`~shrimpio._fastpath.Stream` as the
blocking socket (never a copy of its logic), with timeout ``0`` only.

Reading is in C (``TransportCore`` and the loop's ``LoopPoller`` in
``_fastpath_transport.pxi``, where the theory of the polling is): one poller
per loop reads every busy ring in one callback turn, keeps polling for the
busy-poll budget after the loop's last traffic, then *arms* the ring
(reader-sleeping flag, fence, re-check) and leaves the wake-up to the loop's
reader on the data doorbell, which the peer rings only when armed.  An idle
connection therefore costs no CPU, and a busy one no system call.

Writing: ``write()`` copies into the ring at once; what does not fit is
buffered and the transport arms the ring's writer-sleeping flag and watches
the space doorbell.  Flow control (``pause_writing``/``resume_writing``)
follows the buffer, as asyncio's selector transports do.

Memory: once a second the loop offers each of its transports' send rings a
trim (``Ring.trim``): one that holds pages of its large area and whose
bytes were all read gives them back (docs/data-plane.md, "Two areas"), so
a connection idle after a large transfer costs one page again.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket as _std
from asyncio import trsock
from typing import Any, Optional

import uvloop

from .._fastpath import LoopPoller, TransportCore, drain_bell, ring_arm
from ..socket import info as _info

__all__ = ["ShmTransport"]

# The transport's own readers on its doorbells: uvloop's methods, not the
# shrimpio loop's add_reader (which serves callbacks of the program, see _watch).
_add_reader = uvloop.Loop.add_reader
_remove_reader = uvloop.Loop.remove_reader

#: Seconds between the loop's offers of a trim to its transports' send rings.
TRIM_EVERY = 1.0


def _trim_later(loop: Any) -> None:
    if getattr(loop, "_shm_trim_timer", None) is None:
        loop._shm_trim_timer = loop.call_later(TRIM_EVERY, _trim_sweep, loop)


def _trim_sweep(loop: Any) -> None:
    loop._shm_trim_timer = None
    transports = getattr(loop, "_shm_transports", None)
    if not transports:
        return                      # the next transport starts it again
    for tr in list(transports.values()):
        conn = tr._conn
        if conn is not None and not conn.closed:
            try:
                conn.tx.trim()
            except (OSError, ValueError):
                pass                # broken or closing: its own calls say so
    _trim_later(loop)


def _core_field(name: str) -> property:
    """A transport attribute kept in its TransportCore (the C fast path
    reads and writes the same state)."""
    return property(lambda self: getattr(self._core, name),
                    lambda self, value: setattr(self._core, name, value))


class ShmTransport(asyncio.Transport):
    """A transport over one shared-memory connection of a shrimpio socket."""

    _protocol = _core_field("protocol")
    _buffered = _core_field("buffered")
    _closing = _core_field("closing")
    _paused = _core_field("paused")
    _read_eof = _core_field("read_eof")
    _conn_lost = _core_field("conn_lost")
    _eof_requested = _core_field("eof_requested")
    _buffer_size = _core_field("buffer_size")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Any, protocol: asyncio.BaseProtocol,
                 waiter: Optional[asyncio.Future] = None, server: Any = None) -> None:
        # Addresses are kept from the start, as asyncio's and uvloop's
        # transports do: they still answer after the connection is closed.
        super().__init__({"socket": trsock.TransportSocket(sock),
                          "sockname": sock.getsockname(), "peername": sock.getpeername()})
        conn = sock._shm
        self._loop = loop
        self._sock = sock
        self._conn = conn
        self._core = TransportCore(self, conn.stream, _loop_poller(loop))
        # The protocol's writes go straight to C (no Python frame per write);
        # ShmTransport.write stays the documented entry and does the same.
        self.write = self._core.write  # type: ignore[method-assign]
        self.is_closing = self._core.is_closing  # type: ignore[method-assign]
        self._bell = conn.bell_fd
        self._space = conn.space.fileno()
        self._server = server
        # Bytes the ring had no room for; an empty tuple while there are
        # none (a deque costs some 700 bytes, and most connections never
        # fill their ring).
        self._buffer: "collections.deque | tuple" = ()
        self._eof_done = False
        self._protocol_paused = False
        self._reader_on = False
        self._writer_on = False
        self._write_scheduled = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._final_info: Optional[dict] = None
        self._set_protocol(protocol)
        # As uvloop and asyncio on every TCP transport (kept by the socket
        # for getsockopt: there is no Nagle over shared memory).
        sock.setsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY, 1)
        transports = getattr(loop, "_shm_transports", None)
        if transports is not None:
            transports[id(conn)] = self     # its fd is "used by transport"
            _trim_later(loop)
        if server is not None:
            server._attach()
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    # -- protocol ----------------------------------------------------------

    def _set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        # uvloop's rule: a protocol with get_buffer() that is not an
        # asyncio.Protocol is buffered, whatever its base class.
        self._buffered = (hasattr(protocol, "get_buffer") and hasattr(protocol, "buffer_updated")
                          and not isinstance(protocol, asyncio.Protocol))

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "shrimpio":
            sock = self._sock
            if sock is None or self._conn.closed:
                # Closed: what the connection was when it ended.
                return self._final_info if self._final_info is not None else default
            return _info(sock)
        return super().get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    # -- reading -----------------------------------------------------------

    # pause_reading, resume_reading and is_reading read the core's fields
    # directly, not through the properties: aiohttp's client calls
    # resume_reading twice per request, paused or not.

    def is_reading(self) -> bool:
        core = self._core
        return not core.paused and not core.closing

    def pause_reading(self) -> None:
        core = self._core
        if core.closing or core.paused:
            return
        # The doorbell's reader stays installed: a pause is often short (an
        # HTTP client pauses between responses), and taking the reader off
        # and on costs two epoll_ctl calls.  A paused ring is never armed,
        # so the peer does not ring; if the doorbell fires anyway (the peer
        # died: end of file), _on_bell takes the reader off.
        core.paused = True

    def resume_reading(self) -> None:
        core = self._core
        if core.closing or not core.paused:
            return
        core.paused = False
        self._start_reading()

    def _start_reading(self) -> None:
        # Never deliver data from inside resume_reading(): callers (StreamReader)
        # only set up their waiter after it returns, as with asyncio's transports.
        if self._closing or self._paused or self._read_eof:
            return
        if not self._reader_on:
            _add_reader(self._loop, self._bell, self._on_bell)
            self._reader_on = True
        self._core.activate()

    def _stop_reader(self) -> None:
        if self._reader_on:
            self._reader_on = False
            _remove_reader(self._loop, self._bell)

    def _on_bell(self) -> None:
        core = self._core
        if drain_bell(self._bell):
            self._conn.gone = core.gone = True
        if core.paused:
            self._stop_reader()      # resume_reading puts it back
            return
        core.wake()

    def _on_eof(self) -> None:
        self._read_eof = True
        self._stop_reader()
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            return self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
        if not keep_open:
            self.close()

    # -- writing -----------------------------------------------------------

    def write(self, data: Any) -> None:
        self._core.write(data)

    def _write_slow(self, data: Any, sent: int) -> None:
        """What TransportCore.write does not do itself: checks that fail,
        and buffering what did not fit (``sent`` bytes went into the ring)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._conn_lost:
            self._conn_lost += 1
            return
        if not data:
            return
        if sent:
            data = memoryview(data)[sent:]
        if not self._buffer:
            self._start_writing()
            if type(self._buffer) is tuple:
                self._buffer = collections.deque()
        self._buffer.append(bytes(data))
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _start_writing(self) -> None:
        if self._writer_on:
            return
        if ring_arm(self._conn.tx, True):
            self._schedule_write()
            return
        self._writer_on = True
        _add_reader(self._loop, self._space, self._on_space)

    def _schedule_write(self) -> None:
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_ready)

    def _on_space(self) -> None:
        if drain_bell(self._space):
            self._conn.gone = self._core.gone = True
        self._write_ready()

    def _write_ready(self) -> None:
        self._write_scheduled = False
        if self._conn_lost:
            return
        while self._buffer:
            data = self._buffer[0]
            try:
                n = self._conn.stream.send(data, 0, 0.0)
            except BlockingIOError:
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._stop_writer()
                self._buffer = ()
                self._buffer_size = 0
                return self._fatal_error(exc, "Fatal write error on shrimpio transport")
            self._buffer_size -= n
            if n == len(data):
                self._buffer.popleft()
                continue
            self._buffer[0] = data[n:]
            break
        self._maybe_resume_protocol()
        if self._buffer:
            if self._conn.gone:
                # The peer is gone (EOF on a doorbell) without shutting the
                # ring (it died): nobody will ever make room, and the space
                # doorbell stays readable, so re-arming would spin forever.
                # Fail as TCP does after the peer's reset.
                return self._fatal_error(BrokenPipeError(errno.EPIPE, "the peer is gone"),
                                         "Fatal write error on shrimpio transport")
            self._stop_writer()
            self._start_writing()            # re-arm: full again
            return
        self._buffer = ()
        self._stop_writer()
        if self._eof_requested and not self._eof_done:
            self._do_write_eof()
        if self._closing:
            self._call_connection_lost_soon(None)

    def _stop_writer(self) -> None:
        if self._writer_on:
            self._writer_on = False
            _remove_reader(self._loop, self._space)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_requested:
            return
        self._eof_requested = True
        if not self._buffer:
            self._do_write_eof()

    def _do_write_eof(self) -> None:
        self._eof_done = True
        try:
            self._sock.shutdown(2 - 1)       # SHUT_WR
        except OSError:
            pass

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size > self._high and not self._protocol_paused:
            self._protocol_paused = True
            self._flow_callback("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low:
            self._protocol_paused = False
            self._flow_callback("resume_writing")

    def _flow_callback(self, name: str) -> None:
        """Call protocol.pause_writing/resume_writing; a failure is reported
        to the loop, as asyncio's transports do, not raised to the writer."""
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": f"protocol.{name}() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    # -- closing -----------------------------------------------------------

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reader()
        if not self._buffer:
            self._conn_lost += 1
            self._call_connection_lost_soon(None)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if not isinstance(exc, OSError):
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self, "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc: Optional[BaseException]) -> None:
        if self._conn_lost:
            return
        self._buffer = ()
        self._buffer_size = 0
        self._stop_writer()
        if not self._closing:
            self._closing = True
            self._stop_reader()
        self._conn_lost += 1
        self._call_connection_lost_soon(exc)

    def _call_connection_lost_soon(self, exc: Optional[BaseException]) -> None:
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._sock is None:
            return
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._stop_reader()
            self._stop_writer()
            if not self._conn.closed:
                self._final_info = _info(self._sock)
            self._sock.close()
            self._sock = None
            # As asyncio's and uvloop's transports: the protocol goes (the
            # transport and its C core refer to each other; the protocol,
            # an SSLProtocol with its context say, must not wait for the
            # cycle collector).
            self._protocol = None
            server, self._server = self._server, None
            if server is not None:
                server._detach()

    def __del__(self) -> None:
        if self._sock is not None and not self._sock._closed:
            self._sock.close()


def _loop_poller(loop: asyncio.AbstractEventLoop) -> LoopPoller:
    """The loop's one poller (made on first use)."""
    try:
        return loop._shrimpio_poller          # type: ignore[attr-defined]
    except AttributeError:
        poller = LoopPoller(loop)
        try:
            loop._shrimpio_poller = poller    # type: ignore[attr-defined]
        except AttributeError:
            pass                              # a loop without __dict__: one per transport
        return poller


def _set_result_unless_cancelled(fut: asyncio.Future, result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)
