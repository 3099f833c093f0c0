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
