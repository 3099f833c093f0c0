"""The same tests against multiprocessing.connection and shrimpio.msg's
drop-in for it: Pipe, Listener, Client, Connection, wait."""

from __future__ import annotations

import array
import multiprocessing
import multiprocessing.connection as mpc
import pickle
import re
import time

import pytest

from shrimpio import msg

from msg_helpers import fork, join

np = pytest.importorskip("numpy")


class _Std:
    name = "multiprocessing"
    Pipe = staticmethod(mpc.Pipe)
    Listener = mpc.Listener
    Client = staticmethod(mpc.Client)
    wait = staticmethod(mpc.wait)


class _Shrimp:
    name = "shrimpio.msg"
    Pipe = staticmethod(msg.Pipe)
    Listener = msg.Listener
    Client = staticmethod(msg.Client)
    wait = staticmethod(msg.wait)


@pytest.fixture(params=[_Std, _Shrimp], ids=lambda m: m.name)
def mod(request):
    return request.param


class TestConnection:
    def test_objects_both_ways(self, mod):
        a, b = mod.Pipe()
        with a, b:
            for obj in (None, 0, "s", b"b", bytearray(b"ba"), [1, (2, 3)], {"k": {1, 2}},
                        list(range(10000)), np.arange(12).reshape(3, 4)):
                a.send(obj)
                got = b.recv()
                if isinstance(obj, np.ndarray):
                    assert np.array_equal(got, obj)
                else:
                    assert got == obj and type(got) is type(obj)
                b.send(obj if not isinstance(obj, np.ndarray) else 1)
                a.recv()

    def test_send_bytes_offset_size(self, mod):
        a, b = mod.Pipe()
        with a, b:
            data = b"0123456789"
            a.send_bytes(data)
            a.send_bytes(data, 2)
            a.send_bytes(data, 2, 3)
            a.send_bytes(array.array("i", [1, 2, 3]), 4, 4)
            a.send_bytes(b"")
            assert b.recv_bytes() == data
            assert b.recv_bytes() == data[2:]
            assert b.recv_bytes() == data[2:5]
            assert b.recv_bytes() == array.array("i", [2]).tobytes()
            assert b.recv_bytes() == b""
            for args, text in [((-1,), "offset is negative"), ((11,), "buffer length < offset"),
                               ((0, -1), "size is negative"), ((5, 6), "buffer length < offset + size")]:
                with pytest.raises(ValueError, match=re.escape(text)):
                    a.send_bytes(data, *args)

    def test_bytes_and_pickles_interoperate(self, mod):
        a, b = mod.Pipe()
        with a, b:
            a.send_bytes(pickle.dumps({"x": 1}))
            assert b.recv() == {"x": 1}
            a.send([1, 2])
            assert pickle.loads(b.recv_bytes()) == [1, 2]

    def test_recv_bytes_maxlength(self, mod):
        a, b = mod.Pipe()
        with a, b:
            with pytest.raises(ValueError, match="negative maxlength"):
                b.recv_bytes(-1)
            a.send_bytes(b"x" * 10)
            a.send_bytes(b"y" * 10)
            assert b.recv_bytes(10) == b"x" * 10
            with pytest.raises(OSError, match="bad message length"):
                b.recv_bytes(5)
            assert not b.readable
            with pytest.raises(OSError, match="connection is write-only"):
                b.recv_bytes()
        r, w = mod.Pipe(duplex=False)
        with r, w:
            w.send_bytes(b"z" * 10)
            with pytest.raises(OSError, match="bad message length"):
                r.recv_bytes(1)
            assert r.closed                               # a read-only end is closed

    def test_recv_bytes_into(self, mod):
        a, b = mod.Pipe()
        with a, b:
            buf = bytearray(20)
            a.send_bytes(b"hello")
            assert b.recv_bytes_into(buf) == 5 and buf[:5] == b"hello"
            a.send_bytes(b"world")
            assert b.recv_bytes_into(buf, 10) == 5 and buf[10:15] == b"world"
            arr = array.array("i", [0] * 4)
            a.send_bytes(array.array("i", [7, 8]))
            assert b.recv_bytes_into(arr, 4) == 8 and list(arr) == [0, 7, 8, 0]
            a.send_bytes(b"too long for it")
            with pytest.raises(multiprocessing.BufferTooShort) as ei:
                b.recv_bytes_into(bytearray(4))
            assert ei.value.args[0] == b"too long for it"
            with pytest.raises(ValueError, match="negative offset"):
                b.recv_bytes_into(buf, -1)
            with pytest.raises(ValueError, match="offset too large"):
                b.recv_bytes_into(buf, 21)
            a.send({"obj": 1})                             # a pickle, as bytes
            buf = bytearray(100)
            n = b.recv_bytes_into(buf)
            assert pickle.loads(bytes(buf[:n])) == {"obj": 1}

    def test_poll(self, mod):
        a, b = mod.Pipe()
        with a, b:
            assert b.poll() is False
            t = time.monotonic()
            assert b.poll(0.05) is False
            assert time.monotonic() - t >= 0.04
            a.send(1)
            assert b.poll(5) is True and b.poll() is True   # not consumed
            assert b.recv() == 1
            assert not b.poll()
            a.close()
            assert b.poll(5) is True                        # the end is input
            with pytest.raises(EOFError):
                b.recv()

    def test_closed_and_one_way(self, mod):
        a, b = mod.Pipe()
        a.close()
        assert a.closed and not b.closed
        for call in (lambda: a.send(1), a.recv, a.poll, a.fileno, lambda: a.send_bytes(b"")):
            with pytest.raises(OSError, match="handle is closed"):
                call()
        a.close()                                            # twice is fine
        b.close()
        r, w = mod.Pipe(duplex=False)
        with r, w:
            assert r.readable and not r.writable and w.writable and not w.readable
            with pytest.raises(OSError, match="connection is read-only"):
                r.send(1)
            with pytest.raises(OSError, match="connection is write-only"):
                w.recv()
            w.send("one way")
            assert r.recv() == "one way"

    def test_wait(self, mod):
        (a1, b1), (a2, b2) = mod.Pipe(), mod.Pipe()
        with a1, b1, a2, b2:
            assert mod.wait([b1, b2], timeout=0.05) == []
            a2.send("x")
            assert mod.wait([b1, b2], timeout=5) == [b2]
            b2.recv()

            def child():
                time.sleep(0.1)
                a1.send("late")

            pid = fork(child)
            assert mod.wait([b1, b2], timeout=30) == [b1]
            assert b1.recv() == "late"
            join(pid)

    def test_stdlib_wait_takes_them(self, mod):
        a, b = mod.Pipe()
        with a, b:
            a.send(5)
            assert mpc.wait([b], timeout=5) == [b]
            assert b.recv() == 5

    def test_child_large_messages(self, mod):
        a, b = mod.Pipe()

        def child():
            b.close()
            a.send(np.arange(2_000_000, dtype=np.float64))
            a.send_bytes(b"\x01" * (8 << 20))
            a.send({"nested": [np.ones(300_000), np.zeros(10)]})
            assert a.recv() == "thanks"

        pid = fork(child)
        a.close()
        with b:
            assert np.array_equal(b.recv(), np.arange(2_000_000, dtype=np.float64))
            assert b.recv_bytes() == b"\x01" * (8 << 20)
            got = b.recv()
            assert got["nested"][0].sum() == 300_000 and got["nested"][1].shape == (10,)
            b.send("thanks")
            with pytest.raises(EOFError):
                b.recv()
        join(pid)


class TestListenerClient:
    def test_accept_and_talk(self, mod):
        with mod.Listener(("127.0.0.1", 0)) as lst:
            addr = lst.address

            def child():
                with mod.Client(addr) as c:
                    c.send(("hi", c.recv()))

            pid = fork(child, close=(lst,))
            with lst.accept() as conn:
                assert lst.last_accepted is not None
                conn.send(42)
                assert conn.recv() == ("hi", 42)
            join(pid)

    def test_authkey(self, mod):
        with mod.Listener(("127.0.0.1", 0), authkey=b"secret") as lst:
            addr = lst.address

            def good():
                with mod.Client(addr, authkey=b"secret") as c:
                    c.send("authenticated")

            pid = fork(good, close=(lst,))
            with lst.accept() as conn:
                assert conn.recv() == "authenticated"
            join(pid)

            def bad():
                try:
                    mod.Client(addr, authkey=b"wrong")
                except (multiprocessing.AuthenticationError, EOFError, ConnectionError):
                    return
                raise AssertionError("a wrong key was accepted")

            pid = fork(bad, close=(lst,))
            with pytest.raises(multiprocessing.AuthenticationError):
                lst.accept()
            join(pid)
        with pytest.raises(TypeError):
            mod.Listener(("127.0.0.1", 0), authkey="not bytes")

    def test_unix_address(self, mod, tmp_path):
        path = str(tmp_path / "sock")
        with mod.Listener(path) as lst:
            def child():
                with mod.Client(path) as c:
                    c.send(np.arange(100_000))

            pid = fork(child, close=(lst,))
            with lst.accept() as conn:
                assert np.array_equal(conn.recv(), np.arange(100_000))
            join(pid)


def test_shrimpio_pipe_is_on_shared_memory():
    a, b = msg.Pipe()
    with a, b:
        assert a.shm and b.shm
        a.send("tagged", tag=3)
        assert b.recv_message(tag=3).payload == "tagged"
        with pytest.raises(TypeError):
            pickle.dumps(a)
