"""Channels, the matching of messages to receives, and requests.

Theory of operation
-------------------
A :class:`Channel` is one connection (shared memory, or kernel TCP as the
socket layer decided) carrying frames (:mod:`._frame`).  Receives are
matched in a :class:`Hub`: a channel of its own has one; a
:class:`~shrimpio.msg.Listener` shares one among all the channels it
accepted, so that one receiver serves many senders.  The hub holds the
receives posted and not yet matched (in posting order) and the messages
arrived and not yet received (in arrival order).  An arriving message goes
to the first posted receive that matches its tag and source; a new receive
takes the first queued message that matches: so order is kept per (source,
tag), as MPI keeps it.

Small messages (below ``RNDV_MIN`` bytes of buffers) are *eager*: the
pickle and the buffers are written into the peer's ring, and read out of
it into their destination (a posted buffer, or a new object).  Larger ones
are sent by *rendezvous*: the sender writes a request to send (RTS) with
its buffers' addresses, and waits.  The receiver, when a receive matches:

* if that receive was posted before the RTS arrived, answers CTS with its
  destination's addresses, and the sender writes the bytes there with one
  ``process_vm_writev`` (VMMC's deliberate update into the buffer the
  receiver posted: transfer redirection, no receiver copy), then DONE;
* if the RTS was queued first (the receive came late), copies the bytes
  itself with one ``process_vm_readv`` and says FIN;
* where the kernel refuses cross-memory copies (another pid namespace,
  Yama's ptrace scope), the CTS asks for the bytes inline (DATA), through
  the rings.

A receive posted with a large ``into`` that only one channel can satisfy
is offered to its sender ahead of the message (RTR, see _offer.py): a
blocking send that finds the offer writes PUT (an RTS naming it), copies
into the buffer at once and writes DONE, with no CTS to wait for.  A
large eager message to a channel of this process is handed over rather
than written (see _local.py).

Progress is made by whoever waits: a blocked ``recv``, ``wait``, ``test``,
a blocking ``send`` of a large message (waiting for CTS or FIN), ``probe``.
A large ``isend`` completes when the sender next calls into the channel.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
import weakref
from typing import Any, Coroutine, Optional

from . import _cma
from ._base import BufferTooShort, Message, ProtocolError, Status, check_tag
from ._frame import (CTS, DATA, DESC, DONE, FIN, HEADER, HELLO, HELLO_BODY, MAGIC, MSG, P_BYTES,
                     P_MPBYTES, P_PICKLE, PUT, REVOKE, RNDV_MIN, RTR, RTS, VERSION, Header,
                     check_descs, check_header, decode, encode, header, mp_loads)
from ._hub import (ANY, CancelledError, Hub, Request, RecvRequest, SendRequest, _Arrived,
                   _iprobe, _poll_any, _post, _probe)
from ._wire import _Wire, copy_in, wire_for
from . import _local, _offer
from ._msgfast import FastPath, read_msg, wait_spinning, write_msg

__all__ = ["Channel", "Hub", "Request", "RNDV_MIN", "CancelledError"]

#: Eager frames up to this size are read by one C call when all there.
_FAST_MAX = 256 * 1024
#: A sender waiting for the answer to its announce (CTS or FIN) spins this
#: long before it sleeps: a receiver that has posted answers within tens
#: of microseconds, and a sleep costs a wake-up of hundreds on a busy host.
_ANSWER_SPIN = 0.0005
#: A receiver waiting for the end of a copy into its buffer (DONE) sleeps
#: until _DONE_EARLY before its expected end, then spins up to _DONE_SPIN
#: (so that the end costs no wake-up, and on a loaded host the spin takes
#: little from the other processes: longer spins measured worse there).
_DONE_EARLY = 0.0003
_DONE_SPIN = 0.0013
#: The first guess at a cross-memory copy's rate (bytes/s), before one
#: was measured on the channel: a high one (a guess too high costs some
#: spinning, one too low a wake-up).
_RATE_GUESS = 8e9

# This process's token for peers' cross-memory checks (see _cma.verify).
import ctypes as _ctypes
_TOKEN = _ctypes.create_string_buffer(secrets.token_bytes(16), 16)
_TOKEN_ADDR = _ctypes.addressof(_TOKEN)

#: _PID is a system call; frames carry it often.
_PID = os.getpid()

#: The channels of this process by id (told to the peer in the hello): a
#: channel whose peer is among them, and neither went through a fork, has
#: its peer in this process and nowhere else (see _local_peer).
_CHANNELS: "weakref.WeakValueDictionary[int, Channel]" = weakref.WeakValueDictionary()


def _before_fork() -> None:
    # Both processes hold every channel made so far: either may use either
    # end from now on, so none is known to be local any more.
    for ch in list(_CHANNELS.values()):
        ch._forked = True


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork)

_aio_mod: Any = None


def _aio() -> Any:
    """shrimpio.msg._aio (imported on first use: it imports this module)."""
    global _aio_mod
    if _aio_mod is None:
        from . import _aio as m
        _aio_mod = m
    return _aio_mod


def _alloc(ptype: int, n: int) -> tuple[Any, memoryview]:
    """A new destination object of ``n`` bytes, and a writable view of it."""
    if ptype == P_BYTES or ptype == P_MPBYTES:     # (recv_bytes gives bytes: no copy then)
        b = _cma.new_bytes(n)
        return b, _cma.writable_view(b) if n else memoryview(bytearray(0))
    ba = _cma.new_bytearray(n)
    return ba, memoryview(ba)


def _into_slices(into: memoryview, lens: list[int]) -> Optional[list[memoryview]]:
    """Views of ``into`` for buffers of these lengths (64-byte aligned
    after the first), or None if it is too small."""
    offs = _offer.layout(lens, len(into))
    return None if offs is None else [into[o:o + n] for o, n in zip(offs, lens)]

def _destinations(req: Optional[RecvRequest], ptype: int, lens: list[int]) -> tuple[list, list, bool]:
    """Where a message's buffers of these lengths go: (the objects the
    payload is rebuilt over, writable views of them, too short?): slices
    of the receive's ``into``, or new objects if it has none (or is too
    short: the message is received anyway, into new objects)."""
    views = _into_slices(req.into, lens) if req is not None and req.into is not None else None
    if views is not None:
        return views, views, False
    objs, views = [], []
    for n in lens:
        o, v = _alloc(ptype, n)
        objs.append(o)
        views.append(v)
    return objs, views, req is not None and req.into is not None


class Channel:
    """A message channel to one peer process (see the module docstring).

    Made by :func:`~shrimpio.msg.connect`, :meth:`Listener.accept
    <shrimpio.msg.Listener.accept>` or :func:`~shrimpio.msg.Pipe`; a
    context manager; ``close()`` ends it (the peer's receives then raise
    ``EOFError``)."""

    def __init__(self, sock: Any, hub: Optional[Hub] = None) -> None:
        self._sock = sock
        self._wire: _Wire = wire_for(sock)
        self._hub = hub if hub is not None else Hub()
        self._hub.channels.append(self)
        # The rings themselves, for the C path of small messages (shm only).
        self._tx = self._wire.tx if self._wire.shm else None
        self._rx = self._wire.rx if self._wire.shm else None
        self._stream = self._wire.stream if self._wire.shm else None
        self._fp: Optional[FastPath] = None
        self._wlock = threading.Lock()
        self._hdr = bytearray(HEADER.size)
        self._next_mid = 1
        self._sends: dict[int, SendRequest] = {}      # RTS sent, waiting for CTS or FIN
        self._awaiting: dict[int, tuple] = {}         # CTS sent, waiting for DONE or DATA
        self._due: dict[int, float] = {}              # (of those) when DONE is expected
        self._cts_at: dict[int, float] = {}           # (of those) when CTS was sent (or PUT came)
        # Ready to receive (_offer.py): our receives offered to the peer,
        # the peer's offers to us, and messages read and sent (frames
        # MSG, RTS, PUT; with the C path's counts).
        self._offers: dict[int, list] = {}            # id -> [receive, being revoked]
        self._offers_in: list = []
        self._next_rid = 1
        self._claim = 0                               # the offer a PUT being sent takes
        self._claim_lost = False                      # ... and it was taken back meanwhile
        self._msgs_in = self._msgs_out = 0
        self._rate = _RATE_GUESS                      # of the peer's last copy into ours
        self._peer: Optional[tuple[int, int, bytes]] = None   # pid, token address, token
        self._verified: dict[int, bool] = {}
        self._eof = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self._forked = False
        self._cid = secrets.randbits(64) or 1
        self._peer_cid = 0
        _CHANNELS[self._cid] = self
        self._aio: Any = None                         # its waits on a shrimpio loop (_aio.py)
        self._send_hello()
        if self._wire.shm:
            self._install_fast()

    def _install_fast(self) -> None:
        """Bind the C short cuts as this object's send and recv."""
        cls = type(self)
        fp = FastPath(self, self._tx, self._rx, self._stream, self._hub,
                      cls.send.__get__(self, cls), cls.recv.__get__(self, cls), self._on_fast,
                      Message, ANY, decode, mp_loads, cls.recv is not Channel.recv)
        fp.send_pickled = self._send_pickled
        fp.on_rtr = self._offer_read
        self._fp = fp
        self.send = fp.send            # type: ignore[method-assign]
        self.recv = fp.recv            # type: ignore[method-assign]

    def _count_in(self) -> int:
        fp = self._fp
        return self._msgs_in + (fp.n_in if fp is not None else 0)

    def _count_out(self) -> int:
        fp = self._fp
        return self._msgs_out + (fp.n_out if fp is not None else 0)

    @staticmethod
    def _pid() -> int:
        return _PID

    def _fast_off(self) -> None:
        fp = self._fp
        if fp is not None:
            fp.ok = fp.ok_tx = False

    # -- properties -----------------------------------------------------------

    @property
    def shm(self) -> bool:
        """True on shared memory, False over a kernel socket."""
        return self._wire.shm

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The connection's fd (readable when data or the peer's end is
        there, for the pollers shrimpio patches and for its own loop)."""
        self._check_open()
        return self._wire.fileno()

    def info(self) -> dict:
        """The socket layer's record of the path (``shrimpio.info``)."""
        from ..socket import info
        return dict(info(self._sock)) if not self._closed else {}

    def __repr__(self) -> str:
        path = "closed" if self._closed else ("shm" if self.shm else "tcp")
        return f"<shrimpio.msg.Channel {path}>"

    # -- hello ------------------------------------------------------------------

    def _send_hello(self) -> None:
        body = HELLO_BODY.pack(MAGIC, VERSION, 0, _PID, _TOKEN_ADDR, _TOKEN.raw, self._cid)
        self._write([header(HELLO, body_len=len(body)), body])

    def _on_hello(self, h: Header) -> None:
        if h.body_len != HELLO_BODY.size or h.nbufs or h.total or self._peer is not None:
            raise ProtocolError("bad hello")
        raw = bytearray(HELLO_BODY.size)
        self._wire.read_into(memoryview(raw))
        magic, version, _, pid, addr, token, cid = HELLO_BODY.unpack(raw)
        if magic != MAGIC:
            raise ProtocolError("the peer is not a shrimpio.msg channel")
        if version != VERSION:
            raise ProtocolError(f"shrimpio.msg protocol version {version}, expected {VERSION}")
        self._peer = (pid, addr, bytes(token))
        self._peer_cid = cid
        if self._fp is not None and not self._closed and self._error is None and not self._eof:
            self._fp.ok = True

    def _may_copy(self, pid: int) -> bool:
        """May we copy to or from ``pid`` (it holds the peer's token)?"""
        ok = self._verified.get(pid)
        if ok is None:
            ok = (self._peer is not None and self._wire.shm
                  and _cma.verify(pid, self._peer[1], self._peer[2]))
            self._verified[pid] = ok
        return ok

    # -- writing -----------------------------------------------------------------

    def _write(self, parts: list) -> None:
        with self._wlock:
            self._wire.write(parts)

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the channel is closed")

    def _dead_error(self) -> Optional[BaseException]:
        if self._error is not None:
            return self._error
        if self._eof or self._closed:
            return EOFError("the peer closed the channel" if self._eof else "the channel is closed")
        return None

    # -- sending ----------------------------------------------------------------------

    def isend(self, obj: Any, tag: int = 0) -> Request:
        """Start sending ``obj``; the request completes once the buffers of
        ``obj`` may be reused (at once for small messages)."""
        return self._isend(obj, check_tag(tag, False), False)

    def _isend(self, obj: Any, tag: int, mp_bytes: bool, now: bool = False) -> SendRequest:
        self._check_open()
        if self._error is not None:
            raise self._error
        ptype, body, bufs = encode(obj, mp_bytes)
        return self._send_parts(ptype, body, bufs, tag, now)

    def _send_parts(self, ptype: int, body: Any, bufs: list, tag: int,
                    now: bool = False) -> SendRequest:
        """Send a message (encoded); ``now``: the caller waits for it to
        complete, so it may take an offered receive and copy at once (an
        ``isend`` returns at once: it announces, RTS)."""
        req = SendRequest(self._hub, self)
        total = sum(b.nbytes for b in bufs)
        blen = len(body)
        pid = _PID
        if total >= RNDV_MIN and self._wire.shm and _cma.available():
            refs = [_cma.BufferRef(b) for b in bufs]
            with self._hub.lock:
                self._pump()                 # offers (ready to receive) that have arrived
                if now and self._offers_in and _offer.put(self, req, ptype, body, bufs, refs,
                                                          tag, total):
                    return req
                mid = self._next_mid
                self._next_mid += 1
                req.mid, req.bufs, req._refs = mid, bufs, refs
                self._sends[mid] = req
            descs = b"".join(DESC.pack(r.nbytes, r.addr) for r in refs)
            try:
                with self._wlock:
                    self._msgs_out += 1          # (counted first: see _offer.put)
                    if self._offers_in:
                        _offer.prune(self)
                    self._wire.write([header(RTS, ptype, len(bufs), blen, tag, mid, total, pid),
                                      descs, body])
            except BaseException:
                with self._hub.lock:
                    self._sends.pop(mid, None)
                req._finish()
                raise
        else:
            if blen + total >= RNDV_MIN:
                peer = self._local_peer()            # (it may be this thread: see _local.py)
                if peer is not None and _local.hand_over(self, peer, ptype, body, bufs, tag, pid):
                    req._finish()
                    return req
            if self._tx is not None and len(bufs) <= 1:
                with self._wlock:
                    self._msgs_out += 1
                    if self._offers_in:
                        _offer.prune(self)
                    n = write_msg(self._tx, ptype, tag, pid, body, bufs[0] if bufs else None)
                self._stream.bytes_sent += n
                req._finish()
                return req
            else:
                descs = b"".join(DESC.pack(b.nbytes, 0) for b in bufs)
                with self._wlock:
                    self._msgs_out += 1
                    if self._offers_in:
                        _offer.prune(self)
                    self._wire.write([header(MSG, ptype, len(bufs), blen, tag, 0, total, pid), descs,
                                      *bufs, body])
            n = total
            _cma.stats["sent_copied"] += n
            req._finish()
        return req

    def _offer_read(self, r: tuple) -> None:
        _offer.add(self, r)

    def _send_pickled(self, body: bytes, bufs: list, tag: int) -> None:
        """send() of an object the C path has pickled (buffers out of band)."""
        self._send_parts(P_PICKLE, body, bufs, tag, True).wait()

    def send(self, obj: Any, tag: int = 0) -> None:
        """Send ``obj`` (any picklable object; buffers and numpy arrays go
        without being pickled) with ``tag``; returns once ``obj`` may be
        reused."""
        self._isend(obj, check_tag(tag, False), False, True).wait()

    # -- a peer in this process ---------------------------------------------------------

    def _local_peer(self) -> Optional["Channel"]:
        """The other end, if it is a channel of this process that no other
        process holds (made after the last fork, as this one)."""
        if self._peer is None:
            with self._hub.lock:
                self._pump()                 # its hello
        peer = _CHANNELS.get(self._peer_cid) if self._peer_cid else None
        if peer is None or peer is self or peer._forked or self._forked or peer._closed:
            return None
        return peer

    def _local_progress(self, req: SendRequest) -> None:
        """A large send waits for its receiver: if that is a channel of this
        process, this thread may be the one that must receive (a send then
        a receive in one thread), so serve it here.  The receiver's hub
        reads the announce: a receive already posted takes it by
        rendezvous as usual (our wait then sees the answer); else it is
        queued, and becomes a message whose buffers are a copy of ours (the
        send completes at once: one copy, as an eager message's)."""
        peer = self._local_peer()
        if peer is None:
            return
        hub = peer._hub
        snap = None
        with hub.lock:
            if req._done:
                return
            peer._pump()
            for a in hub.queue:
                if a.chan is peer and a.kind == RTS and a.mid == req.mid:
                    snap = []
                    for b in req.bufs:
                        o, v = _alloc(a.ptype, b.nbytes)
                        if b.nbytes:
                            v[:] = b
                        snap.append(o)
                    a.kind, a.bufs, a.descs = MSG, snap, [(n, 0) for n, _ in a.descs]
                    break
        if snap is not None:
            _cma.stats["sent_copied"] += sum(b.nbytes for b in req.bufs)
            with self._hub.lock:
                self._sends.pop(req.mid, None)
            req._finish()

    # -- receiving --------------------------------------------------------------

    def irecv(self, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Request:
        """Post a receive; ``into`` (a writable contiguous buffer) receives
        the message's buffers (posted before the message arrives, a large
        one lands there with no copy by this process)."""
        return _post(self._hub, self, tag, source, into, own=self)

    def recv(self, tag: Any = ANY, source: Any = ANY, *, timeout: Optional[float] = None) -> Message:
        """The next message matching ``tag`` and ``source`` (ANY: any).
        ``EOFError`` once the peer closed and nothing is left."""
        return self.irecv(tag, source).wait(timeout)

    recv_message = recv

    # (plain functions returning the coroutine: one coroutine, not two)

    def arecv(self, tag: Any = ANY, source: Any = ANY, *, into: Any = None) -> Coroutine[Any, Any, Message]:
        """Awaitable ``recv`` (``into``: as ``recv_into``) on the running loop."""
        return _aio().arecv(self, tag, source, into=into)

    def asend(self, obj: Any, tag: int = 0) -> Coroutine[Any, Any, None]:
        """Awaitable ``send``."""
        return _aio().asend(self, obj, tag)

    async def aprobe(self, tag: Any = ANY, source: Any = ANY) -> Status:
        """Awaitable ``probe``."""
        from ._aio import aprobe
        return await aprobe(self, tag, source)

    def recv_into(self, buf: Any, tag: Any = ANY, source: Any = ANY, *,
                  timeout: Optional[float] = None) -> Message:
        """Receive the next matching message's buffers into ``buf``; the
        payload is rebuilt over ``buf`` (a raw buffer message: a memoryview
        of the bytes received).  ``BufferTooShort`` (the message in its
        ``args[0]``) if ``buf`` is too small."""
        return self.irecv(tag, source, into=buf).wait(timeout)

    def iprobe(self, tag: Any = ANY, source: Any = ANY) -> Optional[Status]:
        """The next matching message's :class:`Status` if one has arrived,
        else None; the message stays to be received."""
        return _iprobe(self._hub, self, tag, source)

    def probe(self, tag: Any = ANY, source: Any = ANY, *, timeout: Optional[float] = None) -> Status:
        """Wait for a matching message (not receiving it)."""
        return _probe(self._hub, self, tag, source, timeout)

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Is a message (or the end of the channel) there to receive?"""
        self._check_open()
        return _poll_any(self._hub, [self], timeout)

    def _wait_input(self, timeout: Optional[float]) -> None:
        """Wait until input may be there, as long as ``timeout`` allows
        (the hub's wait on a channel of its own).  In a rendezvous the
        channel knows when the answer is due and spins for it (see
        _ANSWER_SPIN, _DONE_EARLY)."""
        rx = self._rx
        if rx is None:
            self._wire.wait_readable(timeout)
            return
        if self._awaiting:
            now = time.perf_counter()
            due = min(end for end in self._due.values()) if self._due else now
            nap = due - now - _DONE_EARLY
            if nap > 0:
                if timeout is not None:
                    nap = min(nap, timeout)
                if wait_spinning(rx, nap, 0.0):
                    return
                if timeout is not None:
                    timeout = max(0.0, timeout - nap)
            wait_spinning(rx, timeout, _DONE_SPIN)
        elif self._sends:
            wait_spinning(rx, timeout, _ANSWER_SPIN)
        else:
            rx.wait_readable(timeout)

    def _has_bytes(self) -> bool:
        w = self._wire
        return w.readable_now() if not self._closed and self._dead_error() is None else False

    def _input_ready(self) -> bool:
        """A message of ours is queued, or bytes wait in the rings, or the
        channel ended (the hub's lock is held)."""
        if self._dead_error() is not None:
            return True
        for a in self._hub.queue:
            if a.chan is self:
                return True
        if self._peer is None and self._has_bytes():
            self._pump()                 # the peer's hello is not a message
            return self._input_ready()
        return self._has_bytes()

    # -- frames ------------------------------------------------------------------

    def _pump(self, deep: bool = False) -> bool:
        """Handle the frames that have arrived (the hub's lock is held)."""
        if self._closed or self._error is not None or self._eof:
            return False
        did = False
        rx = self._rx
        try:
            while True:
                if rx is not None:
                    if not rx.readable() and (did or not deep):
                        return did
                    if self._peer is not None:
                        r = read_msg(rx, _FAST_MAX)
                        if r is not None:
                            self._msgs_in += 1
                            self._stream.bytes_received += r[5]
                            self._on_fast(r)
                            did = True
                            continue
                got = self._wire.try_header(self._hdr)
                if got is None:
                    return did
                if got is False:
                    self._ended(None)
                    return True
                self._frame(check_header(Header(self._hdr)))
                did = True
        except (ConnectionError, OSError, EOFError, MemoryError) as e:
            if self._closed:
                return did
            if isinstance(e, MemoryError):
                e = ProtocolError("the peer announced a message too large to allocate")
            self._ended(e)
            return True

    def _ended(self, error: Optional[BaseException]) -> None:
        self._fast_off()
        if error is None:
            self._eof = True
        else:
            self._error = error
            if isinstance(error, ProtocolError):
                # A peer that breaks the protocol is hung up on.
                self._closed = True
                self._teardown()
        for req in self._sends.values():
            req._finish(error=error or BrokenPipeError(errno.EPIPE, "the peer closed the channel"))
        self._sends.clear()
        for item in self._awaiting.values():
            item[0]._finish(error=error or ConnectionResetError(
                "the peer closed the channel in the middle of a message"))
        self._awaiting.clear()
        self._due.clear()
        self._cts_at.clear()
        self._offers.clear()
        self._offers_in.clear()
        self._hub.fail_channel(self)

    def _frame(self, h: Header) -> None:
        k = h.kind
        if k == HELLO:
            self._on_hello(h)
            return
        if self._peer is None:
            raise ProtocolError("the peer did not say hello first")
        if k == MSG:
            self._on_msg(h)
        elif k == RTS:
            self._on_rts(h)
        elif k == CTS:
            self._on_cts(h)
        elif k == FIN:
            self._on_fin(h)
        elif k in (DONE, DATA):
            self._on_done(h)
        elif k == PUT:
            _offer.on_put(self, h)
        elif k == RTR:
            _offer.on_rtr(self, h)
        elif k == REVOKE:
            _offer.on_revoke(self, h)

    def _read_descs(self, h: Header, addresses: bool) -> list:
        if not h.nbufs:
            if h.total:
                raise ProtocolError("buffer bytes announced without buffers")
            return []
        raw = bytearray(h.nbufs * DESC.size)
        self._wire.read_into(memoryview(raw))
        return check_descs(raw, h.nbufs, h.total, addresses)

    def _read_body(self, h: Header) -> bytes:
        if not h.body_len:
            return b""
        b, view = _alloc(P_BYTES, h.body_len)
        self._wire.read_into(view)
        return b

    def _copied_in(self, n: int) -> None:
        _cma.stats["received_copied"] += n

    def _on_msg(self, h: Header) -> None:
        descs = self._read_descs(h, False)
        self._msgs_in += 1
        req = self._hub.match_arrival(self, h.tag)
        objs, views, short = _destinations(req, h.ptype, [n for n, _ in descs])
        for v in views:
            if len(v):
                self._wire.read_into(v)
        self._copied_in(h.total)
        body = self._read_body(h)
        if req is None:
            self._hub.queue.append(_Arrived(self, h, descs, body, objs))
        else:
            self._deliver(req, h.ptype, h.tag, body, objs, short)

    def _on_fast(self, r: tuple) -> None:
        """An eager message read whole by the C path (the hub's lock is held)."""
        ptype, tag, body, buf, _pid, _n = r
        objs = [] if buf is None else [buf]
        n = 0 if buf is None else len(buf)
        req = self._hub.match_arrival(self, tag)
        if req is None:
            a = _Arrived.__new__(_Arrived)
            a.chan, a.kind, a.ptype, a.tag, a.mid, a.pid = self, MSG, ptype, tag, 0, _pid
            a.descs, a.body, a.bufs, a.nbytes = [(n, 0)] if buf is not None else [], body, objs, n + len(body)
            self._hub.queue.append(a)
            return
        short = False
        if req.into is not None and objs:
            views = _into_slices(req.into, [n])
            if views is None:
                short = True
            else:
                copy_in(views[0], buf)
                objs = views
        self._deliver(req, ptype, tag, body, objs, short)

    def _deliver(self, req: Request, ptype: int, tag: int, body: Any, objs: list, short: bool) -> None:
        try:
            obj = decode(ptype, body, objs)
        except ProtocolError as e:
            req._finish(error=e)
            return
        if req.into is not None and ptype != P_PICKLE and not short:
            obj = objs[0]
        msg = Message(obj, tag, self)
        if short:
            req._finish(error=BufferTooShort(msg))
        else:
            req._finish(msg)

    def _on_rts(self, h: Header) -> None:
        descs = self._read_descs(h, True)
        body = self._read_body(h)
        self._msgs_in += 1
        self._announced(h, descs, body, RTS)

    def _announced(self, h: Header, descs: list, body: Any, kind: int) -> None:
        """A large message announced (an RTS, or a PUT whose offer is gone)."""
        req = self._hub.match_arrival(self, h.tag)
        a = _Arrived(self, h, descs, body, None)
        a.kind = kind
        if req is None:
            self._hub.queue.append(a)
        else:
            req._early = True
            self._rendezvous(a, req, early=True)

    def _take_queued(self, a: _Arrived, req: RecvRequest) -> None:
        """A receive posted after its message arrived (the hub's lock is held)."""
        if a.kind == MSG:
            objs, short = a.bufs, False
            if req.into is not None:
                views = _into_slices(req.into, [len(memoryview(o)) for o in a.bufs])
                if views is None:
                    short = True
                else:
                    for v, o in zip(views, a.bufs):
                        copy_in(v, o)
                    objs = views
            self._deliver(req, a.ptype, a.tag, a.body, objs, short)
        else:
            try:
                self._rendezvous(a, req, early=False)
            except (ConnectionError, OSError) as e:
                req._finish(error=e)

    def _rendezvous(self, a: _Arrived, req: RecvRequest, early: bool, answer_tag: int = 0) -> None:
        lens = [n for n, _ in a.descs]
        objs, views, short = _destinations(req, a.ptype, lens)
        refs = [_cma.BufferRef(v, writable=True) for v in views]
        local = _cma.ranges(refs)
        if not early and self._may_copy(a.pid):
            try:
                _cma.pull(a.pid, local, [(addr, n) for n, addr in a.descs])
            except OSError as e:
                if e.errno == errno.ESRCH:
                    for r in refs:
                        r.release()
                    raise ConnectionResetError(errno.ECONNRESET, "the sender is gone") from e
                self._verified[a.pid] = False          # copy it the other way
            else:
                for r in refs:
                    r.release()
                self._write([header(FIN, mid=a.mid, pid=_PID)])
                self._deliver(req, a.ptype, a.tag, a.body, objs, short)
                return
        # Ask the sender to write into our destination (or, if it cannot,
        # to send the bytes inline).
        self._await_copy(a, req, objs, views, refs, short)
        if _cma.available():
            descs = b"".join(DESC.pack(r.nbytes, r.addr) for r in refs)
            self._write([header(CTS, tag=answer_tag, nbufs=len(refs), mid=a.mid, total=sum(lens),
                                pid=_PID), descs])
        else:
            self._write([header(CTS, tag=answer_tag, mid=a.mid, pid=_PID)])

    def _await_copy(self, a: _Arrived, req: RecvRequest, objs: list, views: list, refs: list,
                    short: bool) -> None:
        """The sender will write ``a`` into ``views`` (or send it inline)."""
        self._awaiting[a.mid] = (req, a, objs, views, refs, short)
        now = time.perf_counter()
        self._cts_at[a.mid] = now
        self._due[a.mid] = now + a.nbytes / self._rate

    def _on_cts(self, h: Header) -> None:
        descs = self._read_descs(h, True)
        req = self._sends.pop(h.mid, None)
        if req is None:
            if _offer.stale_cts(h) and h.mid < self._next_mid:
                return                   # we wrote into the offer already
            raise ProtocolError(f"clear to send for unknown message {h.mid}")
        lens = [b.nbytes for b in req.bufs]
        if descs and [n for n, _ in descs] != lens:
            raise ProtocolError("clear to send with other buffer lengths than sent")
        self._write_out(req, h.mid, h.pid, [(addr, n) for n, addr in descs])

    def _write_out(self, req: SendRequest, mid: int, pid: int, remote: list) -> None:
        """Write a large message's buffers into the receiver's ``remote``
        ranges and say DONE (or, if we may not, send them inline: DATA)."""
        pushed = False
        if remote and self._may_copy(pid):
            try:
                _cma.push(pid, _cma.ranges(req._refs), remote)
                pushed = True
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ConnectionResetError(errno.ECONNRESET, "the receiver is gone") from e
                self._verified[pid] = False
        if pushed:
            self._write([header(DONE, mid=mid, pid=_PID)])
        else:
            lens = [b.nbytes for b in req.bufs]
            total = sum(lens)
            d = b"".join(DESC.pack(n, 0) for n in lens)
            self._write([header(DATA, nbufs=len(lens), mid=mid, total=total), d, *req.bufs])
            _cma.stats["sent_copied"] += total
        req._finish()

    def _on_fin(self, h: Header) -> None:
        if h.nbufs or h.total or h.body_len:
            raise ProtocolError("bad FIN")
        req = self._sends.pop(h.mid, None)
        if req is None:
            raise ProtocolError(f"FIN for unknown message {h.mid}")
        req._finish()

    def _on_done(self, h: Header) -> None:
        item = self._awaiting.pop(h.mid, None)
        if item is None:
            raise ProtocolError(f"data for unknown message {h.mid}")
        req, a, objs, views, refs, short = item
        self._due.pop(h.mid, None)
        sent = self._cts_at.pop(h.mid, None)
        if sent is not None and h.kind == DONE and a.nbytes >= (1 << 20):
            took = time.perf_counter() - sent
            if took > 0:
                self._rate = max(1e8, a.nbytes / took)
        for r in refs:
            r.release()
        if h.kind == DATA:
            descs = self._read_descs(h, False)
            if [n for n, _ in descs] != [n for n, _ in a.descs]:
                raise ProtocolError("inline data with other buffer lengths than announced")
            for v in views:
                if len(v):
                    self._wire.read_into(v)
            self._copied_in(h.total)
        elif h.nbufs or h.total or h.body_len:
            raise ProtocolError("bad DONE")
        self._deliver(req, a.ptype, a.tag, a.body, objs, short)

    # -- closing --------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        try:
            self._sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """Close the channel; pending requests on it fail."""
        if self._closed:
            return
        if _CHANNELS.get(self._cid) is self:
            del _CHANNELS[self._cid]
        with self._hub.lock:
            self._closed = True
            self._fast_off()
            if self._fp is not None:
                # (drop the cycle channel -> bound short cuts -> channel)
                self.__dict__.pop("send", None)
                self.__dict__.pop("recv", None)
                self._fp = None
            for req in self._sends.values():
                req._finish(error=OSError(errno.EBADF, "the channel is closed"))
            self._sends.clear()
            for item in self._awaiting.values():
                item[0]._finish(error=OSError(errno.EBADF, "the channel is closed"))
                for r in item[4]:
                    r.release()
            self._awaiting.clear()
            self._due.clear()
            self._cts_at.clear()
            self._offers.clear()
            self._offers_in.clear()
            self._hub.queue[:] = [a for a in self._hub.queue if a.chan is not self]
            if self in self._hub.channels:
                self._hub.fail_channel(self)
                self._hub.channels.remove(self)
        self._teardown()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._teardown()
        except Exception:
            pass
