"""The patched pollers spin on the rings before they sleep, as a blocking
``recv`` does, so that a program that polls before each read (an RPC
library, a hand-written selectors server) gets its message without a
doorbell and a wake-up; and they stop spinning for connections that stay
idle.  Checked by what the poller does, not by timing: a sleep in the
kernel is a voluntary context switch of the polling thread.

The peer is another process pinned to another CPU (the spin rule: a peer
last seen on our own CPU is not spun for).  It writes each message a few
milliseconds after we ask for it, so that the poller is (most likely)
already waiting; a message that came before the poller waited proves
nothing either way and is not counted.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from children import child_env
from conftest import wait_for
from shrimpio._fastpath import get_busy_poll_us, set_busy_poll_us
from shrimpio._poll import epoll as ShmEpoll, poll as ShmPoll, select as shm_select
from shrimpio.socket import socket as ShmSocket

pytestmark = pytest.mark.timeout(120)

PEER = """
import os, socket, sys, time
from shrimpio.socket import socket as S
os.sched_setaffinity(0, {int(sys.argv[2])})
c = S(socket.AF_INET, socket.SOCK_STREAM)
c.connect(("127.0.0.1", int(sys.argv[1])))
while True:
    go = c.recv(1)
    if not go:
        break
    time.sleep(0.003)            # let the poller get into its wait (not a synchronisation)
    c.sendall(b"m")
c.close()
"""


def _thread_sleeps() -> int:
    """Voluntary context switches of the calling thread so far."""
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs (the peer must run beside the poller)")
    return cpus[0], cpus[1]


class _Peer:
    """An shm connection to a child process that answers each b"g" with
    b"m" a few milliseconds later."""

    def __init__(self, busy_poll_us: float) -> None:
        self.me, other = _cpus()
        self.old_budget = get_busy_poll_us()
        set_busy_poll_us(busy_poll_us)
        self.old_cpus = os.sched_getaffinity(0)
        self.lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen()
        self.child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PEER), str(self.lst.getsockname()[1]),
             str(other)], env=child_env())
        self.conn, _ = self.lst.accept()
        assert self.conn._shm is not None, "the connection is not on shared memory"
        self.conn.setblocking(False)
        os.sched_setaffinity(0, {self.me})

    def ask(self) -> None:
        self.conn.send(b"g")

    def take(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert self.conn.recv(1) == b"m"
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the peer's answer never came"
                shm_select([self.conn], [], [], 0.1)

    def close(self) -> None:
        os.sched_setaffinity(0, self.old_cpus)
        set_busy_poll_us(self.old_budget)
        self.conn.close()
        try:
            assert self.child.wait(timeout=20) == 0
        finally:
            if self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            self.lst.close()

    def __enter__(self) -> "_Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_readable(kind: str, conn: ShmSocket) -> bool:
    if kind == "select":
        return bool(shm_select([conn], [], [], 5.0)[0])
    if kind == "poll":
        p = ShmPoll()
        p.register(conn, select.POLLIN)
        return bool(p.poll(5000))
    with ShmEpoll() as ep:
        ep.register(conn.fileno(), select.EPOLLIN)
        return bool(ep.poll(5.0))


@pytest.mark.parametrize("kind", ["select", "poll", "epoll"])
def test_poller_catches_the_next_message_without_sleeping(kind):
    """A large budget (0.5 s) and a peer on another CPU: the poller spins
    until the message comes and never sleeps in the kernel.  Without the
    spin every round is a sleep (the poller arms the ring and waits on the
    doorbell)."""
    rounds, counted, slept = 30, 0, 0
    with _Peer(busy_poll_us=500_000) as peer:
        for _ in range(rounds):
            peer.ask()
            before = _thread_sleeps()
            early = peer.conn._shm.rx.readable() > 0
            assert _wait_readable(kind, peer.conn)
            if not early:
                counted += 1
                slept += _thread_sleeps() - before > 0
            peer.take()
    assert counted >= rounds // 2, f"the peer answered before the poller waited {rounds - counted} times"
    assert slept == 0, f"{slept} of {counted} waits slept in the kernel"


def test_idle_connections_make_the_poller_stop_spinning():
    """Waits that end long after the budget (timeouts with nothing coming)
    halve the ring's spin, down to 1/16 of the budget; messages that come
    soon after the poller slept grow it back."""
    budget = 2000.0
    with _Peer(busy_poll_us=budget) as peer:
        rx = peer.conn._shm.rx
        assert rx.spin_us == budget
        for _ in range(8):
            assert shm_select([peer.conn], [], [], 0.03)[0] == []
        assert rx.spin_us == budget / 16
        cpu0 = time.thread_time()
        for _ in range(5):
            assert shm_select([peer.conn], [], [], 0.03)[0] == []
        # Five waits of 30 ms spin 125 us each at most (plus the calls).
        assert time.thread_time() - cpu0 < 0.05
        for _ in range(20):
            peer.ask()
            assert _wait_readable("select", peer.conn)
            peer.take()
        assert rx.spin_us > budget / 16


def _thread_cpu(tid: int) -> float:
    """CPU seconds (user + system) thread ``tid`` of this process has used."""
    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_spin_lets_other_threads_run():
    """A poller spinning (1 s budget) in one thread while another thread of
    the process sends it the message: the sender runs meanwhile (the spin
    does not hold the GIL) and the poller takes the message spinning (its
    ring's budget stays as it was: a wait that slept would have grown it)."""
    import threading
    me, other = _cpus()
    old = get_busy_poll_us()
    set_busy_poll_us(1_000_000)
    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    cli = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    srv = None
    old_cpus = os.sched_getaffinity(0)
    try:
        # We are the producer, on the other CPU from the start: the ring
        # says where its producer was last seen (a peer on the poller's own
        # CPU is not spun for).
        os.sched_setaffinity(0, {other})
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        cli.connect(lst.getsockname())
        srv, _ = lst.accept()
        assert srv._shm is not None
        cli.send(b"w")                       # warm up: the doorbell of a new connection
        assert shm_select([srv], [], [], 5)[0] and srv.recv(1) == b"w"
        assert srv._shm.rx.spin_us == 1_000_000
        out: dict = {}

        def poller() -> None:
            os.sched_setaffinity(0, {me})
            out["tid"] = threading.get_native_id()
            out["ready"] = shm_select([srv], [], [], 10)[0]

        t = threading.Thread(target=poller)
        t.start()
        try:
            tid = wait_for(lambda: out.get("tid"), what="the poller thread")
            cpu0 = _thread_cpu(tid)
            # The poller spins (its CPU time grows) and we run beside it.
            wait_for(lambda: "ready" in out or _thread_cpu(tid) - cpu0 >= 0.05, timeout=30,
                     interval=0.005, what="the poller to spin")
            assert "ready" not in out
            cli.send(b"m")
        finally:
            t.join(30)
        assert out["ready"] == [srv]
        assert srv._shm.rx.spin_us == 1_000_000, "the poller slept"
        assert srv.recv(1) == b"m"
    finally:
        os.sched_setaffinity(0, old_cpus)
        set_busy_poll_us(old)
        if srv is not None:
            srv.close()
        cli.close()
        lst.close()
