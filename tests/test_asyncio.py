"""The asyncio layer: ``shrimpio.transport``.

The transport and stream semantics live in ``asyncio_suite.py``, written
once and run here on three kinds of connection (``[shm]``: shared memory on
the shrimpio loop; ``[tcp]``: the shrimpio loop kept on kernel TCP by a rule;
``[uvloop]``: plain uvloop, the reference).  Below them: the loop's entry
points (``shrimpio.run``, ``new_event_loop``, ``EventLoopPolicy``,
``install``, ``asyncio.Runner``, ``shrimpio.patch`` and ``asyncio.run``, and
uvloop's under the patch), and what only the shrimpio loop does (reports,
fd callbacks that follow a socket onto shared memory, concurrent waits).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import select
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest
import uvloop

import asyncio_suite
import shrimpio
import shrimpio.socket as ss
from children import child_env
from asyncio_suite import HOST, k  # noqa: F401  (k: the kind fixture the suite's tests take)
from shrimpio import _accept, _route
from shrimpio.transport import Loop

# The suite's tests, collected as this module's.
globals().update({name: getattr(asyncio_suite, name)
                  for name in vars(asyncio_suite) if name.startswith("test_")})


@pytest.fixture(autouse=True, scope="module")
def _uvloop_pipe() -> None:
    """uvloop opens a process-wide pipe with its first loop and keeps it for
    the life of the process: have it opened before the leak checks count fds."""
    async def nothing() -> None:
        pass
    uvloop.run(nothing())


async def _probe() -> tuple:
    """Echo over a fresh server on the running loop; (loop type, the client
    connection's shrimpio path or None)."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(echo, HOST, 0)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
        info = writer.get_extra_info("shrimpio")
        writer.write(b"probe")
        writer.write_eof()
        assert await reader.read() == b"probe"
        writer.close()
        await writer.wait_closed()
    return type(asyncio.get_running_loop()), (info["path"] if info else None)


def test_run_and_new_event_loop() -> None:
    """shrimpio.run runs a coroutine on a Loop (a uvloop.Loop subclass) and
    returns its result; new_event_loop() makes such loops; debug= passes."""
    assert shrimpio.Loop is Loop and issubclass(Loop, uvloop.Loop)
    assert shrimpio.run(_probe()) == (Loop, "shm")

    async def debug() -> bool:
        return asyncio.get_running_loop().get_debug()

    assert shrimpio.run(debug(), debug=True) is True
    loop = shrimpio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop) and type(loop) is Loop
        assert loop.run_until_complete(_probe()) == (Loop, "shm")
    finally:
        loop.close()


def test_runner_loop_factory() -> None:
    """asyncio.Runner(loop_factory=shrimpio.new_event_loop): one Loop for
    several runs."""
    with asyncio.Runner(loop_factory=shrimpio.new_event_loop) as runner:
        assert type(runner.get_loop()) is Loop
        assert runner.run(_probe()) == (Loop, "shm")
        assert runner.run(_probe()) == (Loop, "shm")


def test_event_loop_policy_and_install() -> None:
    """EventLoopPolicy makes Loops; install() sets it, so asyncio.run uses it."""
    saved = asyncio.get_event_loop_policy()
    try:
        policy = shrimpio.EventLoopPolicy()
        loop = policy.new_event_loop()
        try:
            assert type(loop) is Loop
        finally:
            loop.close()
        assert asyncio.run(_probe()) == (asyncio.SelectorEventLoop, None)   # stdlib default
        shrimpio.install()
        assert isinstance(asyncio.get_event_loop_policy(), shrimpio.EventLoopPolicy)
        assert asyncio.run(_probe()) == (Loop, "shm")
    finally:
        asyncio.set_event_loop_policy(saved)


def test_patch_makes_asyncio_run_use_shrimpio_loop() -> None:
    """Under shrimpio.patch.enable(), a plain asyncio.run gets a Loop and its
    connections go over shared memory; disable() restores the stdlib loop."""
    before = asyncio.run(_probe())
    assert before[0] is not Loop and before[1] is None
    patch = importlib.import_module("shrimpio.patch")   # importing enables it
    try:
        patch.enable()
        assert patch.enabled()
        assert asyncio.run(_probe()) == (Loop, "shm")
    finally:
        patch.disable()
    assert not patch.enabled()
    assert asyncio.run(_probe()) == before


def test_stdlib_socket_from_a_library_gets_shared_memory_without_the_patch() -> None:
    """aiohttp (happy eyeballs) makes a stdlib socket, ``sock_connect``s it
    and passes it to ``create_connection(sock=...)``: on the shrimpio loop,
    without the patch, that connection is shared memory all the same, and a
    stdlib socket to a plain listener stays TCP."""
    import socket

    from shrimpio.socket import StdSocket

    async def main() -> tuple:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readexactly(5))
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        r, w = await asyncio.open_connection(sock=sock)
        w.write(b"hello")
        got.set_result(await r.readexactly(5))
        info = w.get_extra_info("shrimpio")
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        # A plain (non-shrimpio) listener: the same code stays on kernel TCP.
        plain = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        plain.bind((HOST, 0))
        plain.listen()
        sock2 = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock2.setblocking(False)
        await loop.sock_connect(sock2, plain.getsockname())
        accepted, _ = plain.accept()
        r2, w2 = await asyncio.open_connection(sock=sock2)
        tcp_info = w2.get_extra_info("shrimpio")
        w2.close()
        await w2.wait_closed()
        accepted.close()
        plain.close()
        return await got, info, tcp_info

    data, info, tcp_info = shrimpio.run(main())
    assert data == b"hello"
    assert info is not None and info["path"] == "shm", info
    assert tcp_info is None or tcp_info["path"] == "tcp"


def test_loop_poller_polls_busy_rings_then_lets_the_loop_sleep() -> None:
    """One poller per loop: once traffic stops for longer than the
    busy-poll budget its hot list empties (each ring armed, the loop free
    to sleep in epoll), and the next message still arrives (doorbell).
    (While data flows rings stay hot only if the peer may be running
    elsewhere: here both ends are in this process, on one CPU, so a ring may
    arm at once; tests/test_spin_policy.py covers the hot list.)"""
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                writer.write(line)
            writer.close()

        server = await asyncio.start_server(echo, HOST, 0)
        async with server:
            pairs = [await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
                     for _ in range(3)]
            poller = loop._shrimpio_poller
            for i, (reader, writer) in enumerate(pairs):
                writer.write(b"%d\n" % i)
            for i, (reader, writer) in enumerate(pairs):
                assert await reader.readline() == b"%d\n" % i
            deadline = loop.time() + 10
            while poller.hot_count() and loop.time() < deadline:
                await asyncio.sleep(0.01)           # a condition polled with a deadline
            assert poller.hot_count() == 0, "busy rings never armed: the loop would never sleep"
            for i, (reader, writer) in enumerate(pairs):
                writer.write(b"again %d\n" % i)
                assert await asyncio.wait_for(reader.readline(), 5) == b"again %d\n" % i
                writer.close()
                await writer.wait_closed()

    shrimpio.run(main())



_ADAPT_SERVER = """
import asyncio, sys, shrimpio
async def main():
    async def answer_later(reader, writer):
        while line := await reader.readline():
            await asyncio.sleep(float(line))   # the peer's think time: the scenario, not a wait
            writer.write(line)
        writer.close()
    server = await asyncio.start_server(answer_later, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.get_running_loop().create_future()     # stdin's end: the test is done
    asyncio.get_running_loop().add_reader(0, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop
shrimpio.run(main())
"""

_ADAPT_CLIENT = """
import asyncio, sys, shrimpio
async def main():
    reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    core = writer.transport._core
    seen = [core.budget_us]
    for gap in (b"0.03", b"0.03", b"0.5"):
        writer.write(gap + b"\\n")
        assert await reader.readline() == gap + b"\\n"
        seen.append(core.budget_us)
    writer.close()
    await writer.wait_closed()
    print(*seen)
shrimpio.run(main())
"""


def test_loop_poll_budget_grows_for_a_peer_that_answers_soon_after_it() -> None:
    """The time a transport stays polled adapts like a blocking wait's spin:
    an answer that came (through the doorbell) within 4 budgets of the last
    data grows it to cover that gap, so the next such answer is caught
    without a sleep; one that came much later halves it.  Budget 20 ms here
    (uvloop's timers have millisecond steps; a loaded host delays them by
    some): answers 30 ms after the request grow it to 40 ms, then one 500 ms
    after halves it.  Two processes: a
    loop's own writes count as its data."""
    env = child_env({"SHRIMPIO_BUSY_POLL_US": "20000"})
    server = subprocess.Popen([sys.executable, "-c", _ADAPT_SERVER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        out = subprocess.run([sys.executable, "-c", _ADAPT_CLIENT, port], env=env, capture_output=True,
                             text=True, timeout=60)
    finally:
        server.stdin.close()
        server.wait(30)
        server.stdout.close()
    assert out.returncode == 0, out.stderr
    start, after_soon, after_soon2, after_late = map(float, out.stdout.split())
    assert start == 20000.0
    assert 37500 <= after_soon <= 80000 and after_soon2 >= after_soon, out.stdout
    assert after_late == pytest.approx(after_soon2 / 2, abs=0.01), out.stdout


def test_asyncio_server_is_not_held_up_by_a_silent_client(monkeypatch):
    """The shrimpio loop's server never blocks on a client's hello: with a
    silent client connected, others are served at once; the silent one is
    dropped when its time is up (the loop wakes for it)."""
    monkeypatch.setattr(_accept, "HELLO_WAIT", 1.0)

    async def main():
        async def echo(reader, writer):
            writer.write(await reader.readline())
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with server:
            lsock = server.sockets[0]
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            silent.connect(ss._registry()._entry_path(_route.entry_name(socket.AF_INET, *lsock.getsockname())))
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", lsock.getsockname()[1]), 2)
                writer.write(b"hi\n")
                assert await asyncio.wait_for(reader.readline(), 2) == b"hi\n"
                writer.close()
                await writer.wait_closed()
                # Served while the silent one still had time: still connected.
                assert select.select([silent], [], [], 0)[0] == []
                loop = asyncio.get_running_loop()
                silent.setblocking(False)
                assert await asyncio.wait_for(loop.sock_recv(silent, 1), 5) == b""   # dropped
            finally:
                silent.close()

    shrimpio.run(main())


def test_a_paused_transport_whose_peer_dies_does_not_spin() -> None:
    """A paused shm transport keeps its doorbell's reader (pause and resume
    cost no epoll_ctl), but a doorbell that fires while paused (the peer
    died: end of file, readable for ever) takes the reader off, so the loop
    does not spin; resume_reading() then delivers the end."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport, self.lost = transport, loop.create_future()
                accepted.set_result(self)

            def connection_lost(self, exc: Optional[BaseException]) -> None:
                self.lost.set_result(exc)

        server = await loop.create_server(Server, HOST, 0)
        async with server:
            ct, _ = await loop.create_connection(asyncio.Protocol, HOST, server.sockets[0].getsockname()[1])
            sp = await asyncio.wait_for(accepted, 5)
            st = sp.transport
            assert st.get_extra_info("shrimpio")["path"] == "shm"
            st.pause_reading()
            assert st._reader_on                      # kept through the pause
            ct.abort()                                # the peer is gone: its doorbell reads EOF
            deadline = loop.time() + 5
            while st._reader_on and loop.time() < deadline:
                await asyncio.sleep(0.01)             # a condition polled with a deadline
            assert not st._reader_on, "the doorbell's reader stayed on a dead peer"
            cpu0 = time.process_time()
            await asyncio.sleep(0.3)
            assert time.process_time() - cpu0 < 0.15, "the loop spun on a paused transport"
            assert not sp.lost.done()                 # nothing delivered while paused
            st.resume_reading()
            await asyncio.wait_for(sp.lost, 5)

    shrimpio.run(main())


def test_cancelled_sock_recv_leaves_a_newer_one_waiting() -> None:
    """Two sock_recv wait on one shared-memory socket; cancelling the older
    one leaves the newer one waiting, and it gets the data.  (Plain uvloop
    keeps one reader per fd: there the newer one would hang.)"""
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lsock = ss.socket()
        lsock.bind((HOST, 0))
        lsock.listen()
        lsock.setblocking(False)
        csock = ss.socket()
        csock.setblocking(False)
        try:
            await loop.sock_connect(csock, lsock.getsockname())
            conn, _ = await loop.sock_accept(lsock)
            with conn:
                assert shrimpio.info(conn)["path"] == "shm"
                older = asyncio.create_task(loop.sock_recv(csock, 10))
                await asyncio_suite.turns(5)
                newer = asyncio.create_task(loop.sock_recv(csock, 10))
                await asyncio_suite.turns(5)
                older.cancel()
                await asyncio_suite.turns(5)
                await loop.sock_sendall(conn, b"data")
                return await asyncio.wait_for(newer, 10)
        finally:
            csock.close()
            lsock.close()

    assert shrimpio.run(main()) == b"data"


def test_fd_callback_on_a_socket_closed_under_it() -> None:
    """A reader callback registered by fd number on a shared-memory socket
    that is then closed never runs again (as on a closed kernel fd), the fd
    number can be reused and watched at once, and nothing leaks (the loop
    watches its own duplicates of the doorbells)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = ss.socket()
        lsock.bind((HOST, 0))
        lsock.listen()               # never accepts: connects complete against the backlog
        try:
            calls: list = []
            fds = set()
            for round in range(3):
                sock = ss.socket()
                sock.connect(lsock.getsockname())
                sock.setblocking(False)
                assert shrimpio.info(sock)["path"] == "shm"
                fd = sock.fileno()
                fds.add(fd)
                loop.add_reader(fd, calls.append, round)
                sock.close()
                await asyncio_suite.turns()
                if round == 2:
                    assert loop.remove_reader(fd) is True
            assert calls == []
            assert len(fds) == 1     # the number came back each time, and was watched again
        finally:
            lsock.close()

    shrimpio.run(main())


def test_kernel_sockets_given_to_the_loop_report_their_path(tmp_path, monkeypatch) -> None:
    """Connections that take kernel TCP through the loop say so in
    SHRIMPIO_REPORT, with a reason: create_connection(sock=) with a stdlib
    socket connected by the caller or by sock_connect (aiohttp's way), and
    create_connection with happy eyeballs, to a server that is not shrimpio."""
    report = tmp_path / "report"
    monkeypatch.setenv("SHRIMPIO_REPORT", str(report))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        plain = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        plain.bind((HOST, 0))
        plain.listen()
        plain.setblocking(False)
        addr = plain.getsockname()
        accepted = []
        try:
            blocking = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            blocking.connect(addr)
            vialoop = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            vialoop.setblocking(False)
            await loop.sock_connect(vialoop, addr)
            for sock in (blocking, vialoop):
                tr, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
                tr.write(b"x")
                tr.close()
            tr, _ = await loop.create_connection(asyncio.Protocol, *addr, happy_eyeballs_delay=0.1)
            tr.write(b"y")
            tr.close()
            while len(accepted) < 3:
                conn, _ = await loop.sock_accept(plain)
                accepted.append(conn)
            for conn in accepted:
                assert await asyncio.wait_for(loop.sock_recv(conn, 1), 10) in (b"x", b"y")
                assert await asyncio.wait_for(loop.sock_recv(conn, 1), 10) == b""
        finally:
            for conn in accepted:
                conn.close()
            plain.close()

    shrimpio.run(main())
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(records) == 3, records
    for rec in records:
        assert rec["path"] == "tcp" and rec["reason"], rec
        assert tuple(rec["peer"])[:2] == (HOST, rec["peer"][1])
    assert sorted(r["bytes_sent"] for r in records) == [1, 1, 1], records


_UVLOOP_ENTRY_POINTS = r'''
import asyncio, sys, uvloop
orig = {n: getattr(uvloop, n) for n in ("new_event_loop", "run")}
orig_loop = uvloop.Loop
import shrimpio, shrimpio.patch        # enables the patch
from shrimpio.transport import Loop, EventLoopPolicy

async def kind():
    return type(asyncio.get_running_loop())

assert uvloop.Loop is Loop
shrimpio.patch.disable()
assert uvloop.Loop is orig_loop and uvloop.new_event_loop is not None
plain = uvloop.new_event_loop(); assert type(plain) is orig_loop; plain.close()
assert uvloop.run(kind()) is orig_loop
shrimpio.patch.enable()
loop = uvloop.new_event_loop()
assert type(loop) is Loop and isinstance(loop, uvloop.Loop), type(loop)
loop.close()
assert uvloop.Loop is Loop and type(uvloop.Loop()) is Loop
assert uvloop.run(kind()) is Loop
assert asyncio.run(kind()) is Loop
assert type(asyncio.new_event_loop()) is Loop
policy = uvloop.EventLoopPolicy()
assert isinstance(policy, EventLoopPolicy)
l2 = policy.new_event_loop(); assert type(l2) is Loop; l2.close()
asyncio.set_event_loop_policy(None)
uvloop.install()
assert asyncio.run(kind()) is Loop
with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
    assert r.run(kind()) is Loop
shrimpio.patch.disable()
assert uvloop.Loop is orig_loop
assert uvloop.new_event_loop is orig["new_event_loop"] and uvloop.run is orig["run"]
assert "install" not in vars(uvloop) and "EventLoopPolicy" not in vars(uvloop)
assert uvloop.run(kind()) is orig_loop
print("ok")
'''


def test_patch_gives_the_shrimpio_loop_to_every_uvloop_entry_point() -> None:
    """Under the patch, uvloop.new_event_loop, uvloop.Loop, uvloop.run,
    uvloop.install and uvloop.EventLoopPolicy (which uvicorn and hypercorn
    call) give the shrimpio loop, still a uvloop.Loop; disable() puts
    uvloop's back."""
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", _UVLOOP_ENTRY_POINTS],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_fd_reader_registered_before_sock_connect_moves_to_the_rings() -> None:
    """A reader registered on a shrimpio socket before sock_connect (a
    kernel socket then) follows it onto shared memory: it fires when data
    comes."""
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lsock = ss.socket()
        lsock.bind((HOST, 0))
        lsock.listen()
        lsock.setblocking(False)
        csock = ss.socket()
        csock.setblocking(False)
        got = loop.create_future()
        loop.add_reader(csock, lambda: got.done() or got.set_result(csock.recv(10)))
        try:
            await loop.sock_connect(csock, lsock.getsockname())
            assert shrimpio.info(csock)["path"] == "shm"
            conn, _ = await loop.sock_accept(lsock)
            with conn:
                await loop.sock_sendall(conn, b"moved")
                data = await asyncio.wait_for(got, 10)
            assert loop.remove_reader(csock) is True
            return data
        finally:
            csock.close()
            lsock.close()

    assert shrimpio.run(main()) == b"moved"
