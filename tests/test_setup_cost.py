"""What makes a connection's set-up and tear-down cheap must not change
what it does: the hello parsed once per text, accept()'s busy-poll rule for
thread-per-client servers, fds closed with the GIL held, the listener's
bare space fd, and the stat slot's address text."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

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
