"""Frames of shrimpio.msg on the wire, and payloads as pickle body + buffers.

Every frame starts with a 40-byte header::

    kind u8 | ptype u8 | nbufs u16 | body_len u32 | tag i64 | mid u64 | total u64 | pid u32 | 4 pad

then ``nbufs`` descriptors of 16 bytes (length u64, address u64), then,
for an eager ``MSG`` (and a ``DATA`` answer), the buffers' bytes, then the
body (a pickle, or the raw type's details).  Kinds:

========  ======================  ==================================================
HELLO     both sides, once        pid, address and 16-byte token (see _cma), channel id
MSG       sender -> receiver      an eager message: everything inline
RTS       sender -> receiver      a large message: body inline, buffers by address
CTS       receiver -> sender      "write them here" (descriptors: our addresses),
                                  or, with no descriptors, "send them inline"
DONE      sender -> receiver      written into the addresses of CTS
DATA      sender -> receiver      the buffers inline, after a CTS without addresses
FIN       receiver -> sender      pulled with process_vm_readv: the sender is free
RTR       receiver -> sender      ready to receive: a posted destination (one
                                  descriptor) and, in the body, how many messages
                                  had arrived when it was posted (see _offer.py)
PUT       sender -> receiver      a large message that takes an RTR (its id after the
                                  descriptors): as RTS, but the sender writes at once
REVOKE    receiver -> sender      an RTR taken back (its receive was cancelled)
========  ======================  ==================================================

Everything read from a peer is checked here (kinds, types, counts,
lengths); a bad frame is a :class:`ProtocolError` and ends the channel.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Callable

from ._base import ProtocolError

__all__ = ["HEADER", "DESC", "HELLO", "MSG", "RTS", "CTS", "DONE", "DATA", "FIN", "RTR", "PUT",
           "REVOKE", "RTR_BODY", "RID", "CTS_TO_PUT",
           "P_PICKLE", "P_BYTES", "P_BYTEARRAY", "P_VIEW", "P_MPBYTES", "encode", "decode",
           "Header", "check_header", "MAX_BUFS", "OOB_MIN"]

HEADER = struct.Struct("<BBHIqQQI4x")
DESC = struct.Struct("<QQ")
# magic, version, reserved, pid, token address, token, channel id (random: see Channel._local_peer)
HELLO_BODY = struct.Struct("<4sHHIQ16sQ")
MAGIC = b"SHMS"
VERSION = 3

HELLO, MSG, RTS, CTS, DONE, DATA, FIN, RTR, PUT, REVOKE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
_KINDS = frozenset((HELLO, MSG, RTS, CTS, DONE, DATA, FIN, RTR, PUT, REVOKE))
_NAMES = {HELLO: "HELLO", MSG: "MSG", RTS: "RTS", CTS: "CTS", DONE: "DONE", DATA: "DATA", FIN: "FIN",
          RTR: "RTR", PUT: "PUT", REVOKE: "REVOKE"}
#: An RTR's body: messages seen from the peer when it was posted, any tag (0/1).
RTR_BODY = struct.Struct("<QB7x")
#: A PUT's RTR id, after its descriptors.
RID = struct.Struct("<Q")
#: The tag of a CTS that answers a PUT whose RTR was being revoked: the
#: sender may have written already, and then ignores it (see _offer.py).
CTS_TO_PUT = 1
#: Messages with at least this many bytes of buffers go by rendezvous.
RNDV_MIN = 64 * 1024

#: Payload types: a pickle with out-of-band buffers, or a buffer sent as itself.
P_PICKLE, P_BYTES, P_BYTEARRAY, P_VIEW, P_MPBYTES = 0, 1, 2, 3, 4
_PTYPES = frozenset((P_PICKLE, P_BYTES, P_BYTEARRAY, P_VIEW, P_MPBYTES))

#: Out-of-band buffers per message at most (smaller ones are pickled in-band).
MAX_BUFS = 1024
#: Buffers below this many bytes are pickled in-band (pickle protocol 5).
OOB_MIN = 1024
#: Sizes a peer may announce: body (a pickle) and all buffers of one message.
MAX_BODY = 1 << 31
MAX_TOTAL = 1 << 40


class Header:
    """A decoded, checked frame header."""

    __slots__ = ("kind", "ptype", "nbufs", "body_len", "tag", "mid", "total", "pid")

    def __init__(self, raw: Any) -> None:
        (self.kind, self.ptype, self.nbufs, self.body_len, self.tag, self.mid, self.total,
         self.pid) = HEADER.unpack(raw)

    def __repr__(self) -> str:
        return (f"<{_NAMES.get(self.kind, self.kind)} tag={self.tag} mid={self.mid} "
                f"bufs={self.nbufs} body={self.body_len} total={self.total}>")


def check_header(h: Header) -> Header:
    """Refuse a header no shrimpio.msg peer writes."""
    if h.kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {h.kind}")
    if h.ptype not in _PTYPES:
        raise ProtocolError(f"unknown payload type {h.ptype}")
    if h.nbufs > MAX_BUFS:
        raise ProtocolError(f"{h.nbufs} buffers in one message (at most {MAX_BUFS})")
    if h.body_len > MAX_BODY:
        raise ProtocolError(f"message body of {h.body_len} bytes")
    if h.total > MAX_TOTAL:
        raise ProtocolError(f"message buffers of {h.total} bytes")
    if h.tag < 0:
        raise ProtocolError(f"negative tag {h.tag}")
    if h.ptype != P_PICKLE and h.kind in (MSG, RTS, PUT) and h.nbufs != 1:
        raise ProtocolError(f"a raw message with {h.nbufs} buffers")
    if h.kind == RTR and (h.nbufs != 1 or h.body_len != RTR_BODY.size or h.total < RNDV_MIN):
        raise ProtocolError("bad ready-to-receive")
    if h.kind == REVOKE and (h.nbufs or h.body_len or h.total):
        raise ProtocolError("bad revoke")
    return h


def header(kind: int, ptype: int = 0, nbufs: int = 0, body_len: int = 0, tag: int = 0,
           mid: int = 0, total: int = 0, pid: int = 0) -> bytes:
    return HEADER.pack(kind, ptype, nbufs, body_len, tag, mid, total, pid)


def check_descs(raw: Any, nbufs: int, total: int, addresses: bool) -> list[tuple[int, int]]:
    """Decode descriptors; their lengths must add up to ``total``."""
    descs = [DESC.unpack_from(raw, i * DESC.size) for i in range(nbufs)]
    if sum(n for n, _ in descs) != total:
        raise ProtocolError("buffer lengths do not add up to the announced total")
    for n, addr in descs:
        if addresses and n and addr == 0:
            raise ProtocolError("a buffer at address 0")
    return descs


# -- payloads -------------------------------------------------------------------

def encode(obj: Any, mp_bytes: bool = False) -> tuple[int, Any, list[memoryview]]:
    """``(ptype, body, buffers)`` for ``obj``: bytes, bytearray and other
    buffers travel as themselves; anything else is pickled (protocol 5)
    with its large buffers out of band.  ``buffers`` are flat byte views."""
    t = type(obj)
    if mp_bytes:
        return P_MPBYTES, b"", [_flat(obj)]
    if t is bytes:
        return P_BYTES, b"", [memoryview(obj)]
    if t is bytearray:
        return P_BYTEARRAY, b"", [memoryview(obj)]
    if t is memoryview:
        return _view(obj)
    bufs: list[memoryview] = []

    def oob(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:            # not contiguous: pickled in-band
            return True
        if raw.nbytes < OOB_MIN or len(bufs) >= MAX_BUFS:
            return True
        bufs.append(raw)
        return False

    try:
        body = pickle.dumps(obj, protocol=5, buffer_callback=oob)
    except TypeError:
        try:
            view = memoryview(obj)     # anything else with the buffer protocol
        except TypeError:
            raise
        return _view(view)
    return P_PICKLE, body, bufs


def _flat(obj: Any) -> memoryview:
    v = obj if isinstance(obj, memoryview) else memoryview(obj)
    if not v.c_contiguous:
        raise BufferError("the buffer is not contiguous")
    return v.cast("B") if (v.ndim != 1 or v.format not in ("B", "b", "c")) else v


def _view(v: memoryview) -> tuple[int, Any, list[memoryview]]:
    if not v.c_contiguous:
        v = memoryview(v.tobytes()).cast(v.format, v.shape) if v.ndim else memoryview(v.tobytes())
    body = pickle.dumps((v.format, v.shape), protocol=5)
    return P_VIEW, body, [v.cast("B") if v.ndim != 1 or v.format != "B" else v]


def decode(ptype: int, body: Any, buffers: list[Any]) -> Any:
    """The object a peer sent (see :func:`encode`); for the raw types,
    ``buffers`` holds the one destination."""
    if ptype == P_PICKLE:
        try:
            return pickle.loads(body, buffers=buffers)
        except Exception as e:
            raise ProtocolError(f"cannot unpickle the message: {e!r}") from e
    buf = buffers[0]
    if ptype == P_VIEW:
        try:
            fmt, shape = pickle.loads(body)
            return memoryview(buf).cast("B").cast(fmt, shape)
        except Exception:          # a format this side cannot cast to: the bytes
            return memoryview(buf)
    return buf


def mp_loads(ptype: int, body: Any, buffers: list[Any]) -> Any:
    """multiprocessing's recv(): bytes sent by ``send_bytes`` are a pickle."""
    if ptype == P_MPBYTES:
        return pickle.loads(buffers[0])
    return decode(ptype, body, buffers)


Alloc = Callable[[int, int], tuple[Any, Any]]
