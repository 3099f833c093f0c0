"""A hostile client's hello: whatever is wrong in it (a ring header, an fd
of the wrong kind or state, a segment that could be truncated under us),
the listener drops that client alone, leaks nothing (fds, mappings), and
serves the next one.  And a doorbell that errors is the peer's death, never
a wait that returns at once for ever.

The well-formed parts and the raw sending are test_connect.py's
(``_good_parts``, ``_send_raw_hello``); the variants here are the ones that
reach past the hello's own checks into the segment and the fds.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import threading

import pytest

import shrimpio.socket as ss
from shrimpio import _connection
from shrimpio._connection import Connection
from shrimpio._fastpath import Ring, RingCorruptedError, Segment, prepare_rings

from conftest import wait_for
from test_connect import _good_parts, _send_raw_hello, connect, exchange, listener  # noqa: F401


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _seqpacket_listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(4)
    return s


def _variants():
    out = []

    def v(name):
        def deco(fn):
            out.append((name, fn))
            return fn
        return deco

    @v("second ring header corrupted")
    def _(seg, theirs, body, tmp):
        off2 = Connection.layout(body["c2s"], body["s2c"])[0]
        memoryview(seg)[off2 + 8:off2 + 16] = b"\xff" * 8   # its capacity
        return [seg.fileno(), theirs.fileno()], []

    @v("second ring magic wrong")
    def _(seg, theirs, body, tmp):
        off2 = Connection.layout(body["c2s"], body["s2c"])[0]
        memoryview(seg)[off2:off2 + 4] = b"nope"
        return [seg.fileno(), theirs.fileno()], []

    @v("second ring indices inconsistent")
    def _(seg, theirs, body, tmp):
        off2 = Connection.layout(body["c2s"], body["s2c"])[0]
        memoryview(seg)[off2 + 64:off2 + 72] = (10 ** 9).to_bytes(8, "little")
        return [seg.fileno(), theirs.fileno()], []

    @v("space doorbell is a listening seqpacket socket")
    def _(seg, theirs, body, tmp):
        lsn = _seqpacket_listener(os.path.join(tmp, "l"))
        # A pending connection makes it readable for ever: a waiter that
        # took it for a doorbell would spin.
        knock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        knock.connect(os.path.join(tmp, "l"))
        return [seg.fileno(), lsn.fileno()], [lsn, knock]

    @v("space doorbell is an unconnected seqpacket socket")
    def _(seg, theirs, body, tmp):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return [seg.fileno(), s.fileno()], [s]

    @v("space doorbell is the segment")
    def _(seg, theirs, body, tmp):
        return [seg.fileno(), seg.fileno()], []

    @v("segment is the space doorbell")
    def _(seg, theirs, body, tmp):
        return [theirs.fileno(), theirs.fileno()], []

    @v("segment is an unsealable shm file")
    def _(seg, theirs, body, tmp):
        shm = Segment(body["size"], kind="shm")
        prepare_rings(shm, Connection.layout(body["c2s"], body["s2c"])[0], body["c2s"], body["s2c"],
                      _connection.SMALL_RING)
        return [shm.fileno(), theirs.fileno()], [shm]

    @v("segment is a regular file on disk")
    def _(seg, theirs, body, tmp):
        fd = os.open(os.path.join(tmp, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, bytes(memoryview(seg)))
        return [fd, theirs.fileno()], [fd]

    @v("segment is a directory")
    def _(seg, theirs, body, tmp):
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        return [fd, theirs.fileno()], [fd]

    @v("three fds")
    def _(seg, theirs, body, tmp):
        return [seg.fileno(), theirs.fileno(), theirs.fileno()], []

    @v("no fds")
    def _(seg, theirs, body, tmp):
        return [], []

    return out


VARIANTS = _variants()


def _close(obj) -> None:
    if isinstance(obj, int):
        os.close(obj)
    else:
        obj.close()


@pytest.mark.parametrize("mutate", [f for _, f in VARIANTS], ids=[n for n, _ in VARIANTS])
@pytest.mark.parametrize("mode", ["blocking", "nonblocking"])
def test_a_hostile_hello_drops_that_client_alone(listener, tmp_path, mutate, mode):  # noqa: F811
    """The listener refuses the client (it reads EOF), keeps no fd or
    mapping of it, raises nothing, and serves the next client."""
    seg, mine, theirs, body = _good_parts()
    fds, extra = mutate(seg, theirs, body, str(tmp_path))
    if mode == "nonblocking":
        listener.setblocking(False)
    maps = _maps()
    fd_count = len(os.listdir("/proc/self/fd"))
    bad = _send_raw_hello(listener, body, fds)
    for obj in extra:
        _close(obj)
    seg.close()
    theirs.close()
    try:
        # The refusal happens in the next accept(): nothing to accept yet.
        if mode == "nonblocking":
            with pytest.raises(BlockingIOError):
                listener.accept()
        else:
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()
        wait_for(lambda: select.select([bad], [], [], 0)[0], what="refusal")
        assert bad.recv(1) == b""
        assert listener._lst.waiting == {}
        assert len(os.listdir("/proc/self/fd")) <= fd_count + 1      # + bad's own
        assert _maps() <= maps
        listener.settimeout(5)
        cli = connect(listener.getsockname())
        srv, addr = listener.accept()
        assert addr == cli.getsockname() and ss.info(srv)["path"] == "shm"
        exchange(cli, srv)
        cli.close()
        srv.close()
    finally:
        bad.close()
        mine.close()


# --------------------------------------------------------------------------- doorbell errors

def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@pytest.mark.parametrize("bell_kind", ["listening", "unconnected"])
def test_a_doorbell_that_errors_is_the_peers_death(tmp_path, bell_kind):
    """A writer blocked on a full ring whose space doorbell is not a
    connected socket (a listening one with a pending connection is readable
    for ever, and recv on it fails): the wait ends with BrokenPipeError,
    not a spin."""
    seg = Segment(Ring.footprint(4096))
    path = str(tmp_path / "l")
    if bell_kind == "listening":
        bell = _seqpacket_listener(path)
        knock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        knock.connect(path)
    else:
        bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        knock = None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w = Ring(seg, 0, 4096, create=True, data_bell=a.fileno(), space_bell=bell.fileno(),
             busy_poll_us=0)
    try:
        w.write_all(b"x" * 4096, timeout=0)
        t0 = _cpu()
        with pytest.raises(BrokenPipeError):
            w.write_all(b"y", timeout=5)
        assert _cpu() - t0 < 0.5
        # A reader's wait on such a data doorbell likewise ends (reset).
        r = Ring(seg, 0, 4096, data_bell=bell.fileno(), space_bell=b.fileno(), busy_poll_us=0)
        try:
            r.read(4096, timeout=0)
            with pytest.raises(ConnectionResetError):
                r.read(1, timeout=5)
            assert r.wait_readable(5)
        finally:
            r.close()
    finally:
        w.close()
        seg.close()
        for s in (bell, knock, a, b):
            if s is not None:
                s.close()


def test_poller_treats_a_doorbell_error_as_peer_death():
    from shrimpio._fastpath import drain_bell
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert drain_bell(s.fileno())          # ENOTCONN: gone, not "nothing pending"
    finally:
        s.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert not drain_bell(a.fileno())
        b.send(b"\x01")
        assert not drain_bell(a.fileno())
        b.close()
        assert drain_bell(a.fileno())


# --------------------------------------------------------------------------- unsealed segments

def test_client_with_shm_segments_takes_tcp_and_says_why(listener, monkeypatch):  # noqa: F811
    """POSIX shm segments cannot be sealed against shrinking: a peer could
    truncate one under us (SIGBUS).  A client told to use them connects by
    TCP instead, with the reason."""
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "shm")
    cli = connect(listener.getsockname())
    try:
        info = ss.info(cli)
        assert info["path"] == "tcp" and "seal" in info["reason"], info
        srv, _ = listener.accept()
        with srv:
            exchange(cli, srv)
    finally:
        cli.close()


def test_listener_with_shm_setting_still_refuses_unsealed(listener, monkeypatch):  # noqa: F811
    """Whatever this process's own setting, a peer's unsealed segment is refused."""
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "shm")
    seg, mine, theirs, body = _good_parts()
    fds, extra = dict(VARIANTS)["segment is an unsealable shm file"](seg, theirs, body, "/tmp")
    bad = _send_raw_hello(listener, body, fds)
    for obj in extra:
        _close(obj)
    seg.close()
    theirs.close()
    try:
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
        wait_for(lambda: select.select([bad], [], [], 0)[0], what="refusal")
        assert bad.recv(1) == b""
    finally:
        bad.close()
        mine.close()


def test_threads_unaffected_by_a_refused_client(listener):  # noqa: F811
    """A blocked accept() in a thread survives a hostile hello and returns
    the next good client."""
    seg, mine, theirs, body = _good_parts()
    got = []
    listener.settimeout(10)
    t = threading.Thread(target=lambda: got.append(listener.accept()))
    t.start()
    try:
        fds, extra = dict(VARIANTS)["second ring header corrupted"](seg, theirs, body, "/tmp")
        bad = _send_raw_hello(listener, body, fds)
        seg.close()
        theirs.close()
        cli = connect(listener.getsockname())
        t.join(10)
        assert got and got[0][1] == cli.getsockname()
        got[0][0].close()
        cli.close()
        bad.close()
    finally:
        mine.close()
        t.join(10)
        for s, _ in got:
            s.close()


# --------------------------------------------------------------------------- honest listener readiness

@pytest.mark.parametrize("api", ["select", "poll", "epoll"])
def test_a_listener_is_readable_only_when_accept_will_return(listener, api):  # noqa: F811
    """A client that connected to the registry entry but whose hello has
    not come (or is refused) does not make the listener readable: a
    non-blocking accept() after the poller said so must not raise
    BlockingIOError (the stdlib's selectors echo server dies of that)."""
    import array
    import json

    from shrimpio import _poll
    from test_connect import HDR, _silent_client

    listener.setblocking(False)
    if api == "select":
        def ready(timeout):
            return bool(_poll.select([listener], [], [], timeout)[0])
        close = None
    else:
        poller = _poll.poll() if api == "poll" else _poll.epoll()
        poller.register(listener.fileno(), select.POLLIN if api == "poll" else select.EPOLLIN)

        def ready(timeout):
            return bool(poller.poll(timeout * 1000 if api == "poll" else timeout))
        close = getattr(poller, "close", None)
    seg, mine, theirs, body = _good_parts()
    late = _silent_client(listener)
    bad = None
    try:
        assert not ready(0.1)                   # connected, no hello yet
        seg2, mine2, theirs2, body2 = _good_parts()
        fds, extra = dict(VARIANTS)["second ring header corrupted"](seg2, theirs2, body2, "/tmp")
        bad = _send_raw_hello(listener, body2, fds)
        seg2.close()
        theirs2.close()
        mine2.close()
        assert not ready(0.1)                   # a hello that will be refused
        payload = json.dumps({"kind": "stream", **body}).encode()
        late.sendmsg([HDR.pack(b"SHRM", 1, 0, len(payload)) + payload],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                       array.array("i", [seg.fileno(), theirs.fileno()]))])
        assert ready(5)
        srv, addr = listener.accept()           # no BlockingIOError
        assert addr == ("127.0.0.1", 4242) and ss.info(srv)["path"] == "shm"
        srv.close()
        assert not ready(0.05)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        if close is not None:
            close()
        late.close()
        if bad is not None:
            bad.close()
        seg.close()
        mine.close()
        theirs.close()
