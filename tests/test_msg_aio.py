"""shrimpio.msg awaited: on the shrimpio loop and on asyncio's own."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import shrimpio
from shrimpio import msg

from msg_helpers import fork, join
from children import reap

np = pytest.importorskip("numpy")


@pytest.fixture(autouse=True, scope="module")
def _uvloop_pipe() -> None:
    """uvloop keeps a process-wide pipe from its first loop on: opened
    before the leak checks count fds."""
    async def nothing() -> None:
        pass
    shrimpio.run(nothing())


@pytest.fixture(params=["shrimpio", "asyncio"])
def run(request):
    return shrimpio.run if request.param == "shrimpio" else asyncio.run


def _echo(a, n):
    for _ in range(n):
        m = a.recv_message()
        a.send(m.payload, tag=m.tag)


def test_asend_arecv_and_await_request(run):
    a, b = msg.Pipe()
    pid = fork(_echo, a, 102, close=(b,))
    a.close()

    async def main():
        for i in range(100):
            await b.asend(("n", i), tag=i % 4)
            m = await b.arecv(tag=i % 4)
            assert m.payload == ("n", i) and m.source is b
        big = np.arange(1 << 20, dtype=np.int64)
        await b.asend(big, tag=9)                   # a large one: rendezvous
        dest = np.zeros_like(big)
        req = b.irecv(tag=9, into=dest)
        await req
        assert np.array_equal(dest, big)
        await b.asend(b"x" * 300_000)             # larger than the ring is free
        st = await b.aprobe()
        assert st.nbytes >= 300_000
        assert (await b.arecv()).payload == b"x" * 300_000

    try:
        run(main())
    finally:
        b.close()
    join(pid)


def test_listener_arecv_sees_a_client_that_connects_while_it_waits(run):
    """An awaited listener receive that is already waiting (on its one
    channel's doorbell) wakes for a client that connects only then: the
    listener's shared-memory clients arrive on its registry socket, which
    asyncio's own loop must be told to watch (it hung, seen in CI)."""
    lst = msg.listen()
    go_r, go_w = os.pipe()

    def first():
        with msg.connect(lst.address) as ch:
            ch.send("first")
            ch.recv_message()

    def second():
        assert os.read(go_r, 1) == b"g"      # only once the receive waits
        with msg.connect(lst.address) as ch:
            ch.send("second")
            ch.recv_message()

    pids = [fork(first, close=(lst,)), fork(second, close=(lst,))]
    os.close(go_r)

    async def main():
        m = await asyncio.wait_for(lst.arecv(), 10)
        assert m.payload == "first"
        waiting = asyncio.ensure_future(lst.arecv())
        await asyncio.sleep(0)               # the receive runs until it waits
        assert not waiting.done()
        os.write(go_w, b"g")
        m2 = await asyncio.wait_for(waiting, 10)
        assert m2.payload == "second"
        await m.source.asend("done")
        await m2.source.asend("done")

    try:
        run(main())
    finally:
        os.close(go_w)
        lst.close()
    for pid in pids:
        join(pid)


def test_listener_arecv_many(run):
    lst = msg.listen()

    def sender(k):
        with msg.connect(lst.address) as ch:
            for i in range(20):
                ch.send((k, i))
            ch.recv_message()

    pids = [fork(sender, k, close=(lst,)) for k in range(3)]

    async def main():
        got = {}
        for _ in range(60):
            m = await lst.arecv()
            k, i = m.payload
            assert got.get(k, -1) == i - 1
            got[k] = i
            if i == 19:
                await m.source.asend("done")
        return got

    try:
        assert run(main()) == {0: 19, 1: 19, 2: 19}
    finally:
        lst.close()
    for pid in pids:
        join(pid)


def test_arecv_sees_a_dead_peer(run):
    a, b = msg.Pipe()

    def child():
        a.send("up")
        import time
        time.sleep(60)

    pid = fork(child, close=(b,))
    a.close()

    async def main():
        assert (await b.arecv()).payload == "up"
        asyncio.get_running_loop().call_later(0.1, os.kill, pid, signal.SIGKILL)
        with pytest.raises((ConnectionResetError, EOFError)):
            await asyncio.wait_for(b.arecv(), 10)

    try:
        run(main())
    finally:
        b.close()
        reap(pid, 10)


def test_large_asend_then_arecv_in_one_task(run):
    a, b = msg.Pipe()

    async def main():
        big = np.arange(1 << 20, dtype=np.int64)
        await a.asend(big, tag=1)                 # its receiver is this task, later
        big[:] = 0
        m = await b.arecv(tag=1)
        assert np.array_equal(m.payload, np.arange(1 << 20, dtype=np.int64))
        dest = np.zeros(1 << 20, dtype=np.int64)
        req = b.irecv(tag=2, into=dest)
        await a.asend(np.ones(1 << 20, dtype=np.int64), tag=2)
        await req
        assert int(dest.sum()) == 1 << 20

    with a, b:
        run(main())


def _delayed_echo(a, n):
    """Echo ``n`` messages; a message "wait" is answered only after the
    next one arrives (the parent's waits for it outlast any spin); then
    wait for the parent's end."""
    held = None
    for _ in range(n):
        m = a.recv_message()
        if m.payload == "wait":
            held = m
            continue
        if held is not None:
            a.send("waited")
            held = None
        a.send(m.payload, tag=m.tag)
    # Stay until the parent closes: our exit would be EOF on its doorbell,
    # and its waiter then lets go of its fd, which the parent still counts.
    try:
        a.recv_message()
    except EOFError:
        pass


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_awaited_waits_on_the_shrimpio_loop_hot_and_armed():
    """Awaited receives on the shrimpio loop: answers that come at once
    (polled on the loop's hot list) and answers that come after the
    ring was armed (the doorbell wakes the loop); one fd (a duplicate of
    the doorbell) for all of a channel's waits, given back at close."""
    a, b = msg.Pipe()
    pid = fork(_delayed_echo, a, 222, close=(b,))
    a.close()

    async def main():
        base = _fds()
        for i in range(200):
            await b.asend(i, tag=i % 3)
            assert (await b.arecv(tag=i % 3)).payload == i
        assert _fds() <= base + 1                  # not an fd a wait
        for i in range(10):
            await b.asend("wait")
            got = asyncio.ensure_future(b.arecv())
            await asyncio.sleep(0.02)              # the receive is asleep by now
            assert not got.done()
            await b.asend(("go", i))
            assert (await asyncio.wait_for(got, 10)).payload == "waited"
            assert (await b.arecv()).payload == ("go", i)
        # a receive that is given up (cancelled) loses nothing
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.arecv(), 0.01)
        await b.asend("after")
        assert (await b.arecv()).payload == "after"
        # ...on the general path too (a receive into a buffer)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.arecv(into=bytearray(64)), 0.01)
        await b.asend(b"after, into")
        got = await asyncio.wait_for(b.arecv(into=bytearray(64)), 10)
        assert bytes(got.payload) == b"after, into"
        assert _fds() == base + 1
        dup = b._aio.fd
        b.close()
        with pytest.raises(OSError):
            os.fstat(dup)                          # the duplicate went with the channel

    try:
        shrimpio.run(main())
    finally:
        b.close()
        join(pid)
