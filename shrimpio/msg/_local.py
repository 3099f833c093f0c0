"""A large eager message to a channel of this process: handed over, not
written.

An eager message goes through the peer's ring (or kernel socket), and a
write blocks while that is full.  If the receiving end is a channel of
this process (see Channel._local_peer), the thread sending may be the one
that will receive (a send, then a receive, in one thread): a large write
would then block for ever.  So a large eager message to such a peer
(a pickle with large in-band parts, or any large message over kernel TCP)
is put straight into the peer's hub instead, as its reading would have
put it: into a posted receive's buffer, or queued.  The peer first reads
everything already written to it, so the order per channel is kept.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import _cma
from ._frame import MSG

if TYPE_CHECKING:
    from ._channel import Channel

__all__ = ["hand_over"]

#: How long the peer may take to read what was written before (a kernel
#: socket's bytes in flight) before the message is written after all.
_DRAIN = 5.0


def _drained(chan: "Channel", peer: "Channel") -> bool:
    """Has ``peer`` read everything ``chan`` wrote?  (It reads meanwhile.)"""
    deadline = time.monotonic() + _DRAIN
    while True:
        peer._pump()
        if peer._dead_error() is not None:
            return False
        if peer._rx is not None:
            if not peer._rx.readable():
                return True
        elif peer._wire.bytes_in >= chan._wire.bytes_out:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        peer._wire.wait_readable(min(left, 0.01))


def hand_over(chan: "Channel", peer: "Channel", ptype: int, body: Any, bufs: list,
              tag: int, pid: int) -> bool:
    """Deliver an eager message of ``chan`` to ``peer`` (a channel of this
    process) without writing it; False if it must be written after all."""
    from ._channel import _Arrived, _alloc, _into_slices
    with chan._wlock, peer._hub.lock:
        if not _drained(chan, peer):
            return False
        lens = [b.nbytes for b in bufs]
        total = sum(lens)
        chan._msgs_out += 1
        peer._msgs_in += 1
        req = peer._hub.match_arrival(peer, tag)
        if req is not None and req.into is not None:
            views = _into_slices(req.into, lens)
            if views is not None:             # one copy, into the posted buffer
                for v, b in zip(views, bufs):
                    v[:] = b
                _cma.stats["received_copied"] += total
                peer._deliver(req, ptype, tag, body, views, False)
                return True
        objs = []                             # one copy, taken now (the sender may reuse its buffers)
        for b in bufs:
            o, v = _alloc(ptype, b.nbytes)
            if b.nbytes:
                v[:] = b
            objs.append(o)
        _cma.stats["sent_copied"] += total
        if req is not None:
            peer._deliver(req, ptype, tag, body, objs, req.into is not None)
            return True
        a = _Arrived.__new__(_Arrived)
        a.chan, a.kind, a.ptype, a.tag, a.mid, a.pid = peer, MSG, ptype, tag, 0, pid
        a.descs, a.body, a.bufs, a.nbytes = [(n, 0) for n in lens], body, objs, total + len(body)
        peer._hub.queue.append(a)
        return True
