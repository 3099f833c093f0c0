"""Awaitable shrimpio.msg: ``await ch.arecv()``, ``await ch.asend(obj)``,
``await req`` (a Request), on the shrimpio asyncio loop (or any loop).

A wait arms the rings' reader flags (so the peer rings the doorbell, the
channel's fd, at its next write) and watches the fds with the loop's
``add_reader``; on a wake-up the hub handles what arrived, without
blocking.  A small send that finds the ring full waits for room with
``add_writer`` the same way; a send that must wait for its peer (a large
message's rendezvous) is a request awaited as above.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._fastpath import drain_bell, ring_arm
from ._base import ANY, Message, Status, check_tag
from ._channel import Channel, Hub, Request, RNDV_MIN
from ._frame import HEADER, DESC, encode

__all__ = ["arecv", "asend", "aprobe", "wait_request"]


def _chans(hub: Hub) -> list:
    return [c for c in hub.channels if c._dead_error() is None and not c.closed]


async def _until_readable(hub: Hub) -> None:
    """Wait until a channel of ``hub`` (or its listener) may have input."""
    loop = asyncio.get_running_loop()
    chans = _chans(hub)
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
        fds.append(lst.fileno())
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
    hub.pump(True)
    while not req._done:
        await _until_readable(hub)
        hub.pump(True)
        if not req._done and not _chans(hub) and hub.listener is None:
            break
    return req.wait(0)


async def arecv(self: Any, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Message:
    """Awaitable :meth:`Channel.recv` (``into``: as ``recv_into``)."""
    return await wait_request(self.irecv(tag, source, into=into))


async def asend(self: Channel, obj: Any, tag: int = 0) -> None:
    """Awaitable :meth:`Channel.send`."""
    self._check_open()
    tag = check_tag(tag, False)
    if self._error is not None:
        raise self._error
    ptype, body, bufs = encode(obj)
    total = sum(b.nbytes for b in bufs)
    if self._tx is not None and total < RNDV_MIN:
        need = HEADER.size + DESC.size * len(bufs) + len(body) + total
        if need <= self._tx.capacity:
            await _until_room(self, need)
    elif self._tx is None:
        # A kernel socket: its writes may block, so they go to a thread.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._send_parts(ptype, body, bufs, tag).wait())
        return
    await wait_request(self._send_parts(ptype, body, bufs, tag))


async def aprobe(self: Any, tag: Any = ANY, source: Any = ANY) -> Status:
    """Awaitable :meth:`Channel.probe`."""
    while True:
        st = self.iprobe(tag, source)
        if st is not None:
            return st
        hub = self._hub
        req = Request(hub, None)
        req.tag, req.source, req.into = tag, source, None
        with hub.lock:
            hub._check_live(req)
        if req._done:
            raise req._error or EOFError("the peer closed the channel")
        await _until_readable(hub)
        hub.pump(True)
