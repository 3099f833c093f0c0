"""What makes a connection's set-up and tear-down cheap must not change
what it does: the hello parsed once per text, accept()'s busy-poll rule for
thread-per-client servers, fds closed with the GIL held, the listener's
bare space fd, and the stat slot's address text."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from typing import Any, Callable, Optional

import pytest

import shrimpio
import shrimpio.socket as ss
from shrimpio import _accept, _handshake, _process, _stat
from shrimpio._fastpath import close_fd, get_busy_poll_us


def _fields(payload: bytes) -> tuple:
    m = _handshake.HELLO_RE.fullmatch(payload)
    assert m is not None
    c2s, s2c, size, host, server = _accept._hello_fields(m)
    return c2s, s2c, size, (host, int(m[5])), server


def test_hellos_that_differ_by_port_or_anything_else_parse_to_what_they_say():
    _accept._hello_texts.clear()
    a = _handshake.hello(262144, 262144, 528384, ("127.0.0.1", 40000), ("127.0.0.1", 5555))
    b = _handshake.hello(262144, 262144, 528384, ("127.0.0.1", 40001), ("127.0.0.1", 5555))
    c = _handshake.hello(4096, 8192, 16384, ("127.0.0.1", 40000), ("127.0.0.2", 5556), late=True)
    assert _fields(a) == (262144, 262144, 528384, ("127.0.0.1", 40000), ("127.0.0.1", 5555))
    assert _fields(b) == (262144, 262144, 528384, ("127.0.0.1", 40001), ("127.0.0.1", 5555))
    assert _fields(c) == (4096, 8192, 16384, ("127.0.0.1", 40000), ("127.0.0.2", 5556))
    assert len(_accept._hello_texts) == 2          # a and b share their text around the port


def test_accept_does_not_spin_with_more_threads_than_cpus():
    if get_busy_poll_us() == 0:
        pytest.skip("SHRIMPIO_BUSY_POLL_US=0: no busy-poll at all")
    lsock = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    go = threading.Event()
    threads = []
    try:
        lst = lsock._lst
        if lst.shared:
            pytest.skip("listener shared with another process")
        want = _process.cpus() + 1 - threading.active_count()
        threads = [threading.Thread(target=go.wait) for _ in range(max(0, want))]
        for t in threads:
            t.start()
        assert threading.active_count() > _process.cpus()
        assert lst.spin_budget() == 0.0
        go.set()
        for t in threads:
            t.join()
        if threading.active_count() <= _process.cpus():
            assert lst.spin_budget() > 0.0
    finally:
        go.set()
        for t in threads:
            t.join()
        lsock.close()


def test_close_fd_closes_and_says_what_os_close_says():
    r, w = os.pipe()
    close_fd(r)
    close_fd(w)
    with pytest.raises(OSError) as got:
        os.fstat(r)
    assert got.value.errno == errno.EBADF
    with pytest.raises(OSError) as got:
        close_fd(-1)
    assert got.value.errno == errno.EBADF


def test_a_closed_connection_closes_its_fds_on_both_sides():
    lsock = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        cli.connect(lsock.getsockname())
        srv, _ = lsock.accept()
        assert ss.info(srv)["path"] == "shm" and ss.info(cli)["path"] == "shm"
        conn = srv._shm
        space = conn.space.fileno()
        assert os.fstat(space)                     # the listener's end of the space doorbell
        cli.sendall(b"x")
        assert srv.recv(1) == b"x"
        srv.close()
        assert conn.space.fileno() == -1 and srv.fileno() == -1
        assert cli.recv(1) == b""                  # the peer saw our close
        with pytest.raises(OSError) as got:
            srv.send(b"y")
        assert got.value.errno == errno.EBADF
    finally:
        cli.close()
        lsock.close()


@pytest.mark.parametrize("addr, text", [
    (("127.0.0.1", 80), b"127.0.0.1:80"),
    (("::1", 443, 0, 0), b"[::1]:443"),
    (("127.0.0.1", "80"), b"127.0.0.1:80"),
    ("tcp4-x-1", b"tcp4-x-1"),
    ((), b""),
])
def test_stat_address_text_is_the_address_as_listed(addr, text):
    for _ in range(2):                          # (the second time from the host cache)
        assert _stat._address_text(addr) == text == _stat._address(addr).encode()


# -- the asyncio connect and accept paths ------------------------------------------


@pytest.fixture(scope="module")
def _uvloop_pipe() -> None:
    """uvloop opens a process-wide pipe with its first loop and keeps it for
    the life of the process: have it opened before the leak checks count fds."""
    async def nothing() -> None:
        pass
    shrimpio.run(nothing())


class _Counted(asyncio.Protocol):
    """A server protocol that says when each connection is made and lost."""

    def __init__(self, made: list, lost: list) -> None:
        self.made, self.lost = made, lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost.append(exc)


async def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def test_asyncio_server_serves_shm_clients_without_a_task_each(_uvloop_pipe):
    """A plain (no TLS) shared-memory connection's transport is made in the
    server's accepting callback, as uvloop's servers make theirs: no task,
    no future, no loop turn per connection; connection_made still comes in
    a callback of its own."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: list = []
        lost: list = []
        server = await loop.create_server(lambda: _Counted(made, lost), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tasks: list = []

        def counting_factory(lp: Any, coro: Any, **kw: Any) -> asyncio.Task:
            tasks.append(coro)
            return asyncio.Task(coro, loop=lp, **kw)

        loop.set_task_factory(counting_factory)    # counts the tasks the loop makes
        clients = []
        try:
            for _ in range(8):
                clients.append(await loop.create_connection(asyncio.Protocol, "127.0.0.1", port))
            await _until(lambda: len(made) == 8, "8 connections made")
            assert tasks == []
            assert all(shrimpio.info(tr)["path"] == "shm" for tr in made)
            assert all(shrimpio.info(tr)["path"] == "shm" for tr, _ in clients)
        finally:
            for tr, _ in clients:
                tr.close()
            await _until(lambda: len(lost) == len(made), "the server's connections lost")
            server.close()
            await server.wait_closed()

    shrimpio.run(main())


def test_asyncio_server_drops_a_shm_client_whose_protocol_factory_raises(_uvloop_pipe):
    """The factory's error concerns that connection alone: its socket is
    closed (the client reads EOF), the server serves the next client."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: list = []
        lost: list = []
        calls = [0]
        handled: list = []
        loop.set_exception_handler(lambda lp, ctx: handled.append(ctx))

        def factory() -> asyncio.Protocol:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("no protocol for you")
            return _Counted(made, lost)

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            assert shrimpio.info(w1)["path"] == "shm"
            assert await asyncio.wait_for(r1.read(), 10) == b""        # dropped: EOF
            w1.close()
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            await _until(lambda: len(made) == 1, "the next client served")
            assert shrimpio.info(made[0])["path"] == "shm"
            w2.close()
            await _until(lambda: len(lost) == 1, "the second connection lost")
            assert not [c for c in handled if "no protocol" in str(c.get("exception"))]  # not debug
        finally:
            server.close()
            await server.wait_closed()

    shrimpio.run(main())


def test_asyncio_connect_to_a_numeric_address_asks_no_resolver(_uvloop_pipe):
    """create_connection to an IP literal takes the address as it is
    (asyncio's rule): no getaddrinfo per connect; a name is resolved."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        asked: list = []
        resolve = loop.getaddrinfo

        async def counting(*args: Any, **kw: Any) -> list:
            asked.append(args[0])
            return await resolve(*args, **kw)

        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop.getaddrinfo = counting                   # the instance's: counts its callers
        try:
            tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            assert shrimpio.info(tr)["path"] == "shm"
            assert tr.get_extra_info("peername") == ("127.0.0.1", port)
            tr.close()
            assert asked == []
            tr, _ = await loop.create_connection(asyncio.Protocol, "localhost", port)
            tr.close()
            assert asked == ["localhost"]
            # A port getaddrinfo would refuse is still its to refuse.
            with pytest.raises((OSError, OverflowError)):
                await loop.create_connection(asyncio.Protocol, "127.0.0.1", 70000)
        finally:
            server.close()
            await server.wait_closed()

    shrimpio.run(main())
