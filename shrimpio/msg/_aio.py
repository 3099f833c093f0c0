"""Awaitable shrimpio.msg: ``await ch.arecv()``, ``await ch.asend(obj)``,
``await req`` (a Request), on the shrimpio asyncio loop (or any loop).

On the shrimpio loop, a channel of its own (not a listener's) waits as
the loop's transports do: its receive ring stays on the loop's hot list
(polled each turn, no system call) for the busy-poll budget after the
loop's last traffic, then is armed, and a kernel reader on (a duplicate
of) its doorbell wakes the loop.  That state (:class:`_RingWaiter`) lives
with the channel between waits, so a wait costs no system call and the
budget adapts to the peer.  Elsewhere (asyncio's own loop, a listener's
channels) a wait arms the rings' reader flags (so the peer rings the
doorbell, the channel's fd, at its next write) and watches the fds with
the loop's ``add_reader``.  On a wake-up the hub handles what arrived,
without blocking.  A small send that finds the ring full waits for room with
``add_writer`` the same way; a send that must wait for its peer (a large
message's rendezvous) is a request awaited as above.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Optional

from .._fastpath import RingWatch, drain_bell, ring_arm
from ._base import ANY, Message, Status, check_tag
from . import _channel
from ._channel import Channel, Hub, Request, RNDV_MIN
from ._hub import _check_probe_live
from ._msgfast import write_msg
from ._frame import HEADER, DESC, encode

__all__ = ["arecv", "asend", "aprobe", "wait_request"]


def _chans(hub: Hub) -> list:
    return [c for c in hub.channels if c._dead_error() is None and not c.closed]


class _RingWaiter:
    """A channel's waits on one shrimpio loop: a :class:`RingWatch` (hot
    polling, then arming) and a kernel reader on a duplicate of the
    doorbell (a duplicate: the channel may be closed while the loop runs,
    and its fd number reused)."""

    __slots__ = ("loop", "conn", "hot", "fd", "bell", "fut", "pid")

    def __init__(self, loop: Any, conn: Any) -> None:
        from ..transport._transport import _loop_poller
        self.loop = loop
        self.conn = conn
        self.hot = RingWatch(conn.rx, conn.tx, _loop_poller(loop), self._wake)
        self.fut: Optional[asyncio.Future] = None
        self.fd = -1
        self.bell = -1
        self._listen()

    def _listen(self) -> None:
        self.bell = self.conn.bell_fd
        self.pid = _channel._PID
        self.fd = os.dup(self.bell)
        _base_add_reader(self.loop, self.fd, self._on_bell)

    def _unlisten(self) -> None:
        if self.fd >= 0:
            # (A forked child holds a copy of the parent's loop, whose epoll
            # instance is the parent's: it only closes its copy of the fd.)
            if self.pid == _channel._PID and not self.loop.is_closed():
                _base_remove_reader(self.loop, self.fd)
            os.close(self.fd)
            self.fd = -1

    def _wake(self) -> None:
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_bell(self) -> None:
        if drain_bell(self.fd):
            # The peer is gone (EOF on the doorbell, for ever): stop
            # listening, or the reader would fire every turn; the hub's
            # deep pump finds the end.
            self._unlisten()
        self.hot.woke()
        self._wake()

    async def wait(self) -> None:
        conn = self.conn
        if self.fd < 0 or conn.bell_fd != self.bell:
            if conn.gone or conn.closed:
                return
            self._unlisten()
            self._listen()
        if self.hot.ready():
            return
        self.fut = self.loop.create_future()
        try:
            await self.fut
        finally:
            self.fut = None
            self.hot.stop()

    def close(self) -> None:
        self.hot.stop()
        self._unlisten()
        self._wake()


def _base_add_reader(loop: Any, fd: int, cb: Any) -> None:
    import uvloop
    uvloop.Loop.add_reader(loop, fd, cb)


def _base_remove_reader(loop: Any, fd: int) -> None:
    import uvloop
    uvloop.Loop.remove_reader(loop, fd)


def _waiter(ch: Channel, loop: Any) -> Optional[_RingWaiter]:
    """The channel's waiter on ``loop`` if that is a shrimpio loop."""
    w = ch._aio
    if w is not None and w.loop is loop:
        return w
    if getattr(loop, "_shm_watches", None) is None or ch._rx is None:
        return None
    if w is not None:
        w.close()
    w = ch._aio = _RingWaiter(loop, ch._sock._shm)
    return w


async def _until_readable(hub: Hub) -> None:
    """Wait until a channel of ``hub`` (or its listener) may have input."""
    loop = asyncio.get_running_loop()
    chans = _chans(hub)
    if hub.listener is None and len(chans) == 1:
        w = _waiter(chans[0], loop)
        if w is not None:
            await w.wait()
            return
    fds: list[int] = []
    for c in chans:
        if c._rx is not None:
            if ring_arm(c._rx, False):
                return
        elif c._wire.readable_now():
            return
        fds.append(c._wire.fileno())
    lst = hub.listener
    if lst is not None and not lst.closed:
        # A shared-memory client arrives on the listener's registry socket
        # (or, its hello late, on its own control socket), not on the TCP
        # fd: a loop that is not shrimpio's polls those in the kernel.
        fds.extend(lst._sock._accept_fds())
    if not fds:
        return
    fut = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    added = []
    try:
        for fd in fds:
            loop.add_reader(fd, wake)
            added.append(fd)
        await fut
    finally:
        for fd in added:
            loop.remove_reader(fd)
        for c in chans:
            if c._rx is not None and not c.closed:
                drain_bell(c._wire.fileno())


async def _until_room(ch: Channel, need: int) -> None:
    loop = asyncio.get_running_loop()
    tx = ch._tx
    while tx.free() < need and not ring_arm(tx, True):
        fut = loop.create_future()
        fd = ch._sock._shm.space.fileno()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(fd)
            drain_bell(fd)


async def wait_request(req: Request) -> Any:
    """``await req``: the request's result, its hub progressing meanwhile."""
    hub = req._hub
    if not req._done and req._chan is not None and getattr(req, "mid", None):
        req._chan._local_progress(req)       # a large send to this process
    while not req._done:
        await _until_readable(hub)
        # (deep: one system call a channel, so only when the rings held
        # nothing: it finds the end of a channel)
        if not hub.pump():
            hub.pump(True)
        if not req._done and not _chans(hub) and hub.listener is None:
            break
    return req.wait(0)


async def arecv(self: Any, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Message:
    """Awaitable :meth:`Channel.recv` (``into``: as ``recv_into``)."""
    fp = getattr(self, "_fp", None)          # (a listener has none)
    hub = self._hub
    if (fp is not None and into is None and (source is ANY or source is self)
            and hub.listener is None and len(hub.channels) == 1):
        # A small message read whole in C, as the blocking recv does; the
        # general path below for anything else.
        tag = check_tag(tag, True)
        got = fp.try_recv(tag)
        if got == 0:
            w = _waiter(self, asyncio.get_running_loop())
            if w is not None:
                await w.wait()
                got = fp.try_recv(tag)
        if got:
            return got
    req = self.irecv(tag, source, into=into)
    try:
        return await wait_request(req)
    except BaseException:
        # Given up (cancelled, timed out): a receive that no message has
        # matched yet is withdrawn, so that the next message goes to the
        # next receive, not to this abandoned one.
        req.cancel()
        raise


async def asend(self: Channel, obj: Any, tag: int = 0) -> None:
    """Awaitable :meth:`Channel.send`."""
    self._check_open()
    tag = check_tag(tag, False)
    if self._error is not None:
        raise self._error
    fp = self._fp
    if (fp is not None and type(obj) is bytes and len(obj) < RNDV_MIN and fp.ok_tx
            and self._tx.free() >= HEADER.size + DESC.size + len(obj)):
        fp.send(obj, tag)          # the blocking send's C short cut: there is room
        return
    ptype, body, bufs = encode(obj)
    total = sum(b.nbytes for b in bufs)
    tx = self._tx
    if tx is not None and total < RNDV_MIN:
        need = HEADER.size + DESC.size * len(bufs) + len(body) + total
        if need <= tx.capacity:
            if tx.free() < need:
                await _until_room(self, need)
            if len(bufs) <= 1:
                # (what _send_parts does, without a request to await)
                with self._wlock:
                    self._msgs_out += 1
                    n = write_msg(tx, ptype, tag, _channel._PID, body, bufs[0] if bufs else None)
                self._stream.bytes_sent += n
                return
    elif self._tx is None:
        # A kernel socket: its writes may block, so they go to a thread.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._send_parts(ptype, body, bufs, tag).wait())
        return
    await wait_request(self._send_parts(ptype, body, bufs, tag, True))


async def aprobe(self: Any, tag: Any = ANY, source: Any = ANY) -> Status:
    """Awaitable :meth:`Channel.probe`."""
    while True:
        st = self.iprobe(tag, source)
        if st is not None:
            return st
        hub = self._hub
        _check_probe_live(hub, tag, source)
        await _until_readable(hub)
        hub.pump(True)
