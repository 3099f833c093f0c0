"""shrimpio.msg ready to receive (_offer.py): a receive posted with a large
buffer is offered to the sender, which writes into it at once (PUT, then
DONE; no RTS/CTS round trip); an offer a message went past is not used;
an offered receive can be cancelled, and a cancel that races a PUT
either wins (the message goes on as an RTS) or fails (the receive takes
the message)."""

from __future__ import annotations

import ctypes
import os
import time
from types import SimpleNamespace

import pytest

from shrimpio import msg
from shrimpio.msg import _frame
from shrimpio.msg._channel import Channel
from shrimpio.msg._listen import socket_pair

from msg_helpers import cma_works, fork, join

np = pytest.importorskip("numpy")

needs_cma = pytest.mark.skipif(not cma_works(), reason="cross-memory copies refused here")

N = 4 << 20


def _delta(before: dict) -> dict:
    now = msg.copy_stats()
    return {k: now[k] - before[k] for k in now}


def _offered_sender(a) -> None:
    """Wait for "go", send an N-byte array, report whether it took the
    receiver's offer (no RTS left waiting, the offer used up)."""
    arr = np.full(N, 9, dtype=np.uint8)
    a.recv_message(tag=0)
    had = len(a._offers_in)
    s0 = msg.copy_stats()
    mid0 = a._next_mid
    a.send(arr, tag=1)
    a.send({"had": had, "left": len(a._offers_in), "mids": a._next_mid - mid0,
            "copied": _delta(s0)["sent_copied"]}, tag=2)
    a.recv_message(tag=3)


@needs_cma
def test_posted_receive_is_offered_and_the_sender_writes_into_it():
    a, b = msg.Pipe()
    with a, b:
        pid = fork(_offered_sender, a, close=(b,))
        try:
            dest = np.zeros(N, dtype=np.uint8)
            req = b.irecv(tag=1, into=dest)           # offered: an RTR goes to the sender
            assert len(b._offers) == 1
            s0 = msg.copy_stats()
            b.send("go", tag=0)                       # (after the RTR, in the same ring)
            m = req.wait(timeout=60)
            mine = _delta(s0)
            report = b.recv_message(tag=2).payload
            b.send(None, tag=3)
        finally:
            join(pid)
        assert report == {"had": 1, "left": 0, "mids": 1, "copied": N}
        assert mine["received_copied"] == 0           # the receiver moved nothing
        assert np.shares_memory(m.payload, dest) and (dest == 9).all()
        assert not b._offers and not b._awaiting      # nothing left of it


def test_offer_in_one_process_and_the_frames_it_took():
    a, b = msg.Pipe()
    with a, b:
        src = np.arange(1 << 18, dtype=np.int64)
        dest = np.zeros_like(src)
        req = b.irecv(into=dest)
        s0 = msg.copy_stats()
        a.send(src, tag=4)                 # takes the offer: written into dest now
        assert not a._sends and not a._offers_in
        m = req.wait(10)
        assert m.tag == 4 and np.shares_memory(m.payload, dest) and np.array_equal(dest, src)
        assert _delta(s0) == {"received_copied": 0, "sent_copied": src.nbytes}


def test_an_offer_a_message_went_past_is_not_used():
    """The sender sends a small message before it reads the offer: that
    message takes the offered receive, and the large one after it must
    not be written into that buffer (the offer is stale)."""
    a, b = msg.Pipe()
    with a, b:
        dest = np.zeros(1 << 20, dtype=np.uint8)
        req = b.irecv(into=dest)                  # offered, not yet read by a
        a.send(b"small")                          # C path: a reads nothing before it writes
        big = np.full(1 << 20, 5, dtype=np.uint8)
        a.send(big)                               # sees the offer, stale: an RTS
        m = req.wait(10)
        assert bytes(m.payload) == b"small"
        assert bytes(dest[:5]) == b"small" and not dest[5:].any()   # nothing else in it
        assert np.array_equal(b.recv_message().payload, big)


def test_offers_are_not_made_where_another_receive_comes_first():
    a, b = msg.Pipe()
    with a, b:
        first = b.irecv(tag=msg.ANY)              # no buffer: not offered
        second = b.irecv(tag=2, into=bytearray(1 << 20))
        assert not b._offers                      # a tag-2 message goes to `first`
        third = b.irecv(tag=3, into=bytearray(1 << 20))
        assert first.cancel()
        a.send(b"x" * (1 << 17), tag=3)           # `third`'s tag: not offered either
        assert bytes(third.wait(10).payload) == b"x" * (1 << 17)
        assert second.cancel()


def test_listener_offers_only_receives_from_one_channel():
    with msg.listen() as lst:
        ch = msg.connect(lst.address)
        with ch:
            src = lst.accept(timeout=10)
            anyone = lst.irecv(into=bytearray(1 << 20))         # any source: not offered
            assert not src._offers
            assert anyone.cancel()
            mine = lst.irecv(source=src, into=bytearray(1 << 20))
            assert len(src._offers) == 1
            big = np.arange(1 << 17, dtype=np.int64)
            ch.send(big)
            assert np.array_equal(mine.wait(10).payload, big)
            assert not ch._offers_in and not ch._sends


def test_cancel_before_the_sender_takes_the_offer():
    a, b = msg.Pipe()
    with a, b:
        dest = np.zeros(1 << 20, dtype=np.uint8)
        req = b.irecv(tag=1, into=dest)
        assert req.cancel() and req.cancelled
        assert not b._offers
        big = np.full(1 << 20, 3, dtype=np.uint8)
        a.send(big, tag=1)                        # reads the RTR and its REVOKE: not used
        assert not a._offers_in
        assert not dest.any()                     # the cancelled buffer was not written
        assert np.array_equal(b.recv_message(tag=1).payload, big)


# -- the race of a cancel and a PUT, played by a scripted sender ---------------------------------

class _Peer:
    """The raw other end of a Channel: writes frames, reads what it says."""

    def __init__(self) -> None:
        self.raw, mine = socket_pair()
        self.token = ctypes.create_string_buffer(os.urandom(16), 16)
        self.ch = Channel(mine)
        self.hello()

    def hello(self) -> None:
        body = _frame.HELLO_BODY.pack(_frame.MAGIC, _frame.VERSION, 0, os.getpid(),
                                      ctypes.addressof(self.token), self.token.raw, 99)
        self.raw.sendall(_frame.header(_frame.HELLO, body_len=len(body)) + body)
        assert self.frame().kind == _frame.HELLO

    def read(self, n: int) -> bytes:
        out = b""
        self.raw.settimeout(10)
        while len(out) < n:
            got = self.raw.recv(n - len(out))
            assert got
            out += got
        return out

    def frame(self) -> SimpleNamespace:
        h = _frame.Header(self.read(_frame.HEADER.size))
        descs = [_frame.DESC.unpack(self.read(16)) for _ in range(h.nbufs)]
        return SimpleNamespace(kind=h.kind, tag=h.tag, mid=h.mid, descs=descs,
                               body=self.read(h.body_len))

    def put(self, rid: int, src: bytearray, mid: int = 1) -> bytes:
        addr = ctypes.addressof((ctypes.c_char * len(src)).from_buffer(src))
        return (_frame.header(_frame.PUT, _frame.P_BYTEARRAY, 1, 0, 0, mid, len(src), os.getpid())
                + _frame.DESC.pack(len(src), addr) + _frame.RID.pack(rid))

    def close(self) -> None:
        self.ch.close()
        self.raw.close()


@needs_cma
def test_cancel_after_the_put_fails_and_the_receive_takes_the_message():
    """The sender wrote PUT before it could see the REVOKE: the cancel
    fails, the receiver answers CTS (tag CTS_TO_PUT) in case the sender
    saw the REVOKE, and the message lands in the offered buffer."""
    p = _Peer()
    try:
        dest = bytearray(1 << 17)
        req = p.ch.irecv(into=dest)
        rtr = p.frame()
        assert rtr.kind == _frame.RTR and rtr.descs[0][0] == len(dest)
        src = bytearray(b"q" * len(dest))
        p.raw.sendall(p.put(rtr.mid, src))      # the claim is in the ring ...
        assert not req.cancel()                 # ... before the REVOKE was written
        assert not req.done
        assert p.frame().kind == _frame.REVOKE
        cts = p.frame()
        assert cts.kind == _frame.CTS and cts.tag == _frame.CTS_TO_PUT and cts.mid == 1
        # (a sender that had not seen the REVOKE wrote already; one that saw it writes now)
        p.raw.sendall(_frame.header(_frame.DATA, nbufs=1, mid=1, total=len(src))
                      + _frame.DESC.pack(len(src), 0) + bytes(src))
        m = req.wait(10)
        assert bytes(m.payload) == bytes(src) and dest == src
    finally:
        p.close()


@needs_cma
def test_cancel_before_the_put_wins_and_the_put_is_an_rts():
    """The REVOKE was written before the PUT: the cancel succeeds, the
    buffer is not written, and the PUT goes on as an RTS (pulled by the
    next receive, the sender told FIN)."""
    p = _Peer()
    try:
        dest = bytearray(1 << 17)
        req = p.ch.irecv(into=dest)
        rtr = p.frame()
        assert req.cancel() and req.cancelled
        assert p.frame().kind == _frame.REVOKE
        src = bytearray(b"z" * len(dest))
        p.raw.sendall(p.put(rtr.mid, src, mid=7))
        m = p.ch.recv(timeout=10)
        assert m.payload == src and not any(dest)
        fin = p.frame()
        assert fin.kind == _frame.FIN and fin.mid == 7
    finally:
        p.close()


def test_hostile_offer_frames():
    for raw in (_frame.header(_frame.RTR, nbufs=0, body_len=_frame.RTR_BODY.size, total=1 << 20),
                _frame.header(_frame.RTR, nbufs=1, body_len=3, total=1 << 20),
                _frame.header(_frame.REVOKE, body_len=5)):
        p = _Peer()
        try:
            p.raw.sendall(raw)
            with pytest.raises(msg.ProtocolError):
                p.ch.recv(timeout=10)
        finally:
            p.close()
    # a PUT into a receive too small for it
    p = _Peer()
    try:
        req = p.ch.irecv(into=bytearray(1 << 16))
        rtr = p.frame()
        p.raw.sendall(p.put(rtr.mid, bytearray(1 << 17)))
        with pytest.raises(msg.ProtocolError):
            req.wait(10)
    finally:
        p.close()


def test_isend_announces_and_does_not_copy_at_once():
    """An isend returns at once (RTS), offer or not: the copy is made when
    the sender next makes progress, into the same posted buffer."""
    a, b = msg.Pipe()
    with a, b:
        src = np.arange(1 << 18, dtype=np.int64)
        dest = np.zeros_like(src)
        req = b.irecv(into=dest)
        s = a.isend(src)
        assert not s.done and a._sends and not dest.any()
        s.wait(10)                            # (one thread: the receiver answers CTS in it)
        m = req.wait(10)
        assert np.array_equal(dest, src) and np.shares_memory(m.payload, dest)
        # the offer it did not take is stale now, and not used for the next send
        a.send(src + 1)
        assert not a._offers_in
        assert np.array_equal(b.recv_message().payload, src + 1) and np.array_equal(dest, src)


def _numbered_sender(a, k: int, n: int) -> None:
    for i in range(k):
        a.send(np.full(n, i + 1, dtype=np.uint8), tag=1)
    a.recv_message(tag=3)


@needs_cma
def test_cancels_racing_a_sender_lose_nothing_and_write_no_cancelled_buffer():
    """Offered receives cancelled at random moments while another process
    sends: every message arrives once, in order; a buffer whose receive
    was cancelled is never written; one whose cancel failed holds its
    message."""
    import random
    k, n = 30, 1 << 20
    a, b = msg.Pipe()
    with a, b:
        pid = fork(_numbered_sender, a, k, n, close=(b,))
        try:
            got, cancelled, rng = [], 0, random.Random(5)
            deadline = time.monotonic() + 120
            while len(got) < k:
                assert time.monotonic() < deadline
                dest = np.zeros(n, dtype=np.uint8)
                r = b.irecv(tag=1, into=dest)
                end = time.perf_counter() + rng.random() * 0.002
                while time.perf_counter() < end and not r.test():
                    pass
                if r.cancel():
                    cancelled += 1
                    assert not dest.any()              # never written
                    continue
                m = r.wait(30)
                v = int(m.payload[0])
                assert np.shares_memory(m.payload, dest) and (dest == v).all()
                got.append(v)
            b.send(None, tag=3)
        finally:
            join(pid)
        assert got == list(range(1, k + 1))


def test_a_small_send_while_an_offer_is_held_makes_it_stale():
    """The C send path leaves messages to the general one while offers
    are held (so that every message is counted against them in order);
    a small message sent after the offer was read takes the receive, and
    the offer is dropped, not used for the large one after it."""
    a, b = msg.Pipe()
    with a, b:
        dest = np.zeros(1 << 20, dtype=np.uint8)
        req = b.irecv(into=dest)
        b.send("ping", tag=9)
        assert a.recv_message(tag=9).payload == "ping"      # the offer was read before it
        assert len(a._offers_in) == 1 and a._fp.offered
        a.send(b"small")
        assert not a._offers_in and not a._fp.offered
        a.send(np.full(1 << 20, 4, dtype=np.uint8))
        assert bytes(req.wait(10).payload) == b"small" and not dest[5:].any()
        assert (b.recv_message().payload == 4).all()
