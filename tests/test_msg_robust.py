"""shrimpio.msg: one copy in total and none by a receiver that posted in
time (counted on the path, not timed); dead peers; hostile frames."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shrimpio import msg
from shrimpio.msg import _frame
from shrimpio.msg._listen import socket_pair
from shrimpio.msg._channel import Channel

from msg_helpers import cma_works, fork, join
from children import reap

np = pytest.importorskip("numpy")

N = 8 << 20


def _delta(before: dict) -> dict:
    now = msg.copy_stats()
    return {k: now[k] - before[k] for k in now}


def _sender(a, wait_go: bool) -> None:
    """Send one N-byte array (after "go" if asked), then report the bytes
    this process copied for it."""
    arr = np.full(N, 7, dtype=np.uint8)
    if wait_go:
        a.recv_message(tag=0)
    s0 = msg.copy_stats()
    a.send(arr, tag=1)
    a.send(_delta(s0), tag=2)
    a.recv_message(tag=3)


needs_cma = pytest.mark.skipif(not cma_works(), reason="cross-memory copies refused here "
                               "(Yama ptrace scope or seccomp): large messages go through the rings")


@needs_cma
def test_posted_in_time_no_receiver_copy():
    a, b = msg.Pipe()
    with a, b:
        pid = fork(_sender, a, True, close=(b,))
        dest = np.zeros(N, dtype=np.uint8)
        req = b.irecv(tag=1, into=dest)           # posted before the message exists
        s0 = msg.copy_stats()
        b.send("go", tag=0)
        m = req.wait(timeout=60)
        mine = _delta(s0)
        theirs = b.recv_message(tag=2).payload
        b.send(None, tag=3)
        join(pid)
        assert mine["received_copied"] == 0                 # the receiver moved nothing
        assert theirs["sent_copied"] == N                   # the sender's one copy
        assert np.shares_memory(m.payload, dest) and (dest == 7).all()


@needs_cma
def test_posted_late_one_receiver_copy():
    a, b = msg.Pipe()
    with a, b:
        pid = fork(_sender, a, False, close=(b,))
        deadline = time.monotonic() + 60
        while b.iprobe(tag=1) is None:                    # the message has arrived
            assert time.monotonic() < deadline
            b.poll(0.01)
        dest = np.zeros(N, dtype=np.uint8)
        s0 = msg.copy_stats()
        b.recv_into(dest, tag=1)
        mine = _delta(s0)
        theirs = b.recv_message(tag=2).payload
        b.send(None, tag=3)
        join(pid)
        assert mine["received_copied"] == N                 # one copy, by the receiver
        assert theirs["sent_copied"] == 0
        assert (dest == 7).all()


@needs_cma
def test_plain_recv_one_copy_in_total():
    a, b = msg.Pipe()
    with a, b:
        pid = fork(_sender, a, True, close=(b,))
        s0 = msg.copy_stats()
        b.send("go", tag=0)
        m = b.recv_message(tag=1)                         # a new array, posted in time
        mine = _delta(s0)
        theirs = b.recv_message(tag=2).payload
        b.send(None, tag=3)
        join(pid)
        assert mine["received_copied"] + theirs["sent_copied"] == N
        assert m.payload.shape == (N,) and (m.payload == 7).all()


def test_small_messages_copy_through_the_rings():
    a, b = msg.Pipe()
    with a, b:
        s0 = msg.copy_stats()
        a.send(b"y" * 1000)
        assert b.recv_message().payload == b"y" * 1000
        d = _delta(s0)
        assert d == {"received_copied": 1000, "sent_copied": 1000}


# -- dead peers ----------------------------------------------------------------------------

def _sleeper(a) -> None:
    a.send("ready")
    time.sleep(60)


@pytest.mark.parametrize("blocked_in", ["recv", "large send", "probe", "listener"])
def test_dead_peer_is_an_error_at_once(blocked_in):
    if blocked_in == "listener":
        lst = msg.listen()
        other = msg.connect(lst.address)

        def child():
            with msg.connect(lst.address) as ch:
                _sleeper(ch)

        pid = fork(child, close=(lst, other))
        first = lst.recv(timeout=30)
        assert first.payload == "ready"
        victim = first.source
    else:
        a, b = msg.Pipe()
        pid = fork(_sleeper, a, close=(b,))
        a.close()                          # the child's end is the child's alone
        assert b.recv_message(timeout=30).payload == "ready"
    t0 = [0.0]

    def kill_soon():
        time.sleep(0.2)
        t0[0] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    import threading
    th = threading.Thread(target=kill_soon)
    th.start()
    try:
        if blocked_in == "recv":
            with pytest.raises((ConnectionResetError, EOFError)):
                b.recv_message()
        elif blocked_in == "large send":
            with pytest.raises((ConnectionResetError, BrokenPipeError, EOFError)):
                b.send(np.zeros(1 << 20, dtype=np.uint8))   # waits for the dead one's answer
        elif blocked_in == "probe":
            with pytest.raises((ConnectionResetError, EOFError)):
                b.probe()
        else:
            with pytest.raises((ConnectionResetError, EOFError)):
                lst.recv(source=victim)
        elapsed = time.monotonic() - t0[0]
    finally:
        th.join()
        reap(pid, 10)
    assert elapsed < 1.0, f"the death was seen after {elapsed:.3f}s"
    if blocked_in == "listener":
        other.send("still here")
        assert lst.recv(timeout=10).payload == "still here"     # the others go on
        other.close()
        lst.close()
    else:
        a.close()
        b.close()


# -- hostile frames ------------------------------------------------------------------------

def _hello(pid=1, magic=_frame.MAGIC, version=_frame.VERSION) -> bytes:
    body = _frame.HELLO_BODY.pack(magic, version, 0, pid, 4096, b"t" * 16, 7)
    return _frame.header(_frame.HELLO, body_len=len(body)) + body


def _msg(ptype=0, tag=0, body=b"", bufs=(), nbufs=None, total=None) -> bytes:
    descs = b"".join(_frame.DESC.pack(len(x), 0) for x in bufs)
    t = sum(len(x) for x in bufs) if total is None else total
    n = len(bufs) if nbufs is None else nbufs
    return _frame.header(_frame.MSG, ptype, n, len(body), tag, 0, t, 1) + descs + b"".join(bufs) + body


GOOD = _msg(body=__import__("pickle").dumps("fine"))

BAD = {
    "no hello first": GOOD,
    "hello with another magic": _hello(magic=b"XXXX"),
    "hello of another version": _hello(version=99),
    "unknown kind": _hello() + _frame.HEADER.pack(99, 0, 0, 0, 0, 0, 0, 0),
    "unknown payload type": _hello() + _frame.HEADER.pack(_frame.MSG, 77, 0, 0, 0, 0, 0, 0),
    "negative tag": _hello() + _frame.HEADER.pack(_frame.MSG, 0, 0, 0, -5, 0, 0, 0),
    "too many buffers": _hello() + _frame.HEADER.pack(_frame.MSG, 0, 60000, 0, 0, 0, 0, 0),
    "huge body": _hello() + _frame.HEADER.pack(_frame.MSG, 0, 0, 0xFFFFFFFF, 0, 0, 0, 0),
    "lengths not adding up": _hello() + _msg(bufs=[b"abc"], total=10),
    "raw message with two buffers": _hello() + _msg(ptype=1, bufs=[b"a", b"b"]),
    "clear to send for nothing": _hello() + _frame.header(_frame.CTS, mid=12345),
    "FIN for nothing": _hello() + _frame.header(_frame.FIN, mid=7),
    "DONE for nothing": _hello() + _frame.header(_frame.DONE, mid=7),
    "RTS to address 0": _hello() + _frame.header(_frame.RTS, 0, 1, 0, 0, 9, 5, 1)
    + _frame.DESC.pack(5, 0),
    "second hello": _hello() + _hello(),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_hostile_frames_end_that_channel_only(case):
    raw, mine = socket_pair()
    ch = Channel(mine)
    try:
        raw.sendall(BAD[case])
        with pytest.raises(msg.ProtocolError):
            ch.recv_message(timeout=10)
        assert ch.closed
        with pytest.raises((OSError, EOFError)):
            ch.send("more")
    finally:
        ch.close()
        raw.close()


def test_hostile_client_of_a_listener_harms_no_other():
    from shrimpio.socket import socket as ShmSocket
    import socket as _std
    lst = msg.listen()
    with lst:
        good = msg.connect(lst.address)
        bad = ShmSocket(_std.AF_INET, _std.SOCK_STREAM)
        bad.connect(lst.address)
        try:
            bad.sendall(BAD["unknown kind"])
            good.send("hello", tag=4)
            assert lst.recv(timeout=10).payload == "hello"
            deadline = time.monotonic() + 10
            while len(lst.channels) != 1:          # the bad one was hung up on
                assert time.monotonic() < deadline
                lst.poll(0.01)
            assert bad.recv(100, _std.MSG_DONTWAIT) or True   # its hello, then the end
        finally:
            bad.close()
            good.close()


def test_garbage_pickle_fails_that_message_only():
    raw, mine = socket_pair()
    ch = Channel(mine)
    try:
        raw.sendall(_hello() + _msg(body=b"\x80\x05garbage") + GOOD)
        with pytest.raises(Exception):
            ch.recv_message(timeout=10)
        assert ch.recv_message(timeout=10).payload == "fine"
    finally:
        ch.close()
        raw.close()
