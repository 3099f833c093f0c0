"""The patched epoll costs what the kernel's does: in proportion to the
connections that are ready, not to those registered, and it loses no
wake-up when another thread of the process waits on a registered
connection too (see shrimpio/_epoll.py).

Checked by what the epoll does (how many registrations it looked at), not by
timing.  The clients are another process, so that nothing in this process
waits on the rings but the epoll (a blocking wait here would make it arm
everything again, by design)."""

from __future__ import annotations

import platform
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from children import child_env
from conftest import wait_for
from shrimpio._poll import epoll as ShmEpoll
from shrimpio.socket import socket as ShmSocket

pytestmark = pytest.mark.timeout(180)

IDLE = 300
ROUNDS = 400

CLIENTS = textwrap.dedent("""
    import socket, sys
    from shrimpio.socket import socket as S
    port, idle, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def conn():
        c = S(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(("127.0.0.1", port))
        return c
    quiet = [conn() for _ in range(idle)]
    busy = conn()
    busy.sendall(b"B")                          # which one is busy
    for i in range(rounds):
        busy.sendall(b"x")
        assert busy.recv(1) == b"x"
    for i, c in enumerate(quiet):               # then each idle one speaks once
        c.sendall(bytes([i % 251]))
    assert busy.recv(1) == b"k"                 # the server heard them all
    for c in quiet:
        c.close()
    busy.close()
""")


def test_idle_connections_cost_nothing_per_poll():
    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(IDLE + 8)
    lst.settimeout(30)
    child = subprocess.Popen([sys.executable, "-c", CLIENTS, str(lst.getsockname()[1]),
                              str(IDLE), str(ROUNDS)], env=child_env())
    conns = []
    ep = ShmEpoll()
    try:
        for _ in range(IDLE + 1):
            c, _ = lst.accept()
            assert c._shm is not None, "not on shared memory"
            c.setblocking(False)
            conns.append(c)
        by_fd = {c.fileno(): c for c in conns}
        for c in conns:
            ep.register(c.fileno(), select.EPOLLIN)
        busy = None
        echoed = 0
        heard: dict[int, bytes] = {}
        looked_at = None
        deadline = time.monotonic() + 120
        while len(heard) < IDLE:
            assert time.monotonic() < deadline, (echoed, len(heard))
            for fd, ev in ep.poll(5):
                c = by_fd[fd]
                data = c.recv(4096)
                assert data, f"EOF on {fd} before the end"
                if busy is None and data[:1] == b"B":
                    busy, data = c, data[1:]
                    if not data:
                        continue
                if c is busy:
                    assert set(data) == {ord("x")}
                    c.send(data)
                    echoed += len(data)
                    if echoed == ROUNDS // 4:
                        looked_at = ep._looked
                    if echoed == ROUNDS:
                        spent = ep._looked - looked_at
                else:
                    assert fd not in heard, "an idle connection reported twice"
                    heard[fd] = data
        busy.send(b"k")
        assert echoed == ROUNDS
        # 3/4 of the round trips looked at a few registrations each (the
        # busy one, and doorbells that rang), not at the 300 idle ones.
        assert spent <= 4 * (ROUNDS - ROUNDS // 4), spent
        assert len(set(heard)) == IDLE
        assert child.wait(60) == 0
    finally:
        ep.close()
        for c in conns:
            c.close()
        lst.close()
        if child.poll() is None:
            child.kill()
            child.wait()


def _shm_pair() -> "tuple[ShmSocket, ShmSocket, ShmSocket]":
    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    cli = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    cli.connect(lst.getsockname())
    srv, _ = lst.accept()
    assert srv._shm is not None
    return lst, cli, srv


_PPOLL = {"x86_64": 271, "aarch64": 73}


def _in_ppoll(thread: threading.Thread) -> bool:
    """Is ``thread`` asleep in ppoll() (a ring wait's sleep), not merely
    waiting for the GIL?"""
    with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
        return f.read().split()[0] == str(_PPOLL[platform.machine()])


@pytest.mark.skipif(platform.machine() not in _PPOLL, reason="ppoll's number unknown here")
def test_no_wakeup_lost_to_a_blocked_reader_of_the_same_connection():
    """A thread blocked in recv() on a connection an epoll also watches
    clears the ring's sleeping flag and drains the doorbell when it wakes:
    the epoll must still see the next message (the kernel's would)."""
    lst, cli, srv = _shm_pair()
    ep = ShmEpoll()
    try:
        ep.register(srv.fileno(), select.EPOLLIN)
        assert ep.poll(0) == []                          # armed: idle
        got: list = []
        reader = threading.Thread(target=lambda: got.append(srv.recv(1)))
        reader.start()
        wait_for(lambda: _in_ppoll(reader), what="the reader to sleep on the doorbell")
        cli.sendall(b"1")                                # taken by the blocked reader
        reader.join(10)
        assert got == [b"1"]
        cli.sendall(b"2")                                # no one but the epoll reads now
        events = []
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            events = ep.poll(1)
        assert events == [(srv.fileno(), select.EPOLLIN)]
        srv.setblocking(False)
        assert srv.recv(10) == b"2"
    finally:
        ep.close()
        for s in (cli, srv, lst):
            s.close()


_EPOLL_WAITS = {"x86_64": {"232", "281", "441"}, "aarch64": {"22", "441"}}


def _in_epoll_wait(thread: threading.Thread) -> bool:
    with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
        return f.read().split()[0] in _EPOLL_WAITS[platform.machine()]


@pytest.mark.skipif(platform.machine() not in _EPOLL_WAITS, reason="epoll_wait's number unknown here")
@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-an-idle-one"])
def test_a_registration_from_another_thread_is_watched_at_once(others):
    """The kernel's epoll watches an fd from its registration on, even one
    registered by another thread while a poll waits (cheroot's workers hand
    kept-alive connections back to the selector that its main thread waits
    in): the waiting poll reports it at once, not when its timeout ends."""
    pairs = [_shm_pair() for _ in range(others + 1)]
    _, cli, srv = pairs[0]
    ep = ShmEpoll()
    try:
        for _, _, idle in pairs[1:]:
            ep.register(idle.fileno(), select.EPOLLIN)
        got: list = []
        poller = threading.Thread(target=lambda: got.append(ep.poll(60)))
        poller.start()
        wait_for(lambda: _in_epoll_wait(poller), what="the poll to wait in the kernel")
        cli.sendall(b"x")
        ep.register(srv.fileno(), select.EPOLLIN)
        poller.join(10)
        assert not poller.is_alive(), "the poll did not see the new registration"
        assert got == [[(srv.fileno(), select.EPOLLIN)]]
        # And a registration whose data comes after it: armed on that look.
        srv.setblocking(False)
        assert srv.recv(10) == b"x"
        ep.unregister(srv.fileno())
        got.clear()
        poller = threading.Thread(target=lambda: got.append(ep.poll(60)))
        poller.start()
        wait_for(lambda: _in_epoll_wait(poller), what="the poll to wait in the kernel")
        ep.register(srv.fileno(), select.EPOLLIN)
        wait_for(lambda: _in_epoll_wait(poller), what="the poll to wait again")
        cli.sendall(b"y")
        poller.join(10)
        assert not poller.is_alive() and got == [[(srv.fileno(), select.EPOLLIN)]], got
    finally:
        ep.close()
        for trio in pairs:
            for s in trio:
                s.close()
