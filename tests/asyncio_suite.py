"""Transport and stream semantics, written once and run on every kind of
connection (collected through ``tests/test_asyncio.py``).

Kinds:

* ``shm``: the shrimpio loop, the connection over shared memory
  (``get_extra_info("shrimpio")["path"] == "shm"``, a ``ShmTransport``);
* ``tcp``: the same shrimpio loop, the connection kept on kernel TCP by a
  rule on the server's port (``shrimpio._route.add_tcp_rule``), so it is
  uvloop's own TCP transport (the shrimpio listener serves it on its TCP side);
* ``uvloop``: plain ``uvloop.run`` with stdlib sockets, the reference.

Every test makes the same assertions on every kind: where shared memory
behaves differently from uvloop's TCP, that is a shrimpio bug.

No test sleeps to synchronise: futures set by protocol callbacks and
``asyncio.wait_for`` deadlines do.  The few "nothing happens while ..."
checks give the loop a bounded number of turns (``turns``) and, where a
kernel could deliver late, a short bounded wait that must time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import hashlib
import io
import os
import socket as _std
import ssl
import sys
import tempfile
import time
import weakref
from typing import Any, Callable, Optional

import pytest
import uvloop

import shrimpio
from children import child_env
from shrimpio import _route
from shrimpio.socket import StdSocket
from shrimpio.socket import socket as ShmSocket
from shrimpio.transport import ShmTransport

__all__ = ["k", "KINDS", "Kind", "Recorder", "BufRecorder", "Factory", "turns", "HOST"]

KINDS = ("shm", "tcp", "uvloop")
HOST = "127.0.0.1"
#: Deadline of one test's coroutine: a hang fails the test instead of the run.
TEST_TIMEOUT = 30.0
MiB = 1 << 20

# ---------------------------------------------------------------------------
# The kinds


def _base_transport(tr: Any) -> Any:
    """The transport under an SSL application transport (else ``tr``)."""
    if isinstance(tr, asyncio.StreamWriter):
        tr = tr.transport
    sslproto = getattr(tr, "_ssl_protocol", None)
    return sslproto._transport if sslproto is not None else tr


class Kind:
    """One way of connecting; tests ask it for servers, sockets and checks."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @property
    def shm(self) -> bool:
        return self.name == "shm"

    def run(self, fn: Callable[["Kind"], Any], timeout: float = TEST_TIMEOUT) -> Any:
        """Run ``fn(self)`` on this kind's loop with a deadline; errors that
        reach the loop's exception handler (fatal transport errors, failed
        protocol callbacks) fail the test."""
        errors: list = []

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            if self.name == "uvloop":
                assert type(loop) is uvloop.Loop
            else:
                assert isinstance(loop, shrimpio.Loop)
            loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            return await asyncio.wait_for(fn(self), timeout)

        if self.name == "uvloop":
            result = uvloop.run(main())
        else:
            result = shrimpio.run(main())
        assert not errors, f"loop exception handler called: {errors}"
        return result

    def socket(self, family: int = _std.AF_INET) -> _std.socket:
        """A TCP socket of this kind (shrimpio's, or the stdlib's for uvloop)."""
        cls = _std.socket if self.name == "uvloop" else ShmSocket
        return cls(family, _std.SOCK_STREAM)

    def served(self, port: int) -> int:
        """A server listens on ``port``: for the tcp kind, keep clients of it
        on kernel TCP (the listener itself still offers shared memory)."""
        if self.name == "tcp":
            _route.add_tcp_rule(str(port))
        return port

    def listener(self, backlog: int = 16) -> _std.socket:
        lsock = self.socket()
        try:
            lsock.bind((HOST, 0))
            lsock.listen(backlog)
        except BaseException:
            lsock.close()
            raise
        self.served(lsock.getsockname()[1])
        return lsock

    async def start_server(self, cb: Callable, **kw: Any) -> tuple:
        server = await asyncio.start_server(cb, HOST, 0, **kw)
        return server, self.served(server.sockets[0].getsockname()[1])

    async def create_server(self, factory: Callable, **kw: Any) -> tuple:
        server = await asyncio.get_running_loop().create_server(factory, HOST, 0, **kw)
        return server, self.served(server.sockets[0].getsockname()[1])

    def check(self, tr: Any) -> None:
        """``tr`` (a transport, SSL transport or StreamWriter) took this kind's path."""
        base = _base_transport(tr)
        info = tr.get_extra_info("shrimpio")
        if self.shm:
            assert isinstance(base, ShmTransport), base
            assert info is not None and info["path"] == "shm", info
        else:
            assert type(base).__module__.startswith("uvloop"), base
            assert info is None, info

    def check_sock(self, sock: Any) -> None:
        """A connected socket of the sock_* API took this kind's path."""
        if self.name == "uvloop":
            assert type(sock) is _std.socket
            return
        assert isinstance(sock, ShmSocket)
        assert shrimpio.info(sock)["path"] == ("shm" if self.shm else "tcp"), shrimpio.info(sock)


@pytest.fixture(params=KINDS)
def k(request: Any) -> Any:
    try:
        yield Kind(request.param)
    finally:
        _route.clear_tcp_rules()


def each_kind(fn: Callable) -> Callable:
    """Make ``async def fn(k)`` a test run once per kind on that kind's loop."""
    def test(k: Kind) -> None:
        k.run(fn)
    test.__name__ = test.__qualname__ = fn.__name__
    test.__doc__ = fn.__doc__
    test.__module__ = fn.__module__
    return test


async def turns(n: int = 20) -> None:
    """Let the loop run ``n`` times (no time passes on purpose)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def quiet(fut: "asyncio.Future", seconds: float = 0.1) -> None:
    """Assert that ``fut`` does not complete within a short bounded time."""
    await turns()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(fut), seconds)


def squash(events: list) -> list:
    """The connection's events (no pause/resume_writing), runs of "data"
    collapsed to one."""
    out: list = []
    for e in events:
        if e in ("pause", "resume"):
            continue
        if not (e == "data" and out and out[-1] == "data"):
            out.append(e)
    return out


def _tls_contexts_uncached() -> tuple:
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", HOST)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


tls_contexts = functools.lru_cache(maxsize=None)(_tls_contexts_uncached)


# ---------------------------------------------------------------------------
# Protocols that record what happens to them


class _Recording:
    def _init(self, eof_result: Any, on_made: Any, on_data: Any, on_eof: Any) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.paused = loop.create_future()     # -> write buffer size at pause_writing()
        self.resumed = loop.create_future()    # -> write buffer size at resume_writing()
        self.events: list = []
        self.data = bytearray()
        self.transport: Any = None
        self.eof_result = eof_result
        self.on_made, self.on_data, self.on_eof = on_made, on_data, on_eof
        self._wants: list = []

    def want(self, n: int) -> "asyncio.Future":
        """A future of the first ``n`` bytes received; fails if EOF or loss comes first."""
        fut = self.loop.create_future()
        self._wants.append((n, fut))
        self._check()
        return fut

    def _check(self, ended: Optional[str] = None) -> None:
        for n, fut in list(self._wants):
            if fut.done():
                self._wants.remove((n, fut))
            elif len(self.data) >= n:
                fut.set_result(bytes(self.data[:n]))
                self._wants.remove((n, fut))
            elif ended:
                fut.set_exception(AssertionError(f"{ended} after {len(self.data)} of {n} bytes"))
                self._wants.remove((n, fut))

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")
        self.made.set_result(transport)
        if self.on_made:
            self.on_made(self)

    def _got(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        self._check()
        if self.on_data:
            self.on_data(self, data)

    def eof_received(self) -> Any:
        self.events.append("eof")
        if not self.eof.done():
            self.eof.set_result(None)
        self._check("EOF")
        if self.on_eof:
            self.on_eof(self)
        return self.eof_result

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)
        self._check("connection lost")

    def pause_writing(self) -> None:
        self.events.append("pause")
        if not self.paused.done():
            self.paused.set_result(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self.events.append("resume")
        if not self.resumed.done():
            self.resumed.set_result(self.transport.get_write_buffer_size())


class Recorder(_Recording, asyncio.Protocol):
    """A ``Protocol`` that records its calls (see ``_Recording``)."""

    def __init__(self, *, eof_result: Any = None, on_made: Any = None, on_data: Any = None,
                 on_eof: Any = None) -> None:
        self._init(eof_result, on_made, on_data, on_eof)

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes, type(data)
        self._got(data)


class BufRecorder(_Recording, asyncio.BufferedProtocol):
    """A ``BufferedProtocol`` with a small buffer, recording its calls."""

    def __init__(self, size: int = 1000, **kw: Any) -> None:
        self._init(kw.pop("eof_result", None), kw.pop("on_made", None), kw.pop("on_data", None),
                   kw.pop("on_eof", None))
        assert not kw, kw
        self.buf = bytearray(size)
        self.hints: list = []
        self.updates = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        self.hints.append(sizehint)
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        assert 0 < nbytes <= len(self.buf), nbytes
        self.updates += 1
        self._got(bytes(self.buf[:nbytes]))


class Factory:
    """A protocol factory that keeps what it made; ``first`` is a future of
    the first protocol, done once its connection_made has run."""

    def __init__(self, cls: Any = Recorder, **kw: Any) -> None:
        self.cls, self.kw = cls, kw
        self.protos: list = []
        self.first = asyncio.get_running_loop().create_future()

    def __call__(self) -> Any:
        proto = self.cls(**self.kw)
        self.protos.append(proto)
        if len(self.protos) == 1:
            proto.made.add_done_callback(lambda _f: self.first.set_result(proto))
        return proto


def _guard(done: "asyncio.Future", handler: Callable) -> Callable:
    """A start_server callback whose outcome (return or exception) lands in ``done``."""
    async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = await handler(reader, writer)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            writer.transport.abort()
            raise
        if not done.done():
            done.set_result(result)
    return cb


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


# ---------------------------------------------------------------------------
# Streams


@each_kind
async def test_streams_echo_large(k: Kind) -> None:
    """open_connection/start_server echo: a line, then 8 MiB in one write
    with drain() while reading it back, then write_eof -> EOF both ways."""
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        k.check(writer)
        total = 0
        while chunk := await reader.read(256 * 1024):
            total += len(chunk)
            writer.write(chunk)
            await writer.drain()
        assert reader.at_eof()
        await _close(writer)
        return total

    server, port = await k.start_server(_guard(done, echo))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        k.check(writer)
        writer.write(b"hello\n")
        await writer.drain()
        assert await reader.readline() == b"hello\n"
        payload = os.urandom(8 * MiB)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        got = await reader.readexactly(len(payload))
        await sender
        assert got == payload
        writer.write_eof()
        assert await reader.read() == b""
        assert await done == 6 + len(payload)
        await _close(writer)


@each_kind
async def test_streams_many_small_messages_in_order(k: Kind) -> None:
    """2000 pipelined lines come back complete and in order."""
    done = asyncio.get_running_loop().create_future()

    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
        await writer.drain()
        await _close(writer)

    server, port = await k.start_server(_guard(done, upper))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        lines = [b"message %d\n" % i for i in range(2000)]
        for line in lines:
            writer.write(line)
        await writer.drain()
        for line in lines:
            assert await reader.readline() == line.upper()
        writer.write_eof()
        assert await reader.read() == b""
        await done
        await _close(writer)


@each_kind
async def test_streams_write_eof_half_close(k: Kind) -> None:
    """write_eof: the peer reads EOF after the data and can still answer."""
    done = asyncio.get_running_loop().create_future()

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()              # up to EOF
        assert reader.at_eof()
        writer.write(b"got %d" % len(data))     # the half-closed peer can still send
        await writer.drain()
        await _close(writer)

    server, port = await k.start_server(_guard(done, count))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        assert writer.can_write_eof()
        writer.write(b"x" * 100_000)
        writer.write_eof()
        assert not writer.transport.is_closing()
        with pytest.raises(RuntimeError):
            writer.write(b"after eof")
        assert await reader.read() == b"got 100000"
        await done
        await _close(writer)


@each_kind
async def test_streams_drain_blocks_until_peer_reads(k: Kind) -> None:
    """A peer that does not read: the write buffer passes the high-water
    mark and drain() blocks; once the peer reads, drain() returns."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    release = asyncio.Event()
    payload = os.urandom(16 * MiB)

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        data = await reader.readexactly(len(payload))
        writer.write(hashlib.sha256(data).digest())
        await writer.drain()
        assert await reader.read() == b""
        await _close(writer)

    server, port = await k.start_server(_guard(done, slow))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        writer.write(payload)
        assert writer.transport.get_write_buffer_size() > 64 * 1024
        drain = asyncio.create_task(writer.drain())
        await quiet(drain)
        release.set()
        await asyncio.wait_for(drain, 20)
        assert await reader.readexactly(32) == hashlib.sha256(payload).digest()
        writer.write_eof()
        await done
        await _close(writer)


# ---------------------------------------------------------------------------
# Protocols


@each_kind
async def test_protocol_eof_received_false_closes(k: Kind) -> None:
    """eof_received returning False (or None) closes the transport: the
    server answers from eof_received, both sides get connection_lost(None)
    after made, data and eof, in that order."""
    loop = asyncio.get_running_loop()
    sf = Factory(eof_result=False, on_eof=lambda p: p.transport.write(bytes(p.data).upper()))
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        k.check(tr)
        assert cp.transport is tr and tr.get_protocol() is cp
        assert cp.events == ["made"], cp.events
        tr.write(b"hello ")
        tr.write(b"world")
        assert tr.can_write_eof()
        tr.write_eof()
        assert await cp.lost is None
        sp = await sf.first
        k.check(sp.transport)
        assert await sp.lost is None
        assert bytes(sp.data) == b"hello world"
        assert bytes(cp.data) == b"HELLO WORLD"
        assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events
        assert squash(cp.events) == ["made", "data", "eof", "lost"], cp.events
        assert tr.is_closing() and sp.transport.is_closing()
        assert len(sf.protos) == 1
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_protocol_eof_received_true_keeps_open(k: Kind) -> None:
    """eof_received returning True keeps the transport open: it can still
    write, and closes only when told to."""
    loop = asyncio.get_running_loop()
    sf = Factory(eof_result=True, on_eof=lambda p: p.transport.write(b"still here"))
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        tr.write(b"bye")
        tr.write_eof()
        assert await cp.want(10) == b"still here"
        sp = await sf.first
        await sp.eof
        await turns()
        assert not sp.transport.is_closing()
        assert not sp.lost.done() and not cp.lost.done() and not cp.eof.done()
        sp.transport.write(b", really")
        assert await cp.want(18) == b"still here, really"
        sp.transport.close()
        assert sp.transport.is_closing()
        assert await sp.lost is None
        assert await cp.lost is None
        assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events
        assert squash(cp.events) == ["made", "data", "eof", "lost"], cp.events
        assert bytes(sp.data) == b"bye"
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_buffered_protocol(k: Kind) -> None:
    """BufferedProtocol on both sides: get_buffer/buffer_updated fill a small
    buffer many times; 1 MiB goes through intact and comes back."""
    loop = asyncio.get_running_loop()
    sf = Factory(BufRecorder, size=1000, on_data=lambda p, d: p.transport.write(d))
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(lambda: BufRecorder(4096), HOST, port)
        k.check(tr)
        payload = os.urandom(MiB)
        tr.write(payload)
        assert await cp.want(len(payload)) == payload
        sp = await sf.first
        assert bytes(sp.data) == payload
        assert sp.updates >= len(payload) // 1000       # each at most the buffer
        assert len(sp.hints) >= sp.updates and all(isinstance(h, int) for h in sp.hints)
        assert cp.updates >= len(payload) // 4096
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None                    # EOF -> eof_received() None -> closed
        assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events
        assert squash(cp.events) == ["made", "data", "lost"], cp.events
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_write_and_writelines(k: Kind) -> None:
    """write() takes bytes, bytearray, memoryview; writelines() a list of
    them; empty writes are no-ops; a str is a TypeError."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        tr.write(b"a")
        tr.write(bytearray(b"bc"))
        tr.write(memoryview(b"xdefx")[1:4])
        tr.write(b"")
        tr.writelines([b"g", bytearray(b"h"), memoryview(b"ij"), b""])
        with pytest.raises(TypeError):
            tr.write("not bytes")              # type: ignore[arg-type]
        tr.write_eof()
        sp = await sf.first
        await sp.eof
        assert bytes(sp.data) == b"abcdefghij"
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_abort(k: Kind) -> None:
    """abort() with unsent data: is_closing at once, connection_lost(None)
    once, later; the peer sees EOF or a reset, and its connection_lost comes."""
    loop = asyncio.get_running_loop()
    sf = Factory(on_made=lambda p: p.transport.pause_reading())
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        payload = os.urandom(MiB)
        for _ in range(16):
            tr.write(payload)
        assert tr.get_write_buffer_size() > 0
        tr.abort()
        assert tr.is_closing()
        assert not cp.lost.done()                       # never synchronously
        assert await cp.lost is None
        assert tr.get_write_buffer_size() == 0
        sp.transport.resume_reading()
        exc = await sp.lost
        assert (exc is None and "eof" in sp.events) or isinstance(exc, ConnectionResetError), exc
        assert (payload * 16).startswith(sp.data)       # what came is a prefix, intact
        await turns()
        assert cp.events.count("lost") == 1 and sp.events.count("lost") == 1
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_close_flushes_then_connection_lost(k: Kind) -> None:
    """close() with more buffered than fits: is_closing at once,
    connection_lost(None) later and once, and the peer gets every byte then EOF."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        payload = os.urandom(4 * MiB)
        tr.write(payload)
        tr.close()
        assert tr.is_closing()
        assert not tr.is_reading()
        assert not cp.lost.done()
        tr.close()                                      # twice is harmless
        assert await cp.lost is None
        sp = await sf.first
        await sp.eof
        assert bytes(sp.data) == payload
        assert await sp.lost is None
        await turns()
        assert squash(cp.events) == ["made", "lost"], cp.events
        assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_pause_resume_reading(k: Kind) -> None:
    """No data_received (nor eof_received) while paused; both arrive, in
    order, after resume_reading(); is_reading() follows."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        tr.write(b"first")
        assert await sp.want(5) == b"first"
        st = sp.transport
        assert st.is_reading()
        st.pause_reading()
        st.pause_reading()                              # idempotent
        assert not st.is_reading()
        tr.write(b" while paused")
        tr.write_eof()
        await quiet(sp.want(6))
        assert bytes(sp.data) == b"first" and not sp.eof.done()
        st.resume_reading()
        assert st.is_reading()
        assert bytes(sp.data) == b"first"               # never delivered from inside resume_reading
        assert await sp.want(18) == b"first while paused"
        await sp.eof
        assert squash(sp.events) == ["made", "data", "eof", "lost"] or \
            squash(sp.events) == ["made", "data", "eof"]
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None
        assert not st.is_reading()
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_write_buffer_limits(k: Kind) -> None:
    """set/get_write_buffer_limits as asyncio defines them; ValueError for
    high < low, and the limits stay unchanged then."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        low, high = tr.get_write_buffer_limits()
        assert 0 <= low <= high
        assert tr.get_write_buffer_size() == 0
        tr.set_write_buffer_limits(high=1000, low=100)
        assert tr.get_write_buffer_limits() == (100, 1000)
        tr.set_write_buffer_limits(high=1000)
        assert tr.get_write_buffer_limits() == (250, 1000)
        tr.set_write_buffer_limits(low=100)
        assert tr.get_write_buffer_limits() == (100, 400)
        with pytest.raises(ValueError):
            tr.set_write_buffer_limits(high=10, low=20)
        assert tr.get_write_buffer_limits() == (100, 400)
        tr.set_write_buffer_limits()
        assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        tr.write(b"x")
        sp = await sf.first
        await sp.want(1)
        assert tr.get_write_buffer_size() == 0
        assert "pause" not in cp.events
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_pause_resume_writing(k: Kind) -> None:
    """A peer that does not read: pause_writing once the buffer passes the
    high-water mark (once only), resume_writing when it drains to the low
    one after the peer reads; every byte arrives."""
    loop = asyncio.get_running_loop()
    sf = Factory(on_made=lambda p: p.transport.pause_reading())
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        sp = await sf.first
        chunks = [bytes([i]) * (256 * 1024) for i in range(256)]
        sent = 0
        for chunk in chunks:                            # at most 64 MiB
            tr.write(chunk)
            sent += 1
            if cp.paused.done():
                break
        assert cp.paused.done(), "pause_writing never called"
        assert cp.paused.result() > 64 * 1024
        assert tr.get_write_buffer_size() > 64 * 1024
        tr.write(chunks[sent])                          # more while paused: no second pause
        sent += 1
        assert cp.events.count("pause") == 1
        sp.transport.resume_reading()
        assert await cp.resumed <= 16 * 1024
        expect = b"".join(chunks[:sent])
        assert await sp.want(len(expect)) == expect
        assert cp.events.count("pause") == 1 and cp.events.count("resume") == 1
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_set_protocol_get_protocol(k: Kind) -> None:
    """set_protocol switches mid-stream (Protocol -> BufferedProtocol):
    later data and connection_lost go to the new protocol."""
    loop = asyncio.get_running_loop()

    def serve(p: Recorder, _data: bytes) -> None:
        if bytes(p.data) == b"hello":
            p.transport.write(b"one")
        elif bytes(p.data) == b"hellonext":
            p.transport.write(b"two")

    sf = Factory(on_data=serve)
    server, port = await k.create_server(sf)
    try:
        second = BufRecorder(64)

        def switch(p: Recorder, _data: bytes) -> None:
            if bytes(p.data) == b"one":
                p.transport.set_protocol(second)
                assert p.transport.get_protocol() is second
                second.transport = p.transport
                p.transport.write(b"next")

        tr, first = await loop.create_connection(lambda: Recorder(on_data=switch), HOST, port)
        assert tr.get_protocol() is first
        tr.write(b"hello")
        assert await second.want(3) == b"two"
        assert tr.get_protocol() is second
        assert bytes(first.data) == b"one"
        tr.close()
        assert await second.lost is None
        await turns()
        assert not first.lost.done()
        assert squash(first.events) == ["made", "data"], first.events
        assert squash(second.events) == ["data", "lost"], second.events
        sp = await sf.first
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_extra_info(k: Kind) -> None:
    """sockname/peername agree across the two ends; "socket" is a TCP socket
    object with the same addresses; unknown keys give the default."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        st = sp.transport
        k.check(tr)
        k.check(st)
        csn, cpn = tr.get_extra_info("sockname"), tr.get_extra_info("peername")
        ssn, spn = st.get_extra_info("sockname"), st.get_extra_info("peername")
        assert cpn == ssn == (HOST, port)
        assert csn == spn and csn[0] == HOST and csn[1] > 0 and csn[1] != port
        for t, name, peer in ((tr, csn, cpn), (st, ssn, spn)):
            sock = t.get_extra_info("socket")
            assert sock.family == _std.AF_INET and sock.type == _std.SOCK_STREAM
            assert sock.getsockname() == name and sock.getpeername() == peer
            assert sock.fileno() >= 0
        assert tr.get_extra_info("no such key", "dflt") == "dflt"
        tr.close()
        assert await cp.lost is None
        assert await sp.lost is None
        # Closed transports still know their addresses (and path).
        assert (tr.get_extra_info("sockname"), tr.get_extra_info("peername")) == (csn, cpn)
        assert (st.get_extra_info("sockname"), st.get_extra_info("peername")) == (ssn, spn)
        k.check(tr)
        k.check(st)
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------
# Servers and sockets handed to the loop


@each_kind
async def test_server_close_and_wait_closed(k: Kind) -> None:
    """Server.close stops serving at once (new connections are refused, the
    old one keeps working).  As uvloop's Server: wait_closed() called after
    close() returns at once; one called before waits for close() and then
    for the last connection."""
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        await _close(writer)

    server, port = await k.start_server(_guard(done, echo))
    assert server.is_serving()
    early = asyncio.create_task(server.wait_closed())
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    assert not early.done()
    server.close()
    assert not server.is_serving()
    await asyncio.wait_for(server.wait_closed(), 10)    # after close(): at once
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    writer.write(b"pong")                               # the old one still works
    assert await reader.readexactly(4) == b"pong"
    await quiet(early)                                  # ...and keeps the early waiter waiting
    writer.write_eof()
    assert await reader.read() == b""
    await done
    await _close(writer)
    await asyncio.wait_for(early, 10)


@each_kind
async def test_serve_forever_cancel(k: Kind) -> None:
    """start_serving=False: refused until serve_forever serves; cancelling
    it closes the server."""
    done = asyncio.get_running_loop().create_future()

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await _close(writer)

    server, port = await k.start_server(_guard(done, hello), start_serving=False)
    assert not server.is_serving()
    with pytest.raises(ConnectionRefusedError):        # bound, not listening yet
        await asyncio.open_connection(HOST, port)
    task = asyncio.create_task(server.serve_forever())
    await turns(5)
    assert server.is_serving()
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await reader.read() == b"hi"
    await done
    await _close(writer)
    assert server.is_serving()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.is_serving()
    await server.wait_closed()


@each_kind
async def test_connection_refused(k: Kind) -> None:
    """Nobody listening: ConnectionRefusedError from create_connection and
    sock_connect, as with TCP."""
    lsock = k.listener()
    port = lsock.getsockname()[1]
    lsock.close()
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionRefusedError):
        await loop.create_connection(asyncio.Protocol, HOST, port)
    sock = k.socket()
    sock.setblocking(False)
    try:
        with pytest.raises(ConnectionRefusedError):
            await loop.sock_connect(sock, (HOST, port))
    finally:
        sock.close()


@each_kind
async def test_create_connection_local_addr(k: Kind) -> None:
    """local_addr= binds the client first: the server sees that address as
    the peer, on this kind's path; a local address in use fails with
    EADDRINUSE, as uvloop's does."""
    done = asyncio.get_running_loop().create_future()

    async def peer_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        k.check(writer)
        assert await reader.read() == b""
        await _close(writer)
        return writer.get_extra_info("peername")

    server, port = await k.start_server(_guard(done, peer_of))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(HOST, 0))
        k.check(writer)
        mine = writer.get_extra_info("sockname")
        assert mine[0] == HOST and mine[1] != 0
        writer.write_eof()
        assert await reader.read() == b""
        await _close(writer)
        assert tuple(await asyncio.wait_for(done, 10)) == tuple(mine)
        taken = server.sockets[0].getsockname()[1]         # a port in use: the server's
        with pytest.raises(OSError) as info:
            await asyncio.open_connection(HOST, port, local_addr=(HOST, taken))
        assert info.value.errno == errno.EADDRINUSE, info.value


@each_kind
async def test_connect_accepted_socket_and_create_connection_sock(k: Kind) -> None:
    """A blocking-accepted socket goes to connect_accepted_socket, a connected
    one to create_connection(sock=...); data flows both ways."""
    loop = asyncio.get_running_loop()
    lsock = k.listener()
    csock = k.socket()
    try:
        csock.connect(lsock.getsockname())              # completes against the backlog
        conn, addr = lsock.accept()
    finally:
        lsock.close()
    assert addr == csock.getsockname()
    k.check_sock(csock)
    k.check_sock(conn)
    st, sp = await loop.connect_accepted_socket(Recorder, conn)
    tr, cp = await loop.create_connection(Recorder, sock=csock)
    k.check(st)
    k.check(tr)
    assert tr.get_extra_info("peername") == st.get_extra_info("sockname")
    tr.write(b"ping")
    assert await sp.want(4) == b"ping"
    st.write(b"pong")
    assert await cp.want(4) == b"pong"
    tr.close()
    assert await cp.lost is None
    assert await sp.lost is None                         # EOF -> closed
    assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events


@each_kind
async def test_start_server_and_open_connection_with_sock(k: Kind) -> None:
    """aiohttp's way: start_server(sock=listener), open_connection(sock=connected)."""
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        k.check(writer)
        while data := await reader.read(65536):
            writer.write(data)
        await _close(writer)

    lsock = k.listener()
    addr = lsock.getsockname()
    server = await asyncio.start_server(_guard(done, echo), sock=lsock)
    assert [s.getsockname() for s in server.sockets] == [addr]
    csock = k.socket()
    try:
        csock.connect(addr)
    except BaseException:
        csock.close()
        raise
    csock.setblocking(False)
    k.check_sock(csock)
    async with server:
        reader, writer = await asyncio.open_connection(sock=csock)
        k.check(writer)
        payload = os.urandom(MiB)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        writer.write_eof()
        assert await reader.read() == b""
        await done
        await _close(writer)
    assert not server.is_serving()


@each_kind
async def test_sock_methods(k: Kind) -> None:
    """loop.sock_accept / sock_connect / sock_sendall / sock_recv_into /
    sock_recv on non-blocking sockets, each waiting for its event."""
    loop = asyncio.get_running_loop()
    lsock = k.listener()
    lsock.setblocking(False)
    csock = k.socket()
    csock.setblocking(False)
    conn = None
    try:
        accepting = asyncio.create_task(loop.sock_accept(lsock))
        await turns(5)                                  # it waits: nobody connected yet
        assert not accepting.done()
        await loop.sock_connect(csock, lsock.getsockname())
        conn, addr = await asyncio.wait_for(accepting, 10)
        assert addr == csock.getsockname()
        assert conn.gettimeout() == 0.0
        k.check_sock(csock)
        k.check_sock(conn)
        cancelled = asyncio.create_task(loop.sock_recv(csock, 100))
        await turns(5)
        cancelled.cancel()                              # a cancelled wait leaves no trace
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        receiving = asyncio.create_task(loop.sock_recv(csock, 100))
        await turns(5)                                  # it waits: nothing sent yet
        assert not receiving.done()
        await loop.sock_sendall(conn, b"reply")
        assert await asyncio.wait_for(receiving, 10) == b"reply"
        payload = os.urandom(4 * MiB)
        sending = asyncio.create_task(loop.sock_sendall(csock, payload))
        buf = bytearray(len(payload))
        view = memoryview(buf)
        got = 0
        while got < len(payload):
            n = await loop.sock_recv_into(conn, view[got:])
            assert n > 0
            got += n
        await asyncio.wait_for(sending, 10)
        assert buf == payload
        csock.shutdown(_std.SHUT_WR)
        assert await loop.sock_recv(conn, 10) == b""
        assert await loop.sock_recv_into(conn, view[:10]) == 0
    finally:
        view = None
        if conn is not None:
            conn.close()
        csock.close()
        lsock.close()


@each_kind
async def test_write_eof_after_buffered_data(k: Kind) -> None:
    """write_eof() with data still buffered (the peer is not reading): the
    EOF comes after every byte."""
    loop = asyncio.get_running_loop()
    sf = Factory(eof_result=True, on_made=lambda p: p.transport.pause_reading())
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        payload = os.urandom(16 * MiB)
        tr.write(payload)
        assert tr.get_write_buffer_size() > 0
        tr.write_eof()
        with pytest.raises(RuntimeError):
            tr.write(b"after eof")
        assert not tr.is_closing()
        sp.transport.resume_reading()
        await sp.eof
        assert bytes(sp.data) == payload
        sp.transport.write(b"ack")                      # still open the other way
        assert await cp.want(3) == b"ack"
        sp.transport.close()
        assert await cp.lost is None
        assert await sp.lost is None
        assert squash(sp.events) == ["made", "data", "eof", "lost"], sp.events
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_write_after_peer_closed(k: Kind) -> None:
    """Writing to a peer that closed: connection_lost with a ConnectionError
    (EPIPE or reset), not silence."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(lambda: Recorder(eof_result=True), HOST, port)
        sp = await sf.first
        sp.transport.close()
        await cp.eof
        assert not tr.is_closing()
        for _ in range(100):
            tr.write(b"x" * 1000)
            await turns(2)
            if cp.lost.done():
                break
        assert isinstance(cp.lost.result(), ConnectionError), cp.lost.result()
        assert tr.is_closing()
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_drain_raises_when_peer_aborts(k: Kind) -> None:
    """The peer aborts while we are blocked in drain(): drain() raises a
    ConnectionError, promptly."""
    done = asyncio.get_running_loop().create_future()

    async def abort(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1000)
        writer.transport.abort()

    server, port = await k.start_server(_guard(done, abort))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        with pytest.raises(ConnectionError):
            for _ in range(64):
                writer.write(os.urandom(MiB))
                await asyncio.wait_for(writer.drain(), 10)
        await done
        writer.close()
        with pytest.raises(ConnectionError):
            await writer.wait_closed()


@each_kind
async def test_many_concurrent_connections(k: Kind) -> None:
    """50 clients at once, each with its own exchange, all served."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        await _close(writer)

    server, port = await k.start_server(echo)
    async with server:
        async def client(i: int) -> None:
            reader, writer = await asyncio.open_connection(HOST, port)
            k.check(writer)
            for j in range(20):
                writer.write(b"%d.%d\n" % (i, j))
                assert await reader.readline() == b"%d.%d\n" % (i, j)
            writer.write_eof()
            assert await reader.read() == b""
            await _close(writer)

        await asyncio.gather(*(client(i) for i in range(50)))


@each_kind
async def test_ipv6(k: Kind) -> None:
    """The same over ::1: 4-tuple addresses that agree across the ends."""
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback")
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        k.check(writer)
        data = await reader.read()
        writer.write(data)
        await _close(writer)
        return writer.get_extra_info("sockname"), writer.get_extra_info("peername")

    server = await asyncio.start_server(_guard(done, echo), "::1", 0)
    port = k.served(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await asyncio.open_connection("::1", port)
        k.check(writer)
        sockname, peername = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        assert peername == ("::1", port, 0, 0)
        writer.write(b"six")
        writer.write_eof()
        assert await reader.read() == b"six"
        assert await done == (peername, sockname)
        await _close(writer)


def _has_ipv6() -> bool:
    try:
        with _std.socket(_std.AF_INET6, _std.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# TLS


@each_kind
async def test_tls_streams(k: Kind) -> None:
    """ssl= in start_server/open_connection (create_server/create_connection
    underneath): the handshake verifies the certificate, 1 MiB echoes."""
    server_ctx, client_ctx = tls_contexts()
    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        k.check(writer)
        assert writer.get_extra_info("ssl_object") is not None
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        await _close(writer)

    server, port = await k.start_server(_guard(done, echo), ssl=server_ctx)
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx,
                                                       server_hostname="localhost")
        k.check(writer)
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj is not None and sslobj.version().startswith("TLS")
        assert ("DNS", "localhost") in writer.get_extra_info("peercert")["subjectAltName"]
        payload = os.urandom(MiB)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        await _close(writer)                            # close_notify -> the server reads EOF
        await done


@each_kind
async def test_tls_certificate_rejected(k: Kind) -> None:
    """A client that does not trust the server's certificate: create_connection
    raises SSLCertVerificationError (no hang), the server side is closed."""
    server_ctx, _ = tls_contexts()
    untrusting = ssl.create_default_context()           # system CAs only
    sf = Factory()
    server, port = await k.create_server(sf, ssl=server_ctx)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.get_running_loop().create_connection(
                Recorder, HOST, port, ssl=untrusting, server_hostname="localhost")
        for proto in sf.protos:                          # the server never got a connection
            assert "made" not in proto.events
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_argument_errors(k: Kind) -> None:
    """create_connection / connect_accepted_socket refuse bad argument
    combinations with uvloop's ValueErrors, whatever path they would take."""
    loop = asyncio.get_running_loop()
    _, client_ctx = tls_contexts()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
            await loop.create_connection(Recorder, HOST, port, server_hostname="localhost")
        with pytest.raises(ValueError, match="ssl_handshake_timeout is only meaningful with ssl"):
            await loop.create_connection(Recorder, HOST, port, ssl_handshake_timeout=5)
        sock = k.socket()
        try:
            sock.connect((HOST, port))
            sock.setblocking(False)
            with pytest.raises(ValueError, match="You must set server_hostname"):
                await loop.create_connection(Recorder, sock=sock, ssl=client_ctx)
            with pytest.raises(ValueError, match="can not be specified at the same time"):
                await loop.create_connection(Recorder, HOST, port, sock=sock)
            with pytest.raises(ValueError, match="ssl_handshake_timeout is only meaningful"):
                await loop.connect_accepted_socket(Recorder, sock, ssl_handshake_timeout=5)
            tr, cp = await loop.create_connection(Recorder, sock=sock)   # still usable
        except BaseException:
            sock.close()
            raise
        k.check(tr)
        tr.close()
        assert await cp.lost is None
        await asyncio.wait_for(asyncio.gather(*(p.lost for p in sf.protos)), 10)
    finally:
        server.close()
        await server.wait_closed()


@each_kind
async def test_start_tls_upgrade(k: Kind) -> None:
    """A plain connection upgraded with start_tls on both sides (STARTTLS)."""
    server_ctx, client_ctx = tls_contexts()
    done = asyncio.get_running_loop().create_future()

    async def starttls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert writer.get_extra_info("ssl_object") is None
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"OK\n")
        await writer.drain()
        await writer.start_tls(server_ctx)              # loop.start_tls underneath
        k.check(writer)
        assert writer.get_extra_info("ssl_object") is not None
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        assert await reader.read() == b""
        await _close(writer)

    server, port = await k.start_server(_guard(done, starttls))
    async with server:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"OK\n"
        await writer.start_tls(client_ctx, server_hostname="localhost")
        k.check(writer)
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"secret\n")
        assert await reader.readline() == b"SECRET\n"
        await _close(writer)
        await done


@each_kind
async def test_loop_start_tls_protocols(k: Kind) -> None:
    """loop.start_tls on Protocol transports: the server upgrades from
    data_received, the client after the answer; the new protocols get no
    connection_made (start_tls does not call it), the TLS transports carry
    data both ways and the old protocols see nothing more."""
    loop = asyncio.get_running_loop()
    server_ctx, client_ctx = tls_contexts()
    upgraded = loop.create_future()

    def on_data(p: Recorder, _data: bytes) -> None:
        if bytes(p.data) == b"STARTTLS":
            p.transport.write(b"OK")
            p.transport.pause_reading()     # no TLS byte may reach p before start_tls runs
            proto = Recorder()
            upgraded.set_result((proto, asyncio.ensure_future(
                loop.start_tls(p.transport, proto, server_ctx, server_side=True))))

    sf = Factory(on_data=on_data)
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        tr.write(b"STARTTLS")
        assert await cp.want(2) == b"OK"
        app = Recorder()
        ctr = await loop.start_tls(tr, app, client_ctx, server_hostname="localhost")
        sapp, upgrading = await upgraded
        str_ = await upgrading
        app.transport, sapp.transport = ctr, str_
        k.check(ctr)
        k.check(str_)
        assert ctr.get_extra_info("ssl_object") is not None
        assert str_.get_extra_info("ssl_object") is not None
        assert ctr.get_protocol() is app and str_.get_protocol() is sapp
        ctr.write(b"over tls")
        assert await sapp.want(8) == b"over tls"
        str_.write(b"and back")
        assert await app.want(8) == b"and back"
        sp = await sf.first
        assert bytes(sp.data) == b"STARTTLS" and bytes(cp.data) == b"OK"
        ctr.close()
        assert await app.lost is None
        assert await sapp.lost is None
        # The server's close_notify answer may reach the closing client as EOF.
        assert squash(app.events) in (["data", "lost"], ["data", "eof", "lost"]), app.events
        assert squash(sapp.events) == ["data", "eof", "lost"], sapp.events
        assert squash(cp.events) == ["made", "data"], cp.events
        assert squash(sp.events) == ["made", "data"], sp.events
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------
# Fd callbacks (add_reader / add_writer), as tornado and dask drive sockets


def removed(k: Kind, got: Any, expected: bool) -> None:
    """What remove_reader/remove_writer returned: whether a callback was
    removed (asyncio's contract, and the shrimpio loop's); plain uvloop
    returns None."""
    assert got is (None if k.name == "uvloop" else expected), got


async def until(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (by loop turns, with a deadline) until ``cond()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def _accepted_pair(k: Kind) -> tuple:
    """(listener, client, accepted): a non-blocking connected pair of this
    kind, the server side accepted by a reader callback on the listener."""
    loop = asyncio.get_running_loop()
    lsock = k.listener()
    lsock.setblocking(False)
    csock = k.socket()
    csock.setblocking(False)
    accepted = loop.create_future()

    def on_accept() -> None:
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        if accepted.done():
            conn.close()
        else:
            accepted.set_result(conn)

    loop.add_reader(lsock, on_accept)
    await loop.sock_connect(csock, lsock.getsockname())
    conn = await asyncio.wait_for(accepted, 10)
    removed(k, loop.remove_reader(lsock), True)
    removed(k, loop.remove_reader(lsock), False)
    k.check_sock(conn)
    return lsock, csock, conn


@each_kind
async def test_fd_callbacks_level_triggered(k: Kind) -> None:
    """add_reader on a listener fires when a client comes; add_reader on an
    accepted socket's fd fires exactly while a non-blocking recv would not
    block (once per loop turn while data is left), add_writer while a send
    would not; remove_* say whether a callback was there."""
    loop = asyncio.get_running_loop()
    lsock, csock, conn = await _accepted_pair(k)
    try:
        got: list = []
        loop.add_reader(conn.fileno(), lambda: got.append(conn.recv(1)))  # never BlockingIOError
        await turns()
        assert got == []                                  # nothing sent: never called
        await loop.sock_sendall(csock, b"abc")
        await until(lambda: len(got) == 3)                # one byte a turn, while bytes are left
        await turns()
        assert b"".join(got) == b"abc"                    # ...and no call once they are read
        removed(k, loop.remove_reader(conn.fileno()), True)
        removed(k, loop.remove_reader(conn.fileno()), False)

        calls = [0]
        loop.add_writer(conn, lambda: calls.__setitem__(0, calls[0] + 1))    # a socket object
        await until(lambda: calls[0] >= 3)                # writable: every turn
        removed(k, loop.remove_writer(conn), True)
        total = 0
        while True:                                       # fill every buffer on the way
            try:
                total += conn.send(bytes(65536))
            except BlockingIOError:
                break
        sent_more = loop.create_future()

        def on_room() -> None:
            loop.remove_writer(conn.fileno())
            sent_more.set_result(conn.send(b"z"))          # room: never BlockingIOError

        loop.add_writer(conn.fileno(), on_room)
        await turns()
        assert not sent_more.done()                       # full: not called
        received = 0
        while not sent_more.done() or received < total + 1:
            received += len(await asyncio.wait_for(loop.sock_recv(csock, 1 << 20), 10))
        assert await sent_more == 1 and received == total + 1
    finally:
        conn.close()
        csock.close()
        lsock.close()


@each_kind
async def test_fd_reader_at_end_of_stream_fires_once_a_turn(k: Kind) -> None:
    """A reader left registered on a socket whose peer closed is called
    once per loop turn (level-triggered, as uvloop does with a kernel socket
    at EOF), each time with b"" to read; an idle socket's reader costs no CPU."""
    loop = asyncio.get_running_loop()
    lsock, csock, conn = await _accepted_pair(k)
    try:
        ends: list = []
        loop.add_reader(conn.fileno(), lambda: ends.append(conn.recv(10)))
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(0.3)                          # idle, watched: the loop sleeps
        assert time.process_time() - cpu0 < 0.1 * (time.monotonic() - t0) + 0.02
        assert ends == []
        csock.close()
        await until(lambda: len(ends) > 0)
        n = len(ends)
        await turns(50)
        assert 25 <= len(ends) - n <= 75, len(ends) - n   # once a turn, no burst
        assert set(ends) == {b""}
        removed(k, loop.remove_reader(conn.fileno()), True)
        n = len(ends)
        await turns()
        assert len(ends) == n
    finally:
        conn.close()
        lsock.close()


@each_kind
async def test_fd_writer_on_a_full_socket_sleeps(k: Kind) -> None:
    """A writer callback on a socket whose buffers are full (the peer not
    reading) waits without CPU, also after our own shutdown(SHUT_RD), and
    runs once the peer reads."""
    loop = asyncio.get_running_loop()
    lsock, csock, conn = await _accepted_pair(k)
    try:
        conn.shutdown(_std.SHUT_RD)
        total = 0
        while True:
            try:
                total += conn.send(bytes(65536))
            except BlockingIOError:
                break
        room = loop.create_future()
        loop.add_writer(conn, lambda: room.done() or room.set_result(None))
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(0.3)
        assert time.process_time() - cpu0 < 0.1 * (time.monotonic() - t0) + 0.02
        assert not room.done()
        received = 0
        while received < total:
            received += len(await asyncio.wait_for(loop.sock_recv(csock, 1 << 20), 10))
        await asyncio.wait_for(room, 10)
        removed(k, loop.remove_writer(conn), True)
    finally:
        conn.close()
        csock.close()
        lsock.close()


@each_kind
async def test_fd_callbacks_refused_on_a_transport_fd(k: Kind) -> None:
    """The fd of a transport belongs to it: add_reader/add_writer/remove_*
    on it raise RuntimeError, as uvloop says of its own transports."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        for t in (tr, sp.transport):
            fd = t.get_extra_info("socket").fileno()
            for call in (lambda: loop.add_reader(fd, print), lambda: loop.add_writer(fd, print),
                         lambda: loop.remove_reader(fd), lambda: loop.remove_writer(fd)):
                with pytest.raises(RuntimeError, match="is used by transport"):
                    call()
        tr.write(b"still fine")
        assert await sp.want(10) == b"still fine"
        tr.close()
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------
# sock_* on a stdlib socket, sendfile


@each_kind
async def test_sock_methods_on_a_stdlib_socket(k: Kind) -> None:
    """A stdlib socket (what aiohttp's happy eyeballs makes) connected with
    sock_connect to this kind's server: sock_sendall, sock_recv,
    sock_recv_into and a reader callback on its fd all carry the stream,
    and closing it ends the server's side."""
    loop = asyncio.get_running_loop()
    lsock = k.listener()
    lsock.setblocking(False)
    csock = StdSocket(_std.AF_INET, _std.SOCK_STREAM)
    csock.setblocking(False)
    conn = None
    try:
        accepting = asyncio.create_task(loop.sock_accept(lsock))
        await loop.sock_connect(csock, lsock.getsockname())
        conn, _ = await asyncio.wait_for(accepting, 10)
        k.check_sock(conn)
        payload = os.urandom(3 * MiB)
        sending = asyncio.create_task(loop.sock_sendall(csock, payload))
        got = bytearray()
        while len(got) < len(payload):
            got += await asyncio.wait_for(loop.sock_recv(conn, 1 << 20), 10)
        await asyncio.wait_for(sending, 10)
        assert got == payload
        readable = loop.create_future()
        loop.add_reader(csock.fileno(), lambda: readable.done() or readable.set_result(None))
        await loop.sock_sendall(conn, b"reply")
        await asyncio.wait_for(readable, 10)
        removed(k, loop.remove_reader(csock.fileno()), True)
        buf = bytearray(5)
        n = 0
        while n < 5:
            n += await asyncio.wait_for(loop.sock_recv_into(csock, memoryview(buf)[n:]), 10)
        assert buf == b"reply"
        csock.close()
        assert await asyncio.wait_for(loop.sock_recv(conn, 10), 10) == b""
    finally:
        if conn is not None:
            conn.close()
        csock.close()
        lsock.close()


def _file(data: bytes) -> Any:
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    f.seek(0)
    return f


@each_kind
async def test_sock_sendfile(k: Kind) -> None:
    """loop.sock_sendfile: every byte from offset (count of them, or to the
    end), the file left after the last byte sent; a file object without an
    fd is read.  (uvloop has no sendfile: NotImplementedError there.)"""
    loop = asyncio.get_running_loop()
    lsock, csock, conn = await _accepted_pair(k)
    data = os.urandom(3 * MiB + 123)
    try:
        with _file(data) as f:
            if k.name == "uvloop":
                with pytest.raises(NotImplementedError):
                    await loop.sock_sendfile(csock, f)
                return
            for file, offset, count in ((f, 1000, 2 * MiB), (f, 0, None), (io.BytesIO(data), 7, None)):
                want = data[offset:offset + count] if count else data[offset:]
                sending = asyncio.create_task(loop.sock_sendfile(csock, file, offset, count))
                got = bytearray()
                while len(got) < len(want):
                    got += await asyncio.wait_for(loop.sock_recv(conn, 1 << 20), 10)
                assert await asyncio.wait_for(sending, 10) == len(want)
                assert got == want
                assert file.tell() == offset + len(want)
            with pytest.raises(ValueError):
                await loop.sock_sendfile(csock, f, -1)
            with pytest.raises(ValueError):
                await loop.sock_sendfile(csock, f, 0, 0)
    finally:
        conn.close()
        csock.close()
        lsock.close()


@each_kind
async def test_loop_sendfile(k: Kind) -> None:
    """loop.sendfile(transport, file): every byte reaches the peer (with
    flow control), then the protocol gets data as before.  (uvloop has no
    sendfile: NotImplementedError there.)"""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    data = os.urandom(5 * MiB + 7)
    try:
        tr, cp = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        with _file(data) as f:
            if k.name == "uvloop":
                with pytest.raises(NotImplementedError):
                    await loop.sendfile(tr, f)
            else:
                assert await asyncio.wait_for(loop.sendfile(tr, f, 10), 20) == len(data) - 10
                assert f.tell() == len(data)
                assert await asyncio.wait_for(sp.want(len(data) - 10), 20) == data[10:]
                assert tr.get_protocol() is cp
        sp.transport.write(b"back")
        assert await cp.want(4) == b"back"
        tr.close()
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------
# Rules uvloop keeps


@each_kind
async def test_tcp_nodelay_on_every_transport(k: Kind) -> None:
    """TCP_NODELAY reads back set on both ends' sockets, as uvloop and
    asyncio set it on every TCP transport."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        tr, _ = await loop.create_connection(Recorder, HOST, port)
        sp = await sf.first
        for t in (tr, sp.transport):
            assert t.get_extra_info("socket").getsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY) != 0
        tr.close()
        assert await sp.lost is None
    finally:
        server.close()
        await server.wait_closed()


class _DuckBuffered(asyncio.BaseProtocol):
    """get_buffer/buffer_updated without asyncio.BufferedProtocol."""

    def __init__(self) -> None:
        self.buf = bytearray(100)
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost.set_result(exc)


class _ProtocolWithGetBuffer(Recorder):
    """An asyncio.Protocol that happens to have get_buffer: data_received."""

    def get_buffer(self, sizehint: int) -> bytearray:
        raise AssertionError("a Protocol gets data_received")

    def buffer_updated(self, nbytes: int) -> None:
        raise AssertionError("a Protocol gets data_received")


@each_kind
async def test_buffered_is_decided_as_uvloop_does(k: Kind) -> None:
    """A protocol with get_buffer() that is not an asyncio.Protocol is
    buffered whatever its base class; an asyncio.Protocol gets data_received."""
    loop = asyncio.get_running_loop()
    for cls in (_DuckBuffered, _ProtocolWithGetBuffer):
        protos: list = []

        def factory(cls: Any = cls, protos: list = protos) -> Any:
            protos.append(cls())
            return protos[-1]

        server, port = await k.create_server(factory)
        try:
            tr, _ = await loop.create_connection(Recorder, HOST, port)
            tr.write(b"x" * 250)
            tr.close()
            await until(lambda: len(protos) == 1)
            await asyncio.wait_for(protos[0].lost, 10)
            assert bytes(protos[0].data) == b"x" * 250
        finally:
            server.close()
            await server.wait_closed()


@each_kind
async def test_create_server_needs_an_address_or_a_socket(k: Kind) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="Neither host/port nor sock"):
        await loop.create_server(asyncio.Protocol)


@each_kind
async def test_debug_mode_refuses_blocking_sockets(k: Kind) -> None:
    """In debug mode the sock_* calls refuse a blocking socket (ValueError),
    as uvloop's do, whatever its path."""
    loop = asyncio.get_running_loop()
    lsock, csock, conn = await _accepted_pair(k)
    loop.set_debug(True)
    try:
        for s in (conn, lsock, csock):
            s.setblocking(True)
        fresh = k.socket()
        with fresh:
            for call in (lambda: loop.sock_recv(conn, 1), lambda: loop.sock_recv_into(conn, bytearray(1)),
                         lambda: loop.sock_sendall(conn, b"x"), lambda: loop.sock_accept(lsock),
                         lambda: loop.sock_connect(fresh, lsock.getsockname())):
                with pytest.raises(ValueError, match="non-blocking"):
                    await call()
    finally:
        loop.set_debug(False)
        conn.close()
        csock.close()
        lsock.close()


@each_kind
async def test_cancelled_tls_connect_frees_its_context_at_once(k: Kind) -> None:
    """A create_connection(ssl=...) cancelled during the handshake (the
    server never answers it) leaves no reference cycle: the SSLContext goes
    without the cycle collector."""
    loop = asyncio.get_running_loop()
    server, port = await k.create_server(Recorder)           # speaks no TLS
    gc.disable()
    try:
        ctx = ssl.create_default_context()
        ref = weakref.ref(ctx)
        task = asyncio.create_task(loop.create_connection(
            asyncio.Protocol, HOST, port, ssl=ctx, server_hostname="localhost"))
        del ctx
        await turns()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        await until(lambda: ref() is None, 5)
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()


@each_kind
async def test_happy_eyeballs_keywords(k: Kind) -> None:
    """happy_eyeballs_delay and interleave (asyncio's) connect on this
    kind's path; uvloop has neither (TypeError)."""
    loop = asyncio.get_running_loop()
    sf = Factory()
    server, port = await k.create_server(sf)
    try:
        if k.name == "uvloop":
            with pytest.raises(TypeError):
                await loop.create_connection(Recorder, HOST, port, happy_eyeballs_delay=0.25)
            return
        for kw in ({"happy_eyeballs_delay": 0.25}, {"interleave": 1}):
            tr, _ = await loop.create_connection(Recorder, HOST, port, **kw)
            k.check(tr)
            tr.close()
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------
# Two processes


_CHILD = r'''
import asyncio, hashlib, sys
kind = sys.argv[1]

async def main():
    done = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        try:
            info = writer.get_extra_info("shrimpio")
            path = info["path"] if info else "tcp"
            while line := await reader.readline():
                if line == b"path\n":
                    writer.write(path.encode() + b"\n")
                elif line.startswith(b"sha "):
                    data = await reader.readexactly(int(line.split()[1]))
                    writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n")
                else:
                    writer.write(line)
                await writer.drain()
            writer.close()
            await writer.wait_closed()
        finally:
            done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await done

if kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    import shrimpio
    shrimpio.run(main())
'''


@contextlib.asynccontextmanager
async def child_server(k: Kind) -> Any:
    """The echo server of ``_CHILD`` in a child process of this kind, and a
    connection to it: yields (reader, writer, proc).  The child is reaped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, k.name, stdout=asyncio.subprocess.PIPE, env=child_env())
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        port = k.served(int(line))
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            k.check(writer)
            writer.write(b"path\n")
            assert await reader.readline() == (b"shm\n" if k.shm else b"tcp\n")
            yield reader, writer, proc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def _end_child(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     proc: Any) -> None:
    """EOF to the child: it answers EOF and exits 0."""
    writer.write_eof()
    assert await reader.read() == b""
    assert await asyncio.wait_for(proc.wait(), 20) == 0


@each_kind
async def test_two_processes(k: Kind) -> None:
    """Server in a child process, client here: both ends on this kind's
    path; 8 MiB and 200 round trips arrive intact."""
    async with child_server(k) as (reader, writer, proc):
        assert proc.pid != os.getpid()
        payload = os.urandom(8 * MiB)
        writer.write(b"sha %d\n" % len(payload))
        writer.write(payload)
        await writer.drain()
        assert (await reader.readline()).strip() == hashlib.sha256(payload).hexdigest().encode()
        for i in range(200):
            writer.write(b"round %d\n" % i)
            assert await reader.readline() == b"round %d\n" % i
        await _end_child(reader, writer, proc)


@each_kind
async def test_peer_process_killed(k: Kind) -> None:
    """The peer process dies (SIGKILL): reading gives EOF (or a reset), and
    writing fails with a ConnectionError instead of hanging or spinning."""
    async with child_server(k) as (reader, writer, proc):
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        proc.kill()
        assert await asyncio.wait_for(proc.wait(), 20) == -9
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(ConnectionError):
            for _ in range(1000):                       # up to 64 MiB
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 10)
        # A new client of the dead server is refused (and, with shrimpio,
        # sweeps the listener's stale registry entry on its way to TCP).
        _route.clear_tcp_rules()
        probe = _std.socket() if k.name == "uvloop" else ShmSocket()
        with probe, pytest.raises(ConnectionRefusedError):
            probe.connect((HOST, writer.get_extra_info("peername")[1]))


_SOCK_CHILD = r'''
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
if kind == "uvloop":
    cls = socket.socket
else:
    import shrimpio.socket
    cls = shrimpio.socket.socket
s = cls(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("127.0.0.1", port))
s.sendall(b"hi")
sys.stdin.buffer.read()         # until killed
'''


@each_kind
async def test_sock_methods_peer_process_killed(k: Kind) -> None:
    """sock_* against a peer process that dies (SIGKILL): sock_recv gives
    EOF (or a reset), sock_sendall fails with a ConnectionError."""
    loop = asyncio.get_running_loop()
    lsock = k.listener()
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    env = child_env()
    if k.name == "tcp":
        env["SHRIMPIO_TCP"] = str(port)                 # the child keeps to TCP as well
    conn = None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SOCK_CHILD, k.name, str(port), stdin=asyncio.subprocess.PIPE,
        env=env)
    try:
        conn, _ = await asyncio.wait_for(loop.sock_accept(lsock), 20)
        k.check_sock(conn)
        got = b""
        while len(got) < 2:
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 2 - len(got)), 10)
            assert chunk
            got += chunk
        assert got == b"hi"
        proc.kill()
        assert await asyncio.wait_for(proc.wait(), 20) == -9
        try:
            assert await asyncio.wait_for(loop.sock_recv(conn, 10), 10) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(loop.sock_sendall(conn, bytes(64 * MiB)), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()
        if conn is not None:
            conn.close()
        lsock.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@each_kind
async def test_idle_pair_uses_no_cpu(k: Kind) -> None:
    """A connected pair in two processes, idle after traffic, spends (almost)
    no CPU on either side for a second, and wakes for the next message."""
    async with child_server(k) as (reader, writer, proc):
        for i in range(10):                             # traffic: both sides poll hot...
            writer.write(b"warm %d\n" % i)
            assert await reader.readline() == b"warm %d\n" % i
        child0, me0, t0 = _cpu_seconds(proc.pid), time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)                        # ...then idle: a measurement window
        child1, me1, t1 = _cpu_seconds(proc.pid), time.process_time(), time.monotonic()
        wall = t1 - t0
        assert child1 - child0 < 0.05 * wall, f"child used {child1 - child0:.3f}s CPU in {wall:.3f}s"
        assert me1 - me0 < 0.05 * wall, f"parent used {me1 - me0:.3f}s CPU in {wall:.3f}s"
        writer.write(b"awake?\n")                      # the sleeping peer is woken
        assert await asyncio.wait_for(reader.readline(), 5) == b"awake?\n"
        await _end_child(reader, writer, proc)
