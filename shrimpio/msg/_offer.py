"""Ready to receive: a posted destination offered to the sender ahead of
its message (VMMC-2's transfer redirection, without a round trip).

A receive posted with a large ``into`` that only one channel can satisfy
(its source, or the one channel of its hub) is *offered* to that
channel's sender with an RTR frame: the destination's address and
length, the receive's tag, and how many messages the receiver had read
from the channel when it posted (``seen``).  A sender about to send a
large message takes the first offer whose tag matches, if no message of
its own went after the offer was made (its count of messages sent equals
``seen``: else one of those may have taken the receive, and all such
offers are dropped as stale).  It then writes a PUT frame (an RTS that
names the offer), copies its buffers straight into the destination, and
writes DONE: two frames, no waiting for an answer (with an RTS: RTS, CTS,
then the copy and DONE).  The receiver matches a PUT to its offered
receive, which is the first posted receive the message can go to (no
receive posted before it could take a message of that channel and tag:
else no offer is made).

Taking an offer back.  A receive that is cancelled while offered may be
being written into: the receiver writes REVOKE, then reads what has
arrived; the sender writes PUT, then reads what has arrived, and writes
into the destination only if no REVOKE was there.  Each side's write is a
ring publish followed by a full fence (the ring's wake-up check), so at
least one of them sees the other's frame (Dekker):

* the receiver sees no PUT: the cancel succeeds; the sender saw the
  REVOKE and waits for an answer, and its PUT, for an offer no longer
  there, is handled as an RTS (the message goes to the next receive);
* the receiver sees the PUT: the cancel fails (the receive takes the
  message) and the receiver answers CTS (tag ``CTS_TO_PUT``) with the
  destination: a sender that saw the REVOKE writes on that answer, one
  that did not has written already and ignores it.

The offer's frames never wait for room in a ring (an ``irecv`` does not
block): an offer that does not fit is not made, and a cancel whose REVOKE
does not fit fails as for a matched receive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from . import _cma
from ._base import ANY, ProtocolError
from ._frame import (CTS, CTS_TO_PUT, DESC, HEADER, PUT, REVOKE, RID, RNDV_MIN, RTR, RTR_BODY,
                     RTS, header)

if TYPE_CHECKING:
    from ._channel import Channel
    from ._frame import Header
    from ._hub import Hub, RecvRequest, SendRequest

__all__ = ["offer", "on_rtr", "on_revoke", "prune", "put", "on_put", "revoke"]

#: Alignment of successive buffers of one message in a posted buffer.
ALIGN = 64
#: Offers a sender keeps at most (a correct receiver makes one per
#: posted receive; the oldest go first: an offer not taken costs nothing).
_MAX_OFFERS = 256

_RTR_LEN = HEADER.size + DESC.size + RTR_BODY.size


class Offer:
    """An RTR as the sender holds it."""

    __slots__ = ("rid", "seen", "tag", "addr", "nbytes", "pid")

    def __init__(self, rid: int, seen: int, tag: Any, addr: int, nbytes: int, pid: int) -> None:
        self.rid, self.seen, self.tag, self.addr, self.nbytes, self.pid = rid, seen, tag, addr, nbytes, pid


def layout(lens: list[int], room: int) -> Optional[list[int]]:
    """Offsets of buffers of these lengths in a destination of ``room``
    bytes (64-byte aligned after the first), or None if they do not fit."""
    out, off = [], 0
    for n in lens:
        if off + n > room:
            return None
        out.append(off)
        off = (off + n + ALIGN - 1) // ALIGN * ALIGN
    return out


# -- the receiver ---------------------------------------------------------------------

def offer(hub: "Hub", req: "RecvRequest") -> None:
    """Offer a just-posted receive to its one possible sender, if it can
    be offered (the hub's lock is held; ``req`` is last in ``pending``)."""
    into = req.into
    if into is None or len(into) < RNDV_MIN or not _cma.available():
        return
    chan = req.source
    if chan is ANY:
        if hub.listener is not None or len(hub.channels) != 1:
            return
        chan = hub.channels[0]
    if chan._rx is None or chan._peer is None or chan._dead_error() is not None:
        return
    for p in hub.pending:
        if p is req:
            break
        if ((p.source is ANY or p.source is chan)
                and (p.tag is ANY or req.tag is ANY or p.tag == req.tag)):
            return                  # a message of this tag would go there first
    if chan._tx.free() < _RTR_LEN:
        return
    offers = chan._offers
    for rid in [r for r, ent in offers.items() if ent[0]._done]:
        del offers[rid]
    ref = _cma.BufferRef(into, writable=True)
    rid = chan._next_rid
    chan._next_rid += 1
    body = RTR_BODY.pack(chan._count_in(), req.tag is ANY)
    try:
        chan._write([header(RTR, nbufs=1, body_len=len(body), tag=0 if req.tag is ANY else req.tag,
                            mid=rid, total=ref.nbytes, pid=chan._pid()),
                     DESC.pack(ref.nbytes, ref.addr), body])
    except (OSError, EOFError):
        ref.release()
        return
    offers[rid] = [req, False]
    req._offer = (chan, rid)
    req._refs.append(ref)           # (held until the receive ends)


def revoke(hub: "Hub", req: "RecvRequest") -> bool:
    """Take back an offered receive being cancelled (the hub's lock is
    held; ``req`` is pending): True if it may be cancelled, False if its
    message has been claimed (see the module docstring)."""
    chan, rid = req._offer
    ent = chan._offers.get(rid)
    if ent is None or chan._dead_error() is not None:
        return True
    if chan._tx.free() < HEADER.size:
        return False
    ent[1] = True                   # revoking: a PUT seen now is answered with a CTS
    try:
        chan._write([header(REVOKE, mid=rid)])
    except (OSError, EOFError):
        return True                 # the channel is gone: nobody writes any more
    chan._pump()                    # a PUT written before our REVOKE shows here
    if req in hub.pending:
        chan._offers.pop(rid, None)
        return True
    return False


def on_put(chan: "Channel", h: "Header") -> None:
    """A PUT arrived: the sender writes into the receive it names, if that
    is still offered; else it is an RTS."""
    descs = chan._read_descs(h, True)
    raw = bytearray(RID.size)
    chan._wire.read_into(memoryview(raw))
    (rid,) = RID.unpack(raw)
    body = chan._read_body(h)
    chan._msgs_in += 1
    ent = chan._offers.pop(rid, None)
    hub = chan._hub
    req = ent[0] if ent is not None else None
    if req is None or req._done or req not in hub.pending:
        chan._announced(h, descs, body, RTS)
        return
    for p in hub.pending:           # the first receive the message can go to
        if (p.tag is ANY or p.tag == h.tag) and (p.source is ANY or p.source is chan):
            break
    if p is not req:
        raise ProtocolError("a message written into a receive that is not its own")
    lens = [n for n, _ in descs]
    offs = layout(lens, len(req.into))
    if offs is None:
        raise ProtocolError("a message written into a receive too small for it")
    hub.pending.remove(req)
    req._early = True
    from ._hub import _Arrived
    a = _Arrived(chan, h, descs, body, None)
    a.kind = RTS
    views = [req.into[o:o + n] for o, n in zip(offs, lens)]
    if ent[1]:                      # it was being revoked: the sender may wait for this
        chan._rendezvous(a, req, early=True, answer_tag=CTS_TO_PUT)
    else:
        chan._await_copy(a, req, views, views, [], False)


# -- the sender -----------------------------------------------------------------------

def on_rtr(chan: "Channel", h: "Header") -> None:
    descs = chan._read_descs(h, True)
    raw = bytearray(RTR_BODY.size)
    chan._wire.read_into(memoryview(raw))
    seen, any_tag = RTR_BODY.unpack(raw)
    n, addr = descs[0]
    add(chan, (h.mid, h.tag, any_tag, addr, n, h.pid, seen))


def add(chan: "Channel", r: tuple) -> None:
    """Keep an offer: (id, tag, any tag, address, length, pid, seen), as
    on_rtr or the C path (_msgfast.read_rtr) read it."""
    offers = chan._offers_in
    offers.append(Offer(r[0], r[6], ANY if r[2] else r[1], r[3], r[4], r[5]))
    if len(offers) > _MAX_OFFERS:
        del offers[0]
    _held(chan)


def on_revoke(chan: "Channel", h: "Header") -> None:
    offers = chan._offers_in
    for i, o in enumerate(offers):
        if o.rid == h.mid:
            del offers[i]
            _held(chan)
            break
    if chan._claim == h.mid:
        chan._claim_lost = True


def _held(chan: "Channel") -> None:
    """Tell the C send path whether offers are held (it then leaves
    small messages to the general path, whose writes are counted under
    the channel's write lock: see put)."""
    fp = chan._fp
    if fp is not None:
        fp.offered = bool(chan._offers_in)


def prune(chan: "Channel") -> None:
    """Drop the offers a message of ours went past (the write lock is held)."""
    sent = chan._count_out()
    offers = chan._offers_in
    if any(o.seen != sent for o in offers):
        offers[:] = [o for o in offers if o.seen == sent]
        _held(chan)


def _take(chan: "Channel", tag: int, lens: list[int]) -> Optional[tuple[Offer, list]]:
    """The offer a large message of ``tag`` goes to, and its destination
    ranges (the write lock is held, frames pumped); None: send an RTS."""
    offers = chan._offers_in
    if not offers:
        return None
    prune(chan)
    for i, o in enumerate(offers):
        if o.tag is ANY or o.tag == tag:
            offs = layout(lens, o.nbytes)
            if offs is None:
                return None         # its receive takes it, too short: said there
            del offers[i]
            return o, [(o.addr + off, n) for off, n in zip(offs, lens)]
    return None


def put(chan: "Channel", req: "SendRequest", ptype: int, body: Any, bufs: list, refs: list,
        tag: int, total: int) -> bool:
    """Send a large message into an offered receive, if one is there for
    it (the hub's lock is held, frames pumped); False: send an RTS.

    The choice and the PUT are made under the channel's write lock, and
    every other message is counted under it before it is written (the C
    path leaves them to the general one while offers are held): so no
    message of ours can go between the count the offer was checked
    against and the PUT."""
    with chan._wlock:
        taken = _take(chan, tag, [r.nbytes for r in refs])
        if taken is None:
            return False
        o, remote = taken
        mid = chan._next_mid
        chan._next_mid += 1
        req.mid, req.bufs, req._refs = mid, bufs, refs
        descs = b"".join(DESC.pack(r.nbytes, r.addr) for r in refs)
        chan._claim, chan._claim_lost = o.rid, False
        chan._msgs_out += 1
        try:
            chan._wire.write([header(PUT, ptype, len(bufs), len(body), tag, mid, total, chan._pid()),
                              descs, RID.pack(o.rid), body])
        finally:
            _held(chan)
    try:
        chan._pump()                # a REVOKE written before our PUT shows here
    finally:
        chan._claim = 0
    err = chan._dead_error()
    if err is not None:
        req._finish(error=err)
    elif chan._claim_lost:
        chan._sends[mid] = req      # taken back: the receiver answers as to an RTS
    else:
        chan._write_out(req, mid, o.pid, remote)
    return True


def stale_cts(h: "Header") -> bool:
    """A CTS for a message no longer waiting that may be ignored: the
    answer to a PUT that was written before its REVOKE arrived."""
    return h.kind == CTS and h.tag == CTS_TO_PUT
