"""shrimpio.msg: tagged messages, order, probes, requests, buffers, many
senders, the TCP path, bad arguments.  Real processes (fork) throughout."""

from __future__ import annotations

import array
import pickle

import pytest

from shrimpio import msg
from shrimpio.msg import ANY, Message, _channel

from msg_helpers import fork, join

np = pytest.importorskip("numpy")


def test_pipe_objects_and_tags_both_ways():
    a, b = msg.Pipe()
    with a, b:
        assert a.shm and b.shm

        def child():
            for i in range(3):
                m = a.recv_message()
                a.send(("echo", m.payload, m.tag), tag=m.tag + 100)

        pid = fork(child, close=(b,))
        b.send({"k": [1, 2]}, tag=1)
        b.send("two", tag=2)
        b.send(None)
        assert b.recv_message(tag=101).payload == ("echo", {"k": [1, 2]}, 1)
        assert b.recv_message(tag=102).payload == ("echo", "two", 2)
        m = b.recv_message(tag=100)
        assert m == Message(("echo", None, 0), 100, b)
        join(pid)


def test_channel_recv_returns_message_with_source():
    lst = msg.listen()
    with lst:
        ch = msg.connect(lst.address)
        with ch:
            ch.send(b"abc", tag=5)
            m = lst.recv()
            assert isinstance(m, Message)
            obj, tag, src = m
            assert (obj, tag) == (b"abc", 5) and src in lst.channels
            src.send(obj.upper(), tag=tag)
            assert ch.recv() == (b"ABC", 5, ch)


def test_order_kept_per_tag_and_out_of_order_tags():
    a, b = msg.Pipe()
    with a, b:
        def child():
            for i in range(200):
                a.send(i, tag=i % 3)
            a.send("end", tag=9)

        pid = fork(child, close=(b,))
        assert b.recv_message(tag=9).payload == "end"        # overtakes all 200
        for t in (2, 0, 1):
            got = [b.recv_message(tag=t).payload for _ in range(len(range(t, 200, 3)))]
            assert got == list(range(t, 200, 3))
        assert b.iprobe() is None
        join(pid)


def test_probe_iprobe_do_not_consume():
    a, b = msg.Pipe()
    with a, b:
        assert b.iprobe() is None
        a.send(b"x" * 10, tag=3)
        st = b.probe(timeout=10)
        assert st.tag == 3 and st.source is b and st.nbytes >= 10
        assert b.iprobe(tag=4) is None
        assert b.iprobe(tag=3) == st
        with pytest.raises(TimeoutError):
            b.probe(tag=4, timeout=0.05)
        assert b.recv_message(tag=3).payload == b"x" * 10
        assert b.iprobe() is None


def test_requests_wait_test_cancel():
    a, b = msg.Pipe()
    with a, b:
        r1 = b.irecv(tag=1)
        r2 = b.irecv(tag=2)
        assert not r1.test() and not r1.done
        assert r2.cancel() is True and r2.cancelled
        with pytest.raises(msg.CancelledError):
            r2.wait()
        with pytest.raises(TimeoutError):
            r1.wait(timeout=0.02)
        s = a.isend([1, 2, 3], tag=1)
        assert s.wait() is None and s.done
        assert r1.wait(timeout=10).payload == [1, 2, 3]
        assert r1.cancel() is False                       # already matched
        a.send("late", tag=2)                             # the cancelled receive did not take it
        assert b.recv_message(tag=2).payload == "late"


def test_receives_match_in_posting_order():
    a, b = msg.Pipe()
    with a, b:
        anyr = b.irecv()
        t1 = b.irecv(tag=1)
        a.send("first", tag=1)
        a.send("second", tag=1)
        assert anyr.wait(10).payload == "first"
        assert t1.wait(10).payload == "second"


@pytest.mark.parametrize("size", [10, 5000, 200_000, 3 << 20])
def test_buffer_types_round_trip(size):
    a, b = msg.Pipe()
    with a, b:
        def child():
            for _ in range(6):
                m = a.recv_message()
                a.send(m.payload, tag=m.tag)

        pid = fork(child, close=(b,))
        data = bytes(range(256)) * (size // 256 + 1)
        data = data[:size]
        cases = [
            data,
            bytearray(data),
            memoryview(data),
            np.frombuffer(data, dtype=np.uint8).copy(),
            {"arr": np.arange(size // 8 + 1, dtype=np.float64), "meta": "m"},
            array.array("i", range(size // 4 + 1)),
        ]
        for i, obj in enumerate(cases):
            b.send(obj, tag=i)
            got = b.recv_message(tag=i).payload
            if isinstance(obj, dict):
                assert got["meta"] == "m" and np.array_equal(got["arr"], obj["arr"])
                assert got["arr"].flags.writeable
            elif isinstance(obj, np.ndarray):
                assert got.dtype == obj.dtype and np.array_equal(got, obj)
            elif isinstance(obj, memoryview):
                assert isinstance(got, memoryview) and got.tobytes() == data
            else:
                assert type(got) is type(obj) and got == obj
        join(pid)


def test_numpy_array_shapes_and_views():
    a, b = msg.Pipe()
    with a, b:
        x = np.arange(3 * 400 * 500, dtype=np.int32).reshape(3, 400, 500)
        cases = (x, np.asfortranarray(x), x[:, ::2, :], x[1])

        def child():
            for obj in cases:
                a.send(obj)

        pid = fork(child, close=(b,))
        for obj in cases:
            got = b.recv_message().payload
            assert got.shape == obj.shape and np.array_equal(got, obj)
        join(pid)


def test_many_senders_one_receiver():
    lst = msg.listen()
    with lst:
        n, each = 4, 50

        def sender(k):
            with msg.connect(lst.address) as ch:
                for i in range(each):
                    ch.send((k, i), tag=k)
                assert ch.recv_message().payload == ("done", k)

        pids = [fork(sender, k, close=(lst,)) for k in range(n)]
        seen: dict = {}
        for _ in range(n * each):
            m = lst.recv(timeout=30)
            k, i = m.payload
            assert m.tag == k
            assert i == seen.get(k, -1) + 1               # order per (source, tag)
            seen[k] = i
            if i == each - 1:
                m.source.send(("done", k))
        assert seen == {k: each - 1 for k in range(n)}
        for pid in pids:
            join(pid)
        # The senders closed: their channels say so, and nothing is left.
        with pytest.raises(TimeoutError):
            lst.recv(timeout=0.05)


def test_listener_source_filter():
    lst = msg.listen()
    with lst:
        c1, c2 = msg.connect(lst.address), msg.connect(lst.address)
        with c1, c2:
            c1.send("one")
            s1 = lst.recv(timeout=10).source
            c2.send("two-a")
            c1.send("one-b")
            assert lst.recv(source=s1, timeout=10).payload == "one-b"
            m = lst.recv(timeout=10)
            assert m.payload == "two-a" and m.source is not s1


def test_eof_after_messages():
    a, b = msg.Pipe()
    with b:
        a.send(1)
        a.send(2)
        a.close()
        assert b.recv_message().payload == 1
        assert b.recv_message().payload == 2
        with pytest.raises(EOFError):
            b.recv_message()
        with pytest.raises(EOFError):
            b.probe()


def test_tcp_path_same_api(monkeypatch):
    monkeypatch.setenv("SHRIMPIO_TCP", "127.0.0.1")
    lst = msg.listen()
    with lst:
        def child():
            with msg.connect(lst.address) as ch:
                assert not ch.shm
                ch.send(np.arange(1 << 20, dtype=np.uint8), tag=1)
                ch.send({"small": 1}, tag=2)
                buf = np.empty(300_000, dtype=np.uint8)
                m = ch.recv_into(buf, tag=3)
                assert m.payload.shape == (300_000,) and buf[-1] == 255

        pid = fork(child, close=(lst,))
        m = lst.recv(tag=1, timeout=30)
        assert not m.source.shm
        assert np.array_equal(m.payload, np.arange(1 << 20, dtype=np.uint8))
        assert lst.recv(tag=2, timeout=30).payload == {"small": 1}
        m.source.send(np.full(300_000, 255, dtype=np.uint8), tag=3)
        join(pid)
        assert "tcp" in str(m.source.info().get("path", "tcp")).lower() or not m.source.shm


def test_bad_arguments():
    a, b = msg.Pipe()
    with a, b:
        with pytest.raises(TypeError):
            a.send(1, tag="x")
        with pytest.raises(ValueError):
            a.send(1, tag=-1)
        with pytest.raises(ValueError):
            a.send(1, tag=1 << 63)
        with pytest.raises(TypeError):
            a.send(1, tag=ANY)
        with pytest.raises(TypeError):
            b.recv_message(tag=1.5)
        with pytest.raises(TypeError):
            b.irecv(into=b"read-only")
        with pytest.raises(TypeError):
            b.irecv(into=42)
        with pytest.raises(BufferError):
            b.irecv(into=np.zeros((4, 4))[:, 1])
        with pytest.raises(TypeError):
            b.irecv(source="someone")
        other_a, other_b = msg.Pipe()
        with other_a, other_b:
            with pytest.raises(ValueError):
                b.irecv(source=other_b)
        with pytest.raises(ValueError):
            b.irecv().wait(timeout=-1)
        with pytest.raises((AttributeError, pickle.PicklingError)):
            a.send(lambda: 1)                       # not picklable: pickle's own error
        with pytest.raises(TypeError):
            msg.connect("not an address")
    with pytest.raises(OSError):
        a.send(1)
    with pytest.raises(OSError):
        b.recv_message()


def test_recv_into_too_short_gives_the_message():
    a, b = msg.Pipe()
    with a, b:
        a.send(b"0123456789")
        small = bytearray(4)
        with pytest.raises(msg.BufferTooShort) as ei:
            b.recv_into(small)
        assert ei.value.args[0].payload == b"0123456789"
        big = np.arange(200_000, dtype=np.uint8)
        req = a.isend(big)              # large: done once the receiver took it
        with pytest.raises(msg.BufferTooShort) as ei:
            b.recv_into(bytearray(10))
        assert np.array_equal(ei.value.args[0].payload, big)
        req.wait(timeout=10)
        a.send("after")
        assert b.recv_message().payload == "after"


def test_recv_into_rebuilds_payload_over_the_buffer():
    a, b = msg.Pipe()
    with a, b:
        for n in (1000, 100_000):
            dest = np.zeros(n, dtype=np.float64)
            req = a.isend(np.arange(n, dtype=np.float64))
            m = b.recv_into(dest)
            req.wait(timeout=10)
            assert np.shares_memory(m.payload, dest) and dest[n - 1] == n - 1
        raw = bytearray(16)
        a.send(b"abc")
        m = b.recv_into(raw)
        assert bytes(m.payload) == b"abc" and raw[:3] == b"abc"


# -- a large message sent and received by one thread -------------------------------------------

@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "numpy", "nested"])
def test_large_send_then_recv_in_one_thread(kind):
    """A large send whose receiver is this thread completes (its buffers
    are copied once, as an eager message's), and the copy is taken at send
    time: changing the buffer afterwards does not change the message."""
    a, b = msg.Pipe()
    with a, b:
        n = 3 << 20
        raw = bytearray(bytes(range(256)) * (n // 256))
        objs = {"bytes": bytes(raw), "bytearray": raw, "memoryview": memoryview(raw).cast("I"),
                "numpy": np.frombuffer(raw, dtype=np.uint32).copy(),
                "nested": {"arr": np.frombuffer(raw, dtype=np.uint8).copy(), "tag": "t"}}
        obj = objs[kind]
        want = bytes(raw)
        a.send(obj, tag=5)                        # returned: no receiver ran meanwhile
        if kind == "bytearray":
            obj[:4] = b"XXXX"
        elif kind in ("numpy",):
            obj[:4] = 0
        elif kind == "nested":
            obj["arr"][:4] = 0
        got = b.recv_message(tag=5).payload
        if kind == "nested":
            assert got["tag"] == "t" and got["arr"].tobytes() == want and got["arr"].flags.writeable
        elif kind == "numpy":
            assert got.dtype == np.uint32 and got.tobytes() == want
        elif kind == "memoryview":
            assert isinstance(got, memoryview) and got.format == "I" and got.tobytes() == want
        else:
            assert type(got) is type(obj) and got == want
        # and both ways, several in a row, without a receive in between
        for i in range(3):
            b.send(np.full(1 << 18, i, dtype=np.int64), tag=i)
        for i in range(3):
            assert np.array_equal(a.recv_message(tag=i).payload, np.full(1 << 18, i, dtype=np.int64))


def test_large_send_in_one_thread_to_a_posted_receive_is_not_copied_by_the_receiver():
    a, b = msg.Pipe()
    with a, b:
        src = np.arange(1 << 20, dtype=np.int64)
        dest = np.zeros_like(src)
        r = b.irecv(tag=1, into=dest)
        before = msg.copy_stats()
        a.send(src, tag=1)                        # the posted receive answers: one copy, by us
        after = msg.copy_stats()
        assert after["sent_copied"] - before["sent_copied"] == src.nbytes
        r.wait(10)
        assert msg.copy_stats()["received_copied"] == before["received_copied"]
        assert np.array_equal(dest, src)
        # the receiver learned the copy's rate (its next DONE wait is timed by it)
        # and keeps nothing of the finished rendezvous
        assert not b._awaiting and not b._due and not b._cts_at and b._rate != _channel._RATE_GUESS
        # isend, a receive, then the wait: also in one thread
        s = a.isend(src * 2, tag=2)
        assert np.array_equal(b.recv_message(tag=2).payload, src * 2)
        s.wait(10)


def test_large_send_to_a_listener_of_this_process_in_one_thread():
    with msg.listen() as lst:
        ch = msg.connect(lst.address)
        with ch:
            lst.accept(timeout=10)                # (the receiving end must exist to be served)
            big = np.arange(1 << 19, dtype=np.float64)
            ch.send(big, tag=3)
            m = lst.recv(tag=3, timeout=10)
            assert np.array_equal(m.payload, big)
            m.source.send(big + 1)
            assert np.array_equal(ch.recv().payload, big + 1)


def test_a_pipe_made_before_a_fork_still_goes_by_rendezvous():
    """Both processes hold both ends after a fork: a send must not take the
    one-thread short cut there (the other process may be the receiver)."""
    a, b = msg.Pipe()
    with a, b:
        def child():
            dest = np.zeros(1 << 20, dtype=np.int64)
            a.recv_into(dest)
            a.send(int(dest.sum()))

        pid = fork(child, close=(b,))
        try:
            assert b._forked and a._forked and b._local_peer() is None
            src = np.arange(1 << 20, dtype=np.int64)
            b.send(src)                           # the child receives it (by rendezvous)
            assert b.recv() == int(src.sum())
        finally:
            join(pid)


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_large_inband_pickle_sent_and_received_in_one_thread(path, monkeypatch):
    """A large message that is not sent by rendezvous (a pickle with large
    in-band parts; anything over kernel TCP) to a channel of this process
    is handed over, not written: the send returns, in order with what was
    written before it, and the receive gets it (a write would block for
    ever on a full ring or socket, the reader being this thread)."""
    if path == "tcp":
        monkeypatch.setenv("SHRIMPIO_TCP", "127.0.0.1")
    with msg.listen() as lst:
        a = msg.connect(lst.address)
        with a:
            b = lst.accept(timeout=10)
            assert a.shm == (path == "shm")
            big = {"x": b"x" * (8 << 20)}
            a.send("before", tag=1)
            a.send(big, tag=1)
            a.send(np.arange(1 << 18), tag=1)
            dest = bytearray(4 << 20)
            r = b.irecv(tag=2, into=dest)
            a.send(b"y" * (3 << 20), tag=2)          # into a posted buffer
            assert lst.recv(tag=1, timeout=10).payload == "before"
            assert lst.recv(tag=1, timeout=10).payload == big
            assert np.array_equal(lst.recv(tag=1, timeout=10).payload, np.arange(1 << 18))
            assert bytes(r.wait(10).payload) == b"y" * (3 << 20) and dest[:3 << 20] == b"y" * (3 << 20)
