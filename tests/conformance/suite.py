"""The conformance tests, written once against the stdlib socket API.

Each class is a mixin: ``tests/test_conformance.py`` subclasses it as a
``Test*`` class and provides the ``net`` fixture (a :class:`harness.Net` of
one kind: ``stdlib``, ``shm`` or ``tcp_fallback``).  Every assertion here must
hold for every kind.  Where Linux TCP itself allows several outcomes, the
test accepts exactly that set, for all kinds alike.

Conventions: waits that must succeed use ``READY`` (they return as soon as
the condition holds); checks that something does *not* happen use a short
``QUIET`` window (a blocking call with a timeout, never a sleep).
"""

from __future__ import annotations

import array
import errno
import io
import os
import select
import selectors
import signal
import socket
import stat
import struct
import time

import pytest

from conftest import wait_for

from .harness import (ALL_POLLERS, POLLERS, QUIET, READY, Poller, StdSocket, Worker, elapsed,
                      has_ipv6_loopback, pattern, recv_exactly, recv_until_eof)

needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")

#: Small kernel buffers / rings, so that "full" is reached quickly.
SMALL_BUFS = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 8192),
              (socket.SOL_SOCKET, socket.SO_RCVBUF, 8192))

#: Known shrimpio limitation that needs a data-plane change (_fastpath):

#: What a send to a dead or closed peer may raise on Linux TCP.
PEER_GONE_ERRORS = (BrokenPipeError, ConnectionResetError)


def _closed_port(net) -> int:
    """A TCP port of 127.0.0.1 with nobody listening; the returned holder
    socket (bound, not listening) keeps anybody else from taking it."""
    holder = net.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    net.served(port)
    return port


def _send_until_error(sock, limit_bytes: int = 64 << 20, timeout: float = READY) -> BaseException:
    """Send until the peer's absence is reported; return the exception.
    (TCP reports it on the first or second send after the RST; any
    implementation must report it before ``limit_bytes`` or ``timeout``.)"""
    chunk = b"x" * 65536
    sent = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while True:
        try:
            sent += sock.send(chunk)
        except OSError as exc:
            return exc
        assert sent < limit_bytes and time.monotonic() < deadline, \
            f"send kept succeeding ({sent} bytes) to a peer that is gone"


def _fill(sock, poller: Poller, deadline: float = READY) -> int:
    """Non-blocking sends until the socket stays unwritable for QUIET.
    Returns the bytes sent."""
    sock.setblocking(False)
    poller.register(sock, read=False, write=True)
    chunk = b"f" * 16384
    sent = 0
    end = time.monotonic() + deadline
    while True:
        try:
            sent += sock.send(chunk)
            continue
        except BlockingIOError:
            pass
        if not poller.writable(sock, QUIET):
            return sent
        assert time.monotonic() < end, "the send buffer never filled"


def _drain(sock) -> int:
    """Read everything readable now, non-blocking; returns the count."""
    got = 0
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return got
            if not data:
                return got
            got += len(data)
    finally:
        sock.settimeout(timeout)


def _assert_blocked(worker: Worker) -> None:
    """The worker's blocking call has not returned within QUIET."""
    worker.join(QUIET)
    assert worker.is_alive(), f"call returned early: {worker.value!r} / {worker.error!r}"


# ---------------------------------------------------------------------------


class ConnectTests:
    """connect / connect_ex."""

    def test_connect_roundtrip(self, net):
        cli, srv = net.pair()
        cli.sendall(b"ping")
        assert recv_exactly(srv, 4) == b"ping"
        srv.sendall(b"pong")
        assert recv_exactly(cli, 4) == b"pong"

    def test_connect_ex_success(self, net):
        lst = net.listener()
        cli = net.socket()
        assert cli.connect_ex(lst.getsockname()) == 0
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert addr == cli.getsockname()
        cli.sendall(b"ok")
        assert recv_exactly(srv, 2) == b"ok"

    def test_connect_ex_closed_port_is_refused(self, net):
        port = _closed_port(net)
        cli = net.socket()
        assert cli.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
        cli2 = net.socket()
        with pytest.raises(ConnectionRefusedError):
            cli2.connect(("127.0.0.1", port))

    def test_connect_to_closed_listener_is_refused(self, net):
        lst = net.listener()
        addr = lst.getsockname()
        lst.close()
        cli = net.socket()
        # (The port is free now; in the unlikely case that another program
        # took it meanwhile, it would not be listening on it anyway.)
        assert cli.connect_ex(addr) == errno.ECONNREFUSED

    def test_connect_when_connected_is_eisconn(self, net):
        lst = net.listener()
        cli = net.connect(lst.getsockname())
        net.accept(lst)
        with pytest.raises(OSError) as exc:
            cli.connect(lst.getsockname())
        assert exc.value.errno == errno.EISCONN
        assert cli.connect_ex(lst.getsockname()) == errno.EISCONN

    def test_nonblocking_connect(self, net):
        lst = net.listener()
        cli = net.socket()
        cli.setblocking(False)
        assert cli.connect_ex(lst.getsockname()) in (0, errno.EINPROGRESS)
        with Poller("select") as p:
            p.register(cli, read=False, write=True)
            assert p.writable(cli, READY)
        assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert cli.getblocking() is False
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert addr == cli.getsockname()
        srv.sendall(b"hi")
        with Poller("select") as p:
            p.register(cli)
            assert p.readable(cli, READY)
        assert cli.recv(10) == b"hi"

    def test_nonblocking_connect_refused_reports_so_error(self, net):
        port = _closed_port(net)
        cli = net.socket()
        cli.setblocking(False)
        rc = cli.connect_ex(("127.0.0.1", port))
        if rc == errno.EINPROGRESS:
            with Poller("select") as p:
                p.register(cli, read=False, write=True)
                assert p.writable(cli, READY)
            rc = cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert rc == errno.ECONNREFUSED


class AddressTests:
    """bind, listen, accept and the addresses on both sides."""

    def test_bind_and_getsockname(self, net):
        sock = net.socket()
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(OSError) as exc:
            sock.bind(("127.0.0.1", 0))
        assert exc.value.errno == errno.EINVAL

    def test_bind_port_in_use(self, net):
        lst = net.listener()
        other = net.socket()
        with pytest.raises(OSError) as exc:
            other.bind(lst.getsockname())
        assert exc.value.errno == errno.EADDRINUSE

    def test_listen_sets_acceptconn(self, net):
        lst = net.listener()
        assert lst.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        cli = net.connect(lst.getsockname())
        srv, _ = net.accept(lst)
        assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        assert srv.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0

    def test_accept_addresses(self, net):
        lst = net.listener()
        cli = net.connect(lst.getsockname())
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert addr == cli.getsockname() == srv.getpeername()
        assert cli.getpeername() == srv.getsockname() == lst.getsockname()
        assert cli.getsockname()[0] == "127.0.0.1"
        assert cli.getsockname()[1] not in (0, lst.getsockname()[1])

    @needs_ipv6
    def test_accept_addresses_ipv6(self, net):
        lst = net.listener("::1")
        cli = net.connect(lst.getsockname()[:2])
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert len(addr) == 4 and addr[0] == "::1"
        assert addr == cli.getsockname() == srv.getpeername()
        assert cli.getpeername() == srv.getsockname() == lst.getsockname()
        assert srv.family == cli.family == socket.AF_INET6

    @pytest.mark.parametrize("wildcard,loopback", [
        ("0.0.0.0", "127.0.0.1"),
        pytest.param("::", "::1", marks=needs_ipv6),
    ], ids=["ipv4", "ipv6"])
    def test_connect_to_unspecified_address(self, net, wildcard, loopback):
        # connect() to 0.0.0.0 / :: reaches this host; the kernel names the
        # loopback address as the peer.
        lst = net.listener(wildcard)
        port = lst.getsockname()[1]
        cli = net.connect((wildcard, port))
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert cli.getpeername()[:2] == srv.getsockname()[:2] == (loopback, port)
        assert addr == cli.getsockname() == srv.getpeername()
        assert addr[0] == loopback

    @needs_ipv6
    def test_v6only_wildcard_listener_refuses_ipv4_clients(self, net):
        # IPV6_V6ONLY: the kernel keeps IPv4 clients out of a '::' listener;
        # shared memory must not let them in either.  IPv6 clients still come.
        lst = net.listener("::", opts=((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1),))
        port = lst.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            net.connect(("127.0.0.1", port))
        cli = net.connect(("::1", port))
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert addr == cli.getsockname() and addr[0] == "::1"

    @needs_ipv6
    def test_ipv6_client_to_ipv4_listener_via_mapped_address(self, net):
        lst = net.listener("127.0.0.1")
        port = lst.getsockname()[1]
        cli = net.connect(("::ffff:127.0.0.1", port))
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert cli.family == socket.AF_INET6 and srv.family == socket.AF_INET
        assert cli.getpeername() == ("::ffff:127.0.0.1", port, 0, 0)
        assert cli.getsockname() == ("::ffff:127.0.0.1", addr[1], 0, 0)
        assert addr == srv.getpeername() and addr[0] == "127.0.0.1"
        assert srv.getsockname() == ("127.0.0.1", port)
        cli.sendall(b"mapped")
        assert recv_exactly(srv, 6) == b"mapped"

    def test_client_bound_before_connect_keeps_its_address(self, net):
        lst = net.listener()
        cli = net.socket()
        cli.bind(("127.0.0.1", 0))
        bound = cli.getsockname()
        cli.connect(lst.getsockname())
        srv, addr = net.accept(lst)
        net.check_path(cli, srv)
        assert cli.getsockname() == bound == addr == srv.getpeername()

    def test_backlog_of_several_clients(self, net):
        lst = net.listener()
        clients = [net.connect(lst.getsockname()) for _ in range(3)]
        accepted = {}
        for _ in clients:
            srv, addr = net.accept(lst)
            accepted[addr] = srv
        assert set(accepted) == {c.getsockname() for c in clients}
        for i, cli in enumerate(clients):
            cli.sendall(b"client %d" % i)
            srv = accepted[cli.getsockname()]
            net.check_path(cli, srv)
            assert recv_exactly(srv, 8) == b"client %d" % i

    @pytest.mark.parametrize("mode", ["blocking", "timeout", "nonblocking"])
    def test_accepted_socket_is_blocking(self, net, mode):
        lst = net.listener()
        if mode == "timeout":
            lst.settimeout(READY)
        elif mode == "nonblocking":
            lst.setblocking(False)
        cli = net.connect(lst.getsockname())
        with Poller("select") as p:
            p.register(lst)
            assert p.readable(lst, READY)
        srv, _ = net.accept(lst)
        assert srv.gettimeout() is None
        assert srv.getblocking() is True
        cli.sendall(b"x")
        assert srv.recv(1) == b"x"

    def test_accept_timeout_and_nonblocking(self, net):
        lst = net.listener()
        lst.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            lst.accept()
        lst.setblocking(False)
        with pytest.raises(BlockingIOError):
            lst.accept()

    def test_accept_after_close_is_ebadf(self, net):
        lst = net.listener()
        lst.close()
        with pytest.raises(OSError) as exc:
            lst.accept()
        assert exc.value.errno == errno.EBADF

    def test_unconnected_has_no_peer(self, net):
        sock = net.socket()
        with pytest.raises(OSError) as exc:
            sock.getpeername()
        assert exc.value.errno == errno.ENOTCONN
        with pytest.raises(OSError) as exc:
            sock.send(b"x")
        assert exc.value.errno in (errno.EPIPE, errno.ENOTCONN)


class DataTests:
    """send, sendall, sendmsg, recv, recv_into, recvmsg and flags."""

    def test_send_and_partial_recv(self, net):
        cli, srv = net.pair()
        assert cli.send(b"hello") == 5
        first = srv.recv(3)
        assert 1 <= len(first) <= 3 and b"hel".startswith(first)
        assert first + recv_exactly(srv, 5 - len(first)) == b"hello"

    def test_send_empty(self, net):
        cli, srv = net.pair()
        assert cli.send(b"") == 0
        assert cli.sendall(b"") is None
        with pytest.raises(BlockingIOError):
            srv.recv(10, socket.MSG_DONTWAIT)

    def test_send_any_buffer(self, net):
        cli, srv = net.pair()
        arr = array.array("i", [1, 2, 3])
        assert cli.send(bytearray(b"ab")) == 2
        assert cli.send(memoryview(b"xcdx")[1:3]) == 2
        assert cli.send(arr) == arr.itemsize * 3
        cli.sendall(memoryview(arr))
        assert recv_exactly(srv, 4 + 2 * len(arr.tobytes())) == b"abcd" + arr.tobytes() * 2

    def test_sendall_large_with_reader_thread(self, net):
        cli, srv = net.pair()
        data = pattern(8 << 20, seed=1)
        reader = Worker(recv_exactly, srv, len(data))
        assert cli.sendall(data) is None
        assert reader.result() == data

    def test_blocking_send_sends_everything(self, net):
        # Linux TCP: a blocking send() returns once all the data is queued;
        # with a timeout it may return a partial count.
        cli, srv = net.pair()
        data = pattern(4 << 20, seed=8)
        reader = Worker(recv_exactly, srv, 2 * len(data))
        assert cli.send(data) == len(data)
        assert cli.sendmsg([data[:1000], data[1000:]]) == len(data)
        assert reader.result() == data + data
        cli.settimeout(READY)
        reader = Worker(recv_exactly, srv, len(data))
        sent = cli.send(data)
        assert 1 <= sent <= len(data)
        cli.sendall(memoryview(data)[sent:])
        assert reader.result() == data

    def test_sendmsg_gathers(self, net):
        cli, srv = net.pair()
        assert cli.sendmsg([b"ab", bytearray(b"cd"), memoryview(b"efg"), b""]) == 7
        assert recv_exactly(srv, 7) == b"abcdefg"

    def test_recv_into_with_nbytes(self, net):
        cli, srv = net.pair()
        cli.sendall(b"0123456789")
        buf = bytearray(b"\xff" * 16)
        assert srv.recv_into(buf, 4) == 4
        assert buf == b"0123" + b"\xff" * 12
        n = srv.recv_into(memoryview(buf)[4:], 6)
        assert buf[:4 + n] == b"0123456789"[:4 + n]
        rest = recv_exactly(srv, 6 - n)
        assert b"0123" + bytes(buf[4:4 + n]) + rest == b"0123456789"

    def test_recv_into_whole_buffer(self, net):
        cli, srv = net.pair()
        cli.sendall(b"abc")
        buf = bytearray(8)
        n = srv.recv_into(buf)
        assert 1 <= n <= 3 and buf[:n] == b"abc"[:n]

    def test_recv_argument_errors(self, net):
        cli, srv = net.pair()
        with pytest.raises(ValueError):
            srv.recv(-1)
        with pytest.raises(ValueError):
            srv.recv_into(bytearray(4), 10)
        with pytest.raises(ValueError):
            srv.recv_into(bytearray(4), -1)
        with pytest.raises(TypeError):
            cli.send("text is not bytes")
        assert srv.recv(0) == b""

    def test_recvmsg(self, net):
        cli, srv = net.pair()
        cli.sendall(b"message")
        data, ancdata, flags, address = srv.recvmsg(16)
        assert data == b"message"[:len(data)] and data
        assert ancdata == [] and flags == 0 and address is None

    def test_recvmsg_into_scatters(self, net):
        cli, srv = net.pair()
        with pytest.raises(BlockingIOError):
            srv.recvmsg_into([bytearray(4)], 0, socket.MSG_DONTWAIT)
        cli.sendall(b"0123456789")
        a, b, c = bytearray(3), bytearray(4), bytearray(8)
        n, ancdata, flags, address = srv.recvmsg_into([a, bytearray(0), b, c])
        assert ancdata == [] and flags == 0 and address is None
        assert 1 <= n <= 10 and (a + b + c)[:n] == b"0123456789"[:n]
        assert recv_exactly(srv, 10 - n) == b"0123456789"[n:]

    def test_empty_recvmsg_waits_as_a_read(self, net):
        # Unlike recv(0), which CPython answers at once, an empty recvmsg
        # or recvmsg_into goes to the kernel: TCP waits for data or EOF,
        # and consumes nothing.
        cli, srv = net.pair()
        srv.settimeout(QUIET)
        for call in (lambda: srv.recvmsg(0), lambda: srv.recvmsg_into([]),
                     lambda: srv.recvmsg_into([bytearray(0)])):
            with pytest.raises(TimeoutError):
                call()
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.recvmsg_into([])
        srv.setblocking(True)
        assert srv.recv(0) == b"" and srv.recv_into(bytearray(0)) == 0
        cli.sendall(b"x")
        assert srv.recvmsg(0) == (b"", [], 0, None)
        assert srv.recvmsg_into([]) == (0, [], 0, None)
        assert srv.recv(1) == b"x"
        cli.close()
        assert srv.recvmsg_into([]) == (0, [], 0, None)

    def test_recvmsg_into_peek_waitall_and_eof(self, net):
        cli, srv = net.pair()
        reader = Worker(srv.recvmsg_into, [bytearray(3), bytearray(5)], 0, socket.MSG_WAITALL)
        cli.sendall(b"abcd")
        _assert_blocked(reader)
        cli.sendall(b"efghij")
        assert reader.result()[0] == 8
        a, b = bytearray(1), bytearray(1)
        assert srv.recvmsg_into([a, b], 0, socket.MSG_PEEK)[0] == 2 and a + b == b"ij"
        buf = bytearray(10)
        assert srv.recvmsg_into([memoryview(buf)])[0] == 2 and buf[:2] == b"ij"
        cli.shutdown(socket.SHUT_WR)
        assert srv.recvmsg_into([bytearray(4), bytearray(4)]) == (0, [], 0, None)

    def test_recvmsg_into_any_writable_buffer(self, net):
        cli, srv = net.pair()
        cli.sendall(b"\x01\x00\x00\x00\x02\x00\x00\x00")
        arr = array.array("i", [0, 0])
        assert srv.recvmsg_into([arr], 0, socket.MSG_WAITALL)[0] == 8
        assert list(arr) == [1, 2]

    def test_recvfrom(self, net):
        cli, srv = net.pair()
        cli.sendall(b"from")
        data, address = srv.recvfrom(16)
        assert data and b"from".startswith(data) and address is None

    def test_msg_peek_leaves_data(self, net):
        cli, srv = net.pair()
        srv.settimeout(READY)
        peeker = Worker(srv.recv, 4, socket.MSG_PEEK)     # blocks until data
        cli.sendall(b"peekaboo")
        assert peeker.result() == b"peek"
        assert srv.recv(4, socket.MSG_PEEK) == b"peek"
        assert recv_exactly(srv, 8) == b"peekaboo"
        srv.settimeout(None)
        with pytest.raises(BlockingIOError):
            srv.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        cli.shutdown(socket.SHUT_WR)
        assert srv.recv(4, socket.MSG_PEEK) == b""

    def test_msg_peek_across_the_buffer_wrap(self, net):
        tiny = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 4096), (socket.SOL_SOCKET, socket.SO_RCVBUF, 4096))
        cli, srv = net.pair(opts=tiny)
        cli.sendall(b"a" * 4000)
        assert recv_exactly(srv, 4000) == b"a" * 4000
        cli.sendall(b"0123456789" * 20)         # 200 bytes; on shm they wrap at 96
        assert srv.recv(200, socket.MSG_PEEK) == b"0123456789" * 20
        assert recv_exactly(srv, 200) == b"0123456789" * 20

    def test_msg_dontwait(self, net):
        cli, srv = net.pair()
        with pytest.raises(BlockingIOError):
            srv.recv(10, socket.MSG_DONTWAIT)
        buf = bytearray(4)
        with pytest.raises(BlockingIOError):
            srv.recv_into(buf, 4, socket.MSG_DONTWAIT)
        assert srv.gettimeout() is None and srv.getblocking()   # the flag is per call
        cli.sendall(b"x")
        assert srv.recv(1, socket.MSG_PEEK) == b"x"              # (waits for arrival)
        assert srv.recv(10, socket.MSG_DONTWAIT) == b"x"
        # CPython quirk, kept: on a socket with a timeout the call first waits
        # (up to the timeout) for readiness, MSG_DONTWAIT or not.
        srv.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            srv.recv(10, socket.MSG_DONTWAIT)
        cli.sendall(b"y")
        assert srv.recv(10, socket.MSG_DONTWAIT) == b"y"

    def test_msg_waitall_spans_several_sends(self, net):
        cli, srv = net.pair()
        reader = Worker(srv.recv, 12, socket.MSG_WAITALL)
        cli.sendall(b"abcd")
        _assert_blocked(reader)
        cli.sendall(b"efgh")
        _assert_blocked(reader)
        cli.sendall(b"ijklmnop")
        assert reader.result() == b"abcdefghijkl"
        assert recv_exactly(srv, 4) == b"mnop"

    def test_msg_waitall_stops_at_eof(self, net):
        cli, srv = net.pair()
        cli.sendall(b"abc")
        cli.shutdown(socket.SHUT_WR)
        assert srv.recv(10, socket.MSG_WAITALL) == b"abc"
        assert srv.recv(10, socket.MSG_WAITALL) == b""

    def test_recv_into_msg_waitall(self, net):
        cli, srv = net.pair()
        buf = bytearray(10)
        reader = Worker(srv.recv_into, buf, 8, socket.MSG_WAITALL)
        cli.sendall(b"1234")
        _assert_blocked(reader)
        cli.sendall(b"56789")
        assert reader.result() == 8
        assert buf == b"12345678\0\0"


class FileTests:
    """makefile and sendfile."""

    def test_makefile_binary(self, net):
        cli, srv = net.pair()
        wf = cli.makefile("wb")
        rf = srv.makefile("rb")
        try:
            wf.write(b"line one\nline two\ntail")
            wf.flush()
            assert rf.readline() == b"line one\n"
            assert rf.readline() == b"line two\n"
            assert rf.read(4) == b"tail"
            wf.close()
            cli.close()
            assert rf.read() == b""
        finally:
            wf.close()
            rf.close()

    def test_makefile_text(self, net):
        cli, srv = net.pair()
        wf = cli.makefile("w", encoding="utf-8", newline="")
        rf = srv.makefile("r", encoding="utf-8", newline="")
        try:
            wf.write("héllo\nwörld\nlast")
            wf.flush()
            cli.shutdown(socket.SHUT_WR)
            assert rf.readline() == "héllo\n"
            assert list(rf) == ["wörld\n", "last"]
        finally:
            wf.close()
            rf.close()

    def test_makefile_readwrite_both_ways(self, net):
        cli, srv = net.pair()
        cf = cli.makefile("rwb")
        sf = srv.makefile("rwb")
        try:
            cf.write(b"GET /\n")
            cf.flush()
            assert sf.readline() == b"GET /\n"
            sf.write(b"200 OK\n")
            sf.flush()
            assert cf.readline() == b"200 OK\n"
        finally:
            cf.close()
            sf.close()

    def test_makefile_keeps_connection_after_socket_close(self, net):
        cli, srv = net.pair()
        rf = srv.makefile("rb")
        try:
            srv.close()                         # the file still references the socket
            cli.sendall(b"still here\n")
            assert rf.readline() == b"still here\n"
            with pytest.raises(BlockingIOError):
                cli.recv(1, socket.MSG_DONTWAIT)   # the peer did not see EOF
        finally:
            rf.close()                          # the last reference: now it closes
        cli.settimeout(READY)
        assert cli.recv(10) == b""

    def test_sendfile_offset_and_count(self, net, tmp_path):
        cli, srv = net.pair()
        data = pattern(1 << 20, seed=2)
        path = tmp_path / "payload.bin"
        path.write_bytes(data)
        with open(path, "rb") as f:
            reader = Worker(recv_exactly, srv, 300_000)
            assert cli.sendfile(f, offset=1000, count=300_000) == 300_000
            assert reader.result() == data[1000:301_000]
            assert f.tell() == 301_000
            f.seek(0)
            reader = Worker(recv_exactly, srv, len(data))
            assert cli.sendfile(f) == len(data)
            assert reader.result() == data
            assert f.tell() == len(data)
            # count past the end: sends what there is
            reader = Worker(recv_exactly, srv, 10)
            assert cli.sendfile(f, offset=len(data) - 10, count=1000) == 10
            assert reader.result() == data[-10:]

    def test_sendfile_requires_binary_file(self, net, tmp_path):
        cli, _ = net.pair()
        path = tmp_path / "text.txt"
        path.write_text("text")
        with open(path, "r") as f:
            with pytest.raises(ValueError):
                cli.sendfile(f)


class ShutdownCloseTests:
    """shutdown, close, and use after close."""

    def test_shut_wr_half_close(self, net):
        cli, srv = net.pair()
        cli.sendall(b"request")
        cli.shutdown(socket.SHUT_WR)
        srv.settimeout(READY)
        assert recv_until_eof(srv) == b"request"
        with pytest.raises(BrokenPipeError):
            cli.send(b"more")
        srv.sendall(b"response")                # the other direction still works
        srv.close()
        cli.settimeout(READY)
        assert recv_until_eof(cli) == b"response"

    def test_shut_rd(self, net):
        cli, srv = net.pair()
        srv.shutdown(socket.SHUT_RD)
        srv.settimeout(READY)
        got, took = elapsed(lambda: srv.recv(10))
        assert got == b"" and took < READY / 2          # EOF at once, no wait
        srv.sendall(b"out")                             # still writable
        assert recv_exactly(cli, 3) == b"out"
        with Poller("select") as p:
            p.register(srv)
            assert p.readable(srv, 0)

    def test_peer_may_still_send_after_shut_rd(self, net):
        # Linux TCP keeps accepting data after SHUT_RD, and recv returns it
        # (never waiting: b"" when there is none).
        cli, srv = net.pair()
        srv.shutdown(socket.SHUT_RD)
        cli.sendall(b"later")
        got = []
        wait_for(lambda: got.append(srv.recv(10)) or b"".join(got) == b"later",
                 timeout=READY, what="the data sent after SHUT_RD")
        assert srv.recv(10) == b""

    def test_shut_rdwr(self, net):
        cli, srv = net.pair()
        cli.shutdown(socket.SHUT_RDWR)
        srv.settimeout(READY)
        assert srv.recv(10) == b""
        with pytest.raises(BrokenPipeError):
            cli.send(b"x")
        assert cli.recv(10) == b""

    @pytest.mark.parametrize("how", ["SHUT_RD", "SHUT_RDWR"])
    def test_shutdown_wakes_blocked_recv(self, net, how):
        cli, srv = net.pair()
        srv.settimeout(READY * 2)
        reader = Worker(srv.recv, 10)
        _assert_blocked(reader)
        srv.shutdown(getattr(socket, how))
        assert reader.result(READY) == b""

    def test_shutdown_argument_and_state_errors(self, net):
        cli, srv = net.pair()
        with pytest.raises(OSError) as exc:
            cli.shutdown(7)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            net.socket().shutdown(socket.SHUT_RDWR)
        assert exc.value.errno == errno.ENOTCONN

    def test_unaccepted_connection_when_listener_closes(self, net):
        lst = net.listener()
        cli = net.connect(lst.getsockname())
        lst.close()
        cli.settimeout(READY)
        try:
            assert cli.recv(10) == b""
        except ConnectionResetError:
            pass
        assert isinstance(_send_until_error(cli), PEER_GONE_ERRORS)

    def test_close_peer_reads_all_then_eof(self, net):
        cli, srv = net.pair()
        data = pattern(1 << 20, seed=3)
        reader = Worker(recv_until_eof, srv)
        cli.sendall(data)
        cli.close()
        assert reader.result() == data

    def test_socket_collected_without_close_peer_reads_eof(self, net):
        """A socket dropped without close() is closed when collected (with
        a ResourceWarning): its peer reads what was sent, then EOF."""
        import gc
        import warnings
        cli, srv = net.pair()
        cli.sendall(b"last words")
        net._socks.remove(cli)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del cli
            gc.collect()
        srv.settimeout(READY)
        assert recv_until_eof(srv) == b"last words"

    def test_close_wakes_peer_blocked_recv(self, net):
        cli, srv = net.pair()
        srv.settimeout(READY * 2)
        reader = Worker(srv.recv, 10)
        _assert_blocked(reader)
        cli.close()
        assert reader.result(READY) == b""

    def test_send_to_closed_peer_fails(self, net):
        cli, srv = net.pair()
        srv.close()
        assert isinstance(_send_until_error(cli), PEER_GONE_ERRORS)
        try:
            assert cli.recv(10) == b""
        except ConnectionResetError:
            pass

    def test_use_after_close_is_ebadf(self, net):
        cli, srv = net.pair()
        cli.close()
        cli.close()                             # idempotent
        assert cli.fileno() == -1
        buf = bytearray(4)
        calls = [
            lambda: cli.send(b"x"), lambda: cli.sendall(b"x"), lambda: cli.sendmsg([b"x"]),
            lambda: cli.recv(1), lambda: cli.recv_into(buf), lambda: cli.recvmsg(1),
            lambda: cli.getpeername(), lambda: cli.getsockname(),
            lambda: cli.shutdown(socket.SHUT_RDWR),
            lambda: cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
            lambda: cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
            lambda: cli.connect(("127.0.0.1", 1)),
        ]
        for call in calls:
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EBADF, exc.value
        srv.settimeout(READY)
        assert srv.recv(1) == b""


class DescriptorTests:
    """fileno, detach, dup, fromfd, isinstance, context manager."""

    def test_fileno(self, net):
        cli, srv = net.pair()
        fd = cli.fileno()
        assert isinstance(fd, int) and fd >= 0 and cli.fileno() == fd
        assert srv.fileno() not in (fd, -1)
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)
        cli.close()
        assert cli.fileno() == -1

    def test_detach_and_adopt(self, net):
        cli, srv = net.pair()
        peer = cli.getpeername()
        fd = cli.detach()
        assert fd >= 0 and cli.fileno() == -1
        cli.close()                             # does nothing to the fd any more
        again = net.track(socket.socket(fileno=fd))
        net.check_path(again)
        assert again.fileno() == fd
        assert again.getpeername() == peer
        again.sendall(b"adopted")
        assert recv_exactly(srv, 7) == b"adopted"
        srv.sendall(b"back")
        assert recv_exactly(again, 4) == b"back"
        again.close()
        srv.settimeout(READY)
        assert srv.recv(1) == b""

    def test_dup(self, net):
        cli, srv = net.pair()
        dup = net.track(cli.dup())
        net.check_path(dup)
        assert dup.fileno() not in (-1, cli.fileno())
        assert dup.getpeername() == cli.getpeername() and dup.getsockname() == cli.getsockname()
        dup.sendall(b"via dup;")
        cli.sendall(b"via orig;")
        assert recv_exactly(srv, 17) == b"via dup;via orig;"
        cli.close()                             # the dup keeps the connection
        with pytest.raises(BlockingIOError):
            srv.recv(1, socket.MSG_DONTWAIT)    # no EOF
        dup.sendall(b"after")
        assert recv_exactly(srv, 5) == b"after"
        srv.sendall(b"reply")
        assert recv_exactly(dup, 5) == b"reply"
        dup.close()
        srv.settimeout(READY)
        assert srv.recv(1) == b""

    def test_fromfd(self, net):
        cli, srv = net.pair()
        other = net.track(socket.fromfd(cli.fileno(), socket.AF_INET, socket.SOCK_STREAM))
        assert isinstance(other, socket.socket)
        net.check_path(other)
        assert other.fileno() != cli.fileno()
        cli.close()
        other.sendall(b"fromfd")
        assert recv_exactly(srv, 6) == b"fromfd"
        srv.sendall(b"ok")
        assert recv_exactly(other, 2) == b"ok"

    def test_socket_of_os_dup_fd(self, net):
        cli, srv = net.pair()
        other = net.track(socket.socket(fileno=os.dup(srv.fileno())))
        assert other.family == socket.AF_INET and other.type == socket.SOCK_STREAM
        net.check_path(other)
        srv.close()
        cli.sendall(b"to the copy")
        assert recv_exactly(other, 11) == b"to the copy"

    def test_isinstance_and_attributes(self, net):
        lst = net.listener()
        cli = net.connect(lst.getsockname())
        srv, _ = net.accept(lst)
        for sock in (lst, cli, srv):
            assert isinstance(sock, socket.socket)
            assert isinstance(sock, StdSocket)
            assert sock.family == socket.AF_INET
            assert sock.type == socket.SOCK_STREAM
            assert sock.proto in (0, socket.IPPROTO_TCP)
        assert f"laddr={cli.getsockname()}" in repr(cli)
        assert f"raddr={cli.getpeername()}" in repr(cli)

    def test_context_manager(self, net):
        cli, srv = net.pair()
        with cli as entered:
            assert entered is cli
            cli.sendall(b"in with")
        assert cli.fileno() == -1
        srv.settimeout(READY)
        assert recv_until_eof(srv) == b"in with"
        with net.listener() as lst:
            port = lst.getsockname()[1]
        assert lst.fileno() == -1
        assert net.socket().connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


class TimeoutTests:
    """settimeout, setblocking, socket.setdefaulttimeout."""

    def test_recv_timeout(self, net):
        cli, srv = net.pair()
        srv.settimeout(0.05)
        assert srv.gettimeout() == 0.05 and srv.getblocking() is True
        with pytest.raises(TimeoutError) as exc:
            srv.recv(10)
        assert isinstance(exc.value, socket.timeout)
        _, took = elapsed(lambda: pytest.raises(TimeoutError, srv.recv_into, bytearray(4)))
        assert 0.04 <= took < READY
        cli.sendall(b"late")
        assert recv_exactly(srv, 4) == b"late"         # the connection survives a timeout

    def test_nonblocking(self, net):
        cli, srv = net.pair()
        srv.setblocking(False)
        assert srv.gettimeout() == 0.0 and srv.getblocking() is False
        with pytest.raises(BlockingIOError):
            srv.recv(10)
        with pytest.raises(BlockingIOError):
            srv.recv_into(bytearray(4))
        cli.sendall(b"x")
        with Poller("select") as p:
            p.register(srv)
            assert p.readable(srv, READY)
        assert srv.recv(10) == b"x"
        srv.setblocking(True)
        assert srv.gettimeout() is None and srv.getblocking() is True
        cli.sendall(b"y")
        assert srv.recv(10) == b"y"

    def test_settimeout_values(self, net):
        sock = net.socket()
        assert sock.gettimeout() is None
        sock.settimeout(0)
        assert sock.gettimeout() == 0.0 and not sock.getblocking()
        sock.settimeout(None)
        assert sock.gettimeout() is None and sock.getblocking()
        with pytest.raises(ValueError):
            sock.settimeout(-1)
        with pytest.raises(TypeError):
            sock.settimeout("1")

    def test_setdefaulttimeout(self, net):
        lst = net.listener()
        socket.setdefaulttimeout(0.05)
        try:
            cli = net.connect(lst.getsockname())
            srv, _ = net.accept(lst)
        finally:
            socket.setdefaulttimeout(None)
        net.check_path(cli, srv)
        assert cli.gettimeout() == 0.05 and srv.gettimeout() == 0.05
        with pytest.raises(TimeoutError):
            srv.recv(10)
        with pytest.raises(TimeoutError):
            cli.recv(10)
        assert net.socket().gettimeout() is None

    def test_send_on_full_buffer_times_out_or_would_block(self, net):
        cli, srv = net.pair(opts=SMALL_BUFS)
        with Poller("select") as p:
            sent = _fill(cli, p)
        with pytest.raises(BlockingIOError):
            cli.send(b"z" * 65536)
        cli.setblocking(True)
        with pytest.raises(BlockingIOError):
            cli.send(b"z" * 65536, socket.MSG_DONTWAIT)
        cli.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            cli.send(b"z" * 65536)
        with pytest.raises(TimeoutError):
            cli.sendall(b"z" * 65536)
        # (sendall may have put part of its data in; the stream goes on.)
        cli.shutdown(socket.SHUT_WR)
        srv.settimeout(READY)
        assert len(recv_until_eof(srv)) >= sent


class SockoptTests:
    """getsockopt / setsockopt."""

    @pytest.mark.parametrize("level,name", [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    ], ids=["TCP_NODELAY", "SO_KEEPALIVE", "SO_REUSEADDR"])
    def test_flag_roundtrip(self, net, level, name):
        cli, srv = net.pair()
        for sock in (cli, srv):
            for value in (1, 0, 1):
                sock.setsockopt(level, name, value)
                assert bool(sock.getsockopt(level, name)) == bool(value)
            sock.setsockopt(level, name, struct.pack("i", 0))
            assert not sock.getsockopt(level, name)
            assert struct.unpack("i", sock.getsockopt(level, name, 4))[0] == 0

    def test_struct_option_so_linger(self, net):
        cli, srv = net.pair()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
        assert struct.unpack("ii", cli.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 5)
        assert cli.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER) == 1     # l_onoff
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.sendall(b"abortive")
        cli.close()                                # linger 0: TCP resets
        srv.settimeout(READY)
        try:
            data = recv_until_eof(srv)
        except ConnectionResetError:
            data = b""
        assert b"abortive".startswith(data)

    def test_unset_struct_options_have_their_size(self, net):
        cli, srv = net.pair()
        for sock in (cli, srv):
            assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (0, 0)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
            assert struct.unpack("ll", raw) == (0, 0)

    def test_buffer_sizes_and_fixed_values(self, net):
        cli, srv = net.pair()
        for sock in (cli, srv):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE, 4)
            assert isinstance(raw, bytes) and struct.unpack("i", raw)[0] == socket.SOCK_STREAM
            if hasattr(socket, "SO_DOMAIN"):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET
            if hasattr(socket, "SO_PROTOCOL"):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP

    def test_buffer_sizes_set_before_connect(self, net):
        cli, srv = net.pair(opts=SMALL_BUFS)
        assert 0 < cli.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 1 << 20
        data = pattern(1 << 20, seed=4)          # far more than the buffers: still all arrives
        reader = Worker(recv_exactly, srv, len(data))
        cli.sendall(data)
        assert reader.result() == data


class FactoryTests:
    """socket.create_connection, socket.create_server (module globals)."""

    def _roundtrip(self, net, cli, srv):
        net.check_path(cli, srv)
        cli.sendall(b"to server")
        assert recv_exactly(srv, 9) == b"to server"
        srv.sendall(b"to client")
        assert recv_exactly(cli, 9) == b"to client"

    def test_create_connection_and_server(self, net):
        lst = net.create_server(("127.0.0.1", 0))
        cli = net.track(socket.create_connection(lst.getsockname(), timeout=READY))
        srv, addr = net.accept(lst)
        assert cli.gettimeout() == READY
        assert addr == cli.getsockname()
        self._roundtrip(net, cli, srv)

    def test_create_connection_by_name_and_source_address(self, net):
        lst = net.create_server(("127.0.0.1", 0))
        port = lst.getsockname()[1]
        cli = net.track(socket.create_connection(("localhost", port), timeout=READY,
                                                 source_address=("127.0.0.1", 0)))
        srv, addr = net.accept(lst)
        assert addr == cli.getsockname() and addr[0] == "127.0.0.1"
        self._roundtrip(net, cli, srv)

    def test_create_connection_refused(self, net):
        port = _closed_port(net)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=READY)

    @pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
    def test_create_server_reuse_port(self, net):
        first = net.create_server(("127.0.0.1", 0), reuse_port=True)
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        second = net.create_server(first.getsockname(), reuse_port=True)
        assert second.getsockname() == first.getsockname()
        clients = [net.track(socket.create_connection(first.getsockname(), timeout=READY))
                   for _ in range(4)]
        accepted = {}
        with selectors.DefaultSelector() as sel:
            sel.register(first, selectors.EVENT_READ)
            sel.register(second, selectors.EVENT_READ)
            deadline = time.monotonic() + READY
            while len(accepted) < len(clients):
                assert time.monotonic() < deadline, f"accepted only {len(accepted)}"
                for key, _ in sel.select(READY):
                    key.fileobj.setblocking(False)
                    try:
                        srv, addr = net.accept(key.fileobj)
                    except BlockingIOError:
                        continue
                    srv.setblocking(True)
                    accepted[addr] = srv
        assert set(accepted) == {c.getsockname() for c in clients}
        for cli in clients:
            self._roundtrip(net, cli, accepted[cli.getsockname()])

    @needs_ipv6
    def test_create_server_ipv6_only(self, net):
        lst = net.create_server(("::1", 0), family=socket.AF_INET6, dualstack_ipv6=False)
        host, port = lst.getsockname()[:2]
        assert host == "::1"
        cli = net.track(socket.create_connection(("::1", port), timeout=READY))
        srv, addr = net.accept(lst)
        assert cli.family == srv.family == socket.AF_INET6
        assert addr[0] == "::1" and addr == cli.getsockname() == srv.getpeername()
        assert srv.getsockname() == cli.getpeername() == lst.getsockname()
        self._roundtrip(net, cli, srv)
        # Not dual-stack: IPv4 to the same port is refused.  (The holder,
        # bound but not listening, keeps any other program off that port.)
        holder = net.socket()
        holder.bind(("127.0.0.1", port))
        assert net.socket().connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED

    def test_create_server_wildcard(self, net):
        lst = net.create_server(("", 0))
        host, port = lst.getsockname()
        assert host == "0.0.0.0"
        cli = net.track(socket.create_connection(("127.0.0.1", port), timeout=READY))
        srv, addr = net.accept(lst)
        assert addr == cli.getsockname()
        assert srv.getsockname() == cli.getpeername() == ("127.0.0.1", port)
        self._roundtrip(net, cli, srv)

    @pytest.mark.skipif(not (socket.has_dualstack_ipv6() and has_ipv6_loopback()),
                        reason="no dual-stack IPv6")
    def test_create_server_dualstack_ipv4_client(self, net):
        lst = net.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        port = lst.getsockname()[1]
        cli = net.track(socket.create_connection(("127.0.0.1", port), timeout=READY))
        srv, addr = net.accept(lst)
        assert cli.family == socket.AF_INET and srv.family == socket.AF_INET6
        assert addr == ("::ffff:127.0.0.1", cli.getsockname()[1], 0, 0) == srv.getpeername()
        assert srv.getsockname() == ("::ffff:127.0.0.1", port, 0, 0)
        assert cli.getpeername() == ("127.0.0.1", port)
        self._roundtrip(net, cli, srv)


class PollerTests:
    """Readiness through select.select / poll / epoll and the selectors."""

    @pytest.mark.parametrize("poller", ALL_POLLERS)
    def test_readable_is_level_triggered(self, net, poller):
        cli, srv = net.pair()
        with Poller(poller) as p:
            p.register(srv)
            assert not p.readable(srv, 0)
            cli.sendall(b"0123456789")
            assert p.readable(srv, READY)
            assert p.readable(srv, 0)               # nothing read: still readable
            assert srv.recv(4) == b"0123"
            assert p.readable(srv, READY)           # some left: still readable
            assert recv_exactly(srv, 6) == b"456789"
            got, took = elapsed(lambda: p.poll(QUIET))
            assert got == {} and took >= QUIET * 0.8

    @pytest.mark.parametrize("poller", POLLERS)
    def test_readable_at_eof(self, net, poller):
        cli, srv = net.pair()
        with Poller(poller) as p:
            p.register(srv)
            cli.sendall(b"last")
            cli.shutdown(socket.SHUT_WR)
            assert p.readable(srv, READY)
            assert recv_exactly(srv, 4) == b"last"
            assert p.readable(srv, READY)           # EOF is readable ...
            assert srv.recv(10) == b""
            assert p.readable(srv, 0)               # ... and stays readable

    @pytest.mark.parametrize("poller", POLLERS)
    def test_readable_when_peer_closed(self, net, poller):
        cli, srv = net.pair()
        with Poller(poller) as p:
            p.register(srv, read=True, write=True)
            cli.close()
            # readable (EOF) and, until something is sent, writable
            assert wait_for(lambda: p.poll(READY).get(srv) == (True, True), timeout=READY,
                            what="readable and writable after the peer closed")
            srv.setblocking(False)
            assert srv.recv(10) == b""

    @pytest.mark.parametrize("poller", ALL_POLLERS)
    def test_not_readable_when_empty(self, net, poller):
        cli, srv = net.pair()
        with Poller(poller) as p:
            p.register(srv)
            p.register(cli)
            got, took = elapsed(lambda: p.poll(QUIET))
            assert got == {}
            assert took >= QUIET * 0.8              # the timeout was honoured
            got, took = elapsed(lambda: p.poll(0))
            assert got == {} and took < READY / 2

    @pytest.mark.parametrize("poller", POLLERS)
    def test_writable_when_room(self, net, poller):
        cli, srv = net.pair()
        with Poller(poller) as p:
            p.register(cli, read=True, write=True)
            assert p.poll(READY).get(cli) == (False, True)
            srv.sendall(b"x")
            assert wait_for(lambda: p.poll(READY).get(cli) == (True, True), timeout=READY,
                            what="readable and writable")

    @pytest.mark.parametrize("poller", ALL_POLLERS)
    def test_full_buffer_not_writable_until_drained(self, net, poller):
        cli, srv = net.pair(opts=SMALL_BUFS)
        with Poller(poller) as p:
            sent = _fill(cli, p)
            assert not p.writable(cli, QUIET)
            received = [0]

            def drained_and_writable():
                received[0] += _drain(srv)
                return p.writable(cli, 0.01)
            wait_for(drained_and_writable, timeout=READY, what="writable after the reader drained")
        cli.shutdown(socket.SHUT_WR)
        srv.settimeout(READY)
        assert received[0] + len(recv_until_eof(srv)) == sent

    @pytest.mark.parametrize("poller", POLLERS)
    def test_blocked_writer_not_writable_until_reader_drains(self, net, poller):
        cli, srv = net.pair(opts=SMALL_BUFS)
        data = pattern(1 << 20, seed=5)
        writer = Worker(cli.sendall, data)
        _assert_blocked(writer)
        with Poller(poller) as p:
            p.register(cli, read=False, write=True)
            # Kernel TCP may say writable for a moment while the blocked
            # writer is being woken to fill what ACKs freed (seen on a busy
            # host): once the buffers settle, it is not.
            wait_for(lambda: not p.writable(cli, QUIET), timeout=READY,
                     what="not writable while the writer is blocked")
            assert recv_exactly(srv, len(data)) == data
            writer.result()
            assert p.writable(cli, READY)

    @pytest.mark.parametrize("poller", POLLERS)
    def test_nonblocking_recv_after_readable_never_raises(self, net, poller):
        cli, srv = net.pair()
        count, msg = 300, b"message"
        sender = Worker(lambda: [cli.sendall(msg) for _ in range(count)] and cli.shutdown(socket.SHUT_WR))
        srv.setblocking(False)
        got = 0
        with Poller(poller) as p:
            p.register(srv)
            while True:
                assert p.readable(srv, READY)
                data = srv.recv(4096)                 # must not raise BlockingIOError
                if not data:
                    break
                got += len(data)
        sender.result()
        assert got == count * len(msg)

    @pytest.mark.parametrize("poller", POLLERS)
    def test_mixed_with_kernel_fd(self, net, poller):
        cli, srv = net.pair()
        rfd, wfd = os.pipe()
        pipe = open(rfd, "rb", buffering=0)
        try:
            with Poller(poller) as p:
                p.register(srv)
                p.register(pipe)
                os.write(wfd, b"p")
                assert p.poll(READY) == {pipe: (True, False)}
                cli.sendall(b"s")
                assert wait_for(lambda: p.poll(READY) == {pipe: (True, False), srv: (True, False)},
                                timeout=READY, what="both readable")
                assert pipe.read(1) == b"p"
                assert p.poll(READY) == {srv: (True, False)}
                assert srv.recv(1) == b"s"
                assert p.poll(QUIET) == {}
        finally:
            pipe.close()
            os.close(wfd)

    @pytest.mark.parametrize("poller", ALL_POLLERS)
    @pytest.mark.parametrize("make", ["listen", "create_server"])
    def test_listener_readiness(self, net, poller, make):
        # (tcp_fallback + create_server: a shrimpio listener that is already
        # listening when the rule sends its clients over TCP.)
        lst = net.listener() if make == "listen" else net.create_server(("127.0.0.1", 0))
        with Poller(poller) as p:
            p.register(lst)
            assert not p.readable(lst, QUIET)
            waiter = Worker(p.readable, lst, READY)
            cli = net.connect(lst.getsockname())
            _, took = elapsed(lambda: waiter.result())
            assert waiter.value is True and took < READY / 2    # woken, not timed out
            srv, _ = net.accept(lst)
            net.check_path(cli, srv)
            assert not p.readable(lst, QUIET)


class PollerApiTests:
    """Registration semantics of the poller objects themselves."""

    @pytest.mark.parametrize("api", ["poll", "epoll"])
    def test_hangup_bit_only_when_both_directions_are_done(self, net, api):
        # Linux TCP: the peer's close gives POLLIN (end of stream), not
        # POLLHUP; POLLHUP comes once our side has shut writing too.  (Poll
        # loops that drop a connection on POLLHUP before reading rely on it.)
        if api == "poll":
            p, IN, OUT, HUP = select.poll(), select.POLLIN, select.POLLOUT, select.POLLHUP
            timeout = READY * 1000
        else:
            p, IN, OUT, HUP = select.epoll(), select.EPOLLIN, select.EPOLLOUT, select.EPOLLHUP
            timeout = READY
        try:
            cli, srv = net.pair()
            p.register(srv, IN)
            cli.sendall(b"last words")
            cli.close()
            [(_, ev)] = p.poll(timeout)
            assert ev & IN and not ev & HUP
            assert recv_until_eof(srv) == b"last words"
            srv.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: any(e & HUP for _, e in p.poll(timeout)), timeout=READY,
                            what="POLLHUP once both directions are done")
            cli2, srv2 = net.pair()
            p.register(srv2, IN | OUT)
            events = dict(p.poll(timeout))
            assert events[srv2.fileno()] == OUT
            srv2.shutdown(socket.SHUT_RDWR)
            assert wait_for(lambda: dict(p.poll(timeout)).get(srv2.fileno(), 0) & (IN | HUP) == IN | HUP,
                            timeout=READY, what="POLLIN|POLLHUP after our own SHUT_RDWR")
        finally:
            if api == "epoll":
                p.close()

    def test_poll_registration(self, net):
        cli, srv = net.pair()
        p = select.poll()
        p.register(srv, select.POLLIN)
        with pytest.raises(FileNotFoundError):
            p.modify(cli, select.POLLIN)
        p.modify(srv, select.POLLIN | select.POLLOUT)
        events = dict(p.poll(READY * 1000))
        assert events[srv.fileno()] & select.POLLOUT and not events[srv.fileno()] & select.POLLIN
        p.unregister(srv)
        with pytest.raises(KeyError):
            p.unregister(srv)
        assert p.poll(0) == []

    def test_epoll_registration(self, net):
        cli, srv = net.pair()
        with select.epoll() as ep:
            ep.register(srv, select.EPOLLIN)
            with pytest.raises(FileExistsError):
                ep.register(srv, select.EPOLLIN)
            with pytest.raises(FileNotFoundError):
                ep.modify(cli, select.EPOLLIN)
            assert ep.poll(0) == []
            ep.modify(srv, select.EPOLLOUT)
            assert ep.poll(READY) == [(srv.fileno(), select.EPOLLOUT)]
            ep.register(cli, select.EPOLLOUT)
            assert len(ep.poll(READY, maxevents=1)) == 1
            assert sorted(fd for fd, _ in ep.poll(READY)) == sorted([cli.fileno(), srv.fileno()])
            ep.unregister(srv)
            with pytest.raises(FileNotFoundError):
                ep.unregister(srv)
            assert ep.poll(READY) == [(cli.fileno(), select.EPOLLOUT)]
        assert ep.closed
        with pytest.raises(ValueError):
            ep.poll(0)

    def test_selector_keys(self, net):
        cli, srv = net.pair()
        with selectors.DefaultSelector() as sel:
            key = sel.register(srv, selectors.EVENT_READ, data="srv")
            assert sel.get_key(srv) is key and key.data == "srv"
            with pytest.raises(KeyError):
                sel.register(srv, selectors.EVENT_READ)
            assert sel.select(0) == []
            cli.sendall(b"x")
            [(got, ev)] = sel.select(READY)
            assert got.fileobj is srv and got.data == "srv" and ev == selectors.EVENT_READ
            sel.modify(srv, selectors.EVENT_WRITE, data="w")
            [(got, ev)] = sel.select(READY)
            assert ev == selectors.EVENT_WRITE and got.data == "w"
            sel.unregister(srv)
            assert sel.select(0) == []

    def test_select_same_socket_read_and_write(self, net):
        cli, srv = net.pair()
        cli.sendall(b"x")
        assert srv.recv(1, socket.MSG_PEEK) == b"x"
        r, w, x = select.select([srv], [srv], [srv], READY)
        assert r == [srv] and w == [srv] and x == []
        r, w, x = select.select([srv.fileno()], [], [], READY)
        assert r == [srv.fileno()]
        with pytest.raises(ValueError):
            select.select([-1], [], [], 0)

    def test_poller_argument_errors_are_the_stdlib_s(self, net):
        from shrimpio._poll import _real_epoll, _real_select

        def outcome(fn):
            try:
                fn()
            except Exception as exc:             # noqa: BLE001 - that is what is compared
                return type(exc), str(exc)
            return None

        cases = [
            ("epoll maxevents 0", lambda ep, s, sel: ep.poll(0, 0)),
            ("epoll maxevents -2", lambda ep, s, sel: ep.poll(0, -2)),
            ("epoll str timeout", lambda ep, s, sel: ep.poll("1")),
            ("epoll str mask", lambda ep, s, sel: ep.register(s, "x")),
            ("select str timeout", lambda ep, s, sel: sel([s], [], [], "1")),
            ("select negative timeout", lambda ep, s, sel: sel([s], [], [], -1)),
        ]
        std_cli, std_srv = _std_pair()
        cli, srv = net.pair()
        std_ep, ep = _real_epoll(), select.epoll()
        try:
            for name, fn in cases:
                want = outcome(lambda: fn(std_ep, std_srv, _real_select))
                assert want is not None, name
                assert outcome(lambda: fn(ep, srv, select.select)) == want, name
        finally:
            std_ep.close()
            ep.close()
            std_cli.close()
            std_srv.close()

    def test_select_refuses_an_fd_beyond_its_set_size(self, net):
        # select() takes fds below FD_SETSIZE (1024) only, whatever they
        # are; programs fall back to poll() on this ValueError.
        import resource
        cli, srv = net.pair()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 1100:
            pytest.skip("needs an fd number above 1024")
        if soft != resource.RLIM_INFINITY and soft <= 1100:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
        try:
            high = type(srv)(fileno=os.dup2(srv.fileno(), 1100))   # the same connection
            try:
                with pytest.raises(ValueError, match="out of range"):
                    select.select([high], [], [], 0)
                with pytest.raises(ValueError, match="out of range"):
                    select.select([], [high.fileno()], [], 0)
            finally:
                high.close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class ThreadTests:
    """Threads: full duplex on one socket, many connections at once."""

    def test_full_duplex_one_socket_two_threads(self, net):
        cli, srv = net.pair()
        up, down = pattern(2 << 20, seed=6), pattern(2 << 20, seed=7)
        workers = [
            Worker(cli.sendall, up), Worker(recv_exactly, srv, len(up)),
            Worker(srv.sendall, down), Worker(recv_exactly, cli, len(down)),
        ]
        assert workers[1].result() == up
        assert workers[3].result() == down
        workers[0].result()
        workers[2].result()

    def test_many_connections_in_threads(self, net):
        lst = net.listener(backlog=64)
        nconn, size = 8, 128 << 10

        def serve():
            echoes = []
            for _ in range(nconn):
                srv, _ = net.accept(lst)
                net.check_path(srv)
                echoes.append(Worker(lambda s=srv: [s.sendall(d) for d in iter(lambda: s.recv(65536), b"")]
                                     and s.shutdown(socket.SHUT_WR)))
            for e in echoes:
                e.result()

        def client(i):
            cli = net.connect(lst.getsockname())
            net.check_path(cli)
            data = pattern(size, seed=100 + i)
            cli.sendall(data)
            cli.shutdown(socket.SHUT_WR)
            return recv_until_eof(cli) == data

        server = Worker(serve)
        clients = [Worker(client, i) for i in range(nconn)]
        assert [c.result() for c in clients] == [True] * nconn
        server.result()


class ProcessTests:
    """fork, and a peer process that dies."""

    def test_forked_child_keeps_using_inherited_connection(self, net):
        cli, srv = net.pair()

        def child():
            srv.close()                         # the child's copy of the other end
            cli.settimeout(READY)
            cli.sendall(b"hello from child")
            if select.select([cli], [], [], READY)[0] != [cli]:
                return 3
            if recv_exactly(cli, 5) != b"reply":
                return 2
            cli.sendall(b"bye")
            cli.close()
            return 0

        pid = net.fork(child)
        cli.close()                             # the parent's copy: the child's stays open
        srv.settimeout(READY)
        assert recv_exactly(srv, 16) == b"hello from child"
        srv.sendall(b"reply")
        assert recv_until_eof(srv) == b"bye"    # EOF once the last holder closed
        status = net.reap(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

    def test_parent_close_does_not_close_for_child(self, net):
        cli, srv = net.pair()
        pid = net.fork(lambda: signal.pause())   # holds copies of both ends, does nothing
        srv.close()                              # the child still holds the server end
        with pytest.raises(BlockingIOError):
            cli.recv(1, socket.MSG_DONTWAIT)      # no EOF: the connection is open
        cli.sendall(b"to a sleeping child")
        status = net.kill(pid)                   # the last holder of the server end dies
        assert os.WIFSIGNALED(status)
        cli.settimeout(READY)
        try:
            assert cli.recv(100) == b""
        except ConnectionResetError:
            pass                                 # TCP: unread data at close means RST
        assert isinstance(_send_until_error(cli), PEER_GONE_ERRORS)

    def test_forked_child_closing_inherited_listener(self, net):
        lst = net.listener()
        pid = net.fork(lambda: lst.close())      # a child lets go of its copy
        assert os.WEXITSTATUS(net.reap(pid)) == 0
        cli = net.connect(lst.getsockname())     # the parent still serves, on the same path
        srv, _ = net.accept(lst)
        net.check_path(cli, srv)
        cli.sendall(b"still served")
        assert recv_exactly(srv, 12) == b"still served"

    @pytest.mark.parametrize("unread", [False, True], ids=["idle", "unread-data"])
    def test_dead_peer_process(self, net, unread):
        lst = net.listener()
        addr = lst.getsockname()

        def child():
            sock = net.connect(addr)
            sock.sendall(b"ready")
            signal.pause()                      # until SIGKILL

        pid = net.fork(child)
        lst.settimeout(READY)
        srv, _ = net.accept(lst)
        net.check_path(srv)
        srv.settimeout(READY)
        assert recv_exactly(srv, 5) == b"ready"
        if unread:
            srv.sendall(b"never read by the child")
        status = net.kill(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        try:
            assert srv.recv(100) == b""
        except ConnectionResetError:
            pass
        assert isinstance(_send_until_error(srv), PEER_GONE_ERRORS)


# -- argument errors ----------------------------------------------------------------

_SOL, _TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP
_ADDR = ("127.0.0.1", 9)
_COMPAT = -(1 << 31)           # MSG_CMSG_COMPAT: refused by sendmsg/recvmsg


def _ro():
    return memoryview(b"read only")


#: (call, function of a connected, non-blocking socket with nothing to
#: read): every one is an error on a stdlib socket, and every kind must
#: raise the same exception type with the same errno.
ARGUMENT_ERRORS = [
    ("setsockopt bad optname", lambda s: s.setsockopt(_SOL, 9999, 1)),
    ("setsockopt bad level", lambda s: s.setsockopt(9999, 1, 1)),
    ("setsockopt bad tcp optname", lambda s: s.setsockopt(_TCP, 9999, 1)),
    ("setsockopt float", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, 1.5)),
    ("setsockopt None", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, None)),
    ("setsockopt None optlen", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, None, 4)),
    ("setsockopt str", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, "abc")),
    ("setsockopt str nodelay", lambda s: s.setsockopt(_TCP, socket.TCP_NODELAY, "abc")),
    ("setsockopt list", lambda s: s.setsockopt(_TCP, socket.TCP_NODELAY, [])),
    ("setsockopt empty bytes", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, b"")),
    ("setsockopt 1-byte int", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, b"\1")),
    ("setsockopt huge int", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, 2 ** 40)),
    ("setsockopt int and optlen", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE, 1, 4)),
    ("setsockopt 1-byte linger", lambda s: s.setsockopt(_SOL, socket.SO_LINGER, b"x")),
    ("setsockopt int linger", lambda s: s.setsockopt(_SOL, socket.SO_LINGER, 1)),
    ("setsockopt 1-byte rcvtimeo", lambda s: s.setsockopt(_SOL, socket.SO_RCVTIMEO, b"x")),
    ("setsockopt keepidle 0", lambda s: s.setsockopt(_TCP, socket.TCP_KEEPIDLE, 0)),
    ("setsockopt keepidle -5", lambda s: s.setsockopt(_TCP, socket.TCP_KEEPIDLE, -5)),
    ("setsockopt maxseg 10", lambda s: s.setsockopt(_TCP, socket.TCP_MAXSEG, 10)),
    ("setsockopt so_type", lambda s: s.setsockopt(_SOL, socket.SO_TYPE, 1)),
    ("setsockopt so_error", lambda s: s.setsockopt(_SOL, socket.SO_ERROR, 1)),
    ("setsockopt ipv6 on ipv4", lambda s: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)),
    ("setsockopt str optname", lambda s: s.setsockopt(_SOL, "a", 1)),
    ("setsockopt str level", lambda s: s.setsockopt("a", 1, 1)),
    ("setsockopt missing value", lambda s: s.setsockopt(_SOL, socket.SO_KEEPALIVE)),
    ("getsockopt bad optname", lambda s: s.getsockopt(_SOL, 9999)),
    ("getsockopt bad level", lambda s: s.getsockopt(9999, 1)),
    ("getsockopt bad tcp optname", lambda s: s.getsockopt(_TCP, 9999)),
    ("getsockopt buflen -1", lambda s: s.getsockopt(_SOL, socket.SO_KEEPALIVE, -1)),
    ("getsockopt buflen 2000", lambda s: s.getsockopt(_SOL, socket.SO_KEEPALIVE, 2000)),
    ("getsockopt buflen None", lambda s: s.getsockopt(_SOL, socket.SO_KEEPALIVE, None)),
    ("getsockopt buflen float", lambda s: s.getsockopt(_SOL, socket.SO_KEEPALIVE, 1.5)),
    ("getsockopt known buflen -1", lambda s: s.getsockopt(_SOL, socket.SO_TYPE, -1)),
    ("getsockopt str optname", lambda s: s.getsockopt(_SOL, "a")),
    ("getsockopt ipv6 on ipv4", lambda s: s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)),
    ("recv negative", lambda s: s.recv(-1)),
    ("recv float", lambda s: s.recv(1.5)),
    ("recv None", lambda s: s.recv(None)),
    ("recv huge", lambda s: s.recv(2 ** 70)),
    ("recv float flags", lambda s: s.recv(1, 1.5)),
    ("recv str flags", lambda s: s.recv(1, "a")),
    ("recv huge flags", lambda s: s.recv(1, 2 ** 31)),
    ("recv MSG_OOB", lambda s: s.recv(1, socket.MSG_OOB)),
    ("recv MSG_ERRQUEUE", lambda s: s.recv(1, socket.MSG_ERRQUEUE)),
    ("recv flags -1", lambda s: s.recv(1, -1)),
    ("recv_into bytes", lambda s: s.recv_into(b"bytes")),
    ("recv_into str", lambda s: s.recv_into("str")),
    ("recv_into None", lambda s: s.recv_into(None)),
    ("recv_into read-only view", lambda s: s.recv_into(_ro())),
    ("recv_into nbytes -1", lambda s: s.recv_into(bytearray(2), -1)),
    ("recv_into nbytes too big", lambda s: s.recv_into(bytearray(2), 5)),
    ("recv_into float nbytes", lambda s: s.recv_into(bytearray(2), 1.5)),
    ("recv_into float flags", lambda s: s.recv_into(bytearray(2), 1, 1.5)),
    ("recv_into MSG_OOB", lambda s: s.recv_into(bytearray(2), 1, socket.MSG_OOB)),
    ("recvfrom negative", lambda s: s.recvfrom(-1)),
    ("recvfrom str flags", lambda s: s.recvfrom(1, "a")),
    ("recvfrom_into bytes", lambda s: s.recvfrom_into(b"x")),
    ("recvfrom_into nbytes -1", lambda s: s.recvfrom_into(bytearray(2), -1)),
    ("recvfrom_into nbytes too big", lambda s: s.recvfrom_into(bytearray(2), 5)),
    ("recvmsg negative", lambda s: s.recvmsg(-1)),
    ("recvmsg ancbufsize -1", lambda s: s.recvmsg(10, -1)),
    ("recvmsg ancbufsize huge", lambda s: s.recvmsg(10, 2 ** 40)),
    ("recvmsg float", lambda s: s.recvmsg(1.5)),
    ("recvmsg float ancbufsize", lambda s: s.recvmsg(1, 0.0)),
    ("recvmsg str flags", lambda s: s.recvmsg(1, 0, "x")),
    ("recvmsg too many args", lambda s: s.recvmsg(1, 0, 0, 5)),
    ("recvmsg MSG_CMSG_COMPAT", lambda s: s.recvmsg(1, 0, _COMPAT)),
    ("recvmsg MSG_OOB", lambda s: s.recvmsg(1, 0, socket.MSG_OOB)),
    ("recvmsg_into a bytearray", lambda s: s.recvmsg_into(bytearray(2))),
    ("recvmsg_into bytes", lambda s: s.recvmsg_into([b"x"])),
    ("recvmsg_into not iterable", lambda s: s.recvmsg_into(5)),
    ("recvmsg_into read-only view", lambda s: s.recvmsg_into([_ro()])),
    ("recvmsg_into ancbufsize -1", lambda s: s.recvmsg_into([bytearray(2)], -1)),
    ("recvmsg_into float ancbufsize", lambda s: s.recvmsg_into([bytearray(2)], 1.5)),
    ("recvmsg_into str flags", lambda s: s.recvmsg_into([bytearray(2)], 0, "x")),
    ("recvmsg_into MSG_CMSG_COMPAT", lambda s: s.recvmsg_into([bytearray(2)], 0, _COMPAT)),
    ("recvmsg_into MSG_ERRQUEUE", lambda s: s.recvmsg_into([bytearray(2)], 0, socket.MSG_ERRQUEUE)),
    ("send str", lambda s: s.send("str")),
    ("send None", lambda s: s.send(None)),
    ("send flags -1", lambda s: s.send(b"x", -1)),
    ("send float flags", lambda s: s.send(b"x", 1.5)),
    ("send huge flags", lambda s: s.send(b"x", 2 ** 40)),
    ("send MSG_FASTOPEN", lambda s: s.send(b"x", socket.MSG_FASTOPEN)),
    ("send empty MSG_FASTOPEN", lambda s: s.send(b"", socket.MSG_FASTOPEN)),
    ("sendall str", lambda s: s.sendall("s")),
    ("sendall flags -1", lambda s: s.sendall(b"x", -1)),
    ("sendall float flags", lambda s: s.sendall(b"x", 1.5)),
    ("sendto no address", lambda s: s.sendto(b"x")),
    ("sendto str address", lambda s: s.sendto(b"x", "a")),
    ("sendto too many args", lambda s: s.sendto(b"x", 1, 2, 3)),
    ("sendto str data", lambda s: s.sendto("s", _ADDR)),
    ("sendto float flags", lambda s: s.sendto(b"x", 1.5, _ADDR)),
    ("sendto flags -1", lambda s: s.sendto(b"x", -1, _ADDR)),
    ("sendmsg str", lambda s: s.sendmsg("x")),
    ("sendmsg str item", lambda s: s.sendmsg(["s"])),
    ("sendmsg not iterable", lambda s: s.sendmsg(5)),
    ("sendmsg flags -1", lambda s: s.sendmsg([b"x"], [], -1)),
    ("sendmsg MSG_FASTOPEN", lambda s: s.sendmsg([b"x"], [], socket.MSG_FASTOPEN)),
    ("shutdown 5", lambda s: s.shutdown(5)),
    ("shutdown str", lambda s: s.shutdown("a")),
    ("shutdown float", lambda s: s.shutdown(1.0)),
    ("settimeout negative", lambda s: s.settimeout(-1)),
    ("settimeout str", lambda s: s.settimeout("a")),
    ("connect when connected", lambda s: s.connect(s.getpeername())),
    ("connect str", lambda s: s.connect("a")),
    ("bind when connected", lambda s: s.bind(("127.0.0.1", 0))),
    ("listen when connected", lambda s: s.listen()),
    ("listen str", lambda s: s.listen("a")),
    ("accept when connected", lambda s: s.accept()),
    ("settimeout nan", lambda s: s.settimeout(float("nan"))),
    ("shutdown -1", lambda s: s.shutdown(-1)),
    ("getsockopt no args", lambda s: s.getsockopt()),
    ("send non-contiguous", lambda s: s.send(memoryview(b"abcd")[::2])),
    ("sendall non-contiguous", lambda s: s.sendall(memoryview(b"abcd")[::2])),
    ("sendmsg non-contiguous", lambda s: s.sendmsg([memoryview(b"abcd")[::2]])),
    ("recv_into non-contiguous", lambda s: s.recv_into(memoryview(bytearray(4))[::2])),
    ("recvmsg_into non-contiguous", lambda s: s.recvmsg_into([memoryview(bytearray(4))[::2]])),
    ("recvfrom_into str flags", lambda s: s.recvfrom_into(bytearray(2), 1, "x")),
    ("sendfile non-blocking", lambda s: s.sendfile(io.BytesIO(b"x"))),
    ("shutdown beyond a C int", lambda s: s.shutdown(2 ** 31)),
    ("shutdown beyond a C unsigned", lambda s: s.shutdown(2 + 2 ** 32)),
    ("shutdown below a C int", lambda s: s.shutdown(-2 ** 31 - 1)),
    ("sendmsg bytes", lambda s: s.sendmsg(b"not an iterable of buffers")),
    ("sendmsg object", lambda s: s.sendmsg(object())),
    ("sendmsg object item", lambda s: s.sendmsg([object()])),
    ("sendmsg object second item", lambda s: s.sendmsg([b"x", object()])),
    ("sendmsg object ancdata", lambda s: s.sendmsg([b"x"], object())),
    ("sendmsg None ancdata", lambda s: s.sendmsg([b"x"], None)),
    ("sendmsg object flags", lambda s: s.sendmsg([b"x"], [], object())),
    ("sendmsg huge flags", lambda s: s.sendmsg([b"x"], [], 2 ** 31)),
    ("sendmsg object address", lambda s: s.sendmsg([b"x"], [], 0, object())),
    ("sendmsg str address", lambda s: s.sendmsg([b"x"], [], 0, "a")),
    ("sendmsg short address", lambda s: s.sendmsg([b"x"], [], 0, ("127.0.0.1",))),
    ("sendmsg port too big", lambda s: s.sendmsg([b"x"], [], 0, ("127.0.0.1", 70000))),
    ("sendmsg IPv6 address", lambda s: s.sendmsg([b"x"], [], 0, ("::1", 9, 0, 0))),
    ("sendmsg too many args", lambda s: s.sendmsg([b"x"], [], 0, None, 5)),
    ("sendmsg cmsg object", lambda s: s.sendmsg([b"x"], [object()])),
    ("sendmsg cmsg object level", lambda s: s.sendmsg([b"x"], [(object(), 0, b"data")])),
    ("sendmsg cmsg object type", lambda s: s.sendmsg([b"x"], [(0, object(), b"data")])),
    ("sendmsg cmsg object data", lambda s: s.sendmsg([b"x"], [(0, 0, object())])),
    ("sendmsg cmsg str data", lambda s: s.sendmsg([b"x"], [(0, 0, "data")])),
    ("sendmsg cmsg two items", lambda s: s.sendmsg([b"x"], [(1, 2)])),
    ("sendmsg cmsg four items", lambda s: s.sendmsg([b"x"], [(0, 0, b"data", 42)])),
    ("sendmsg cmsg flat", lambda s: s.sendmsg([b"x"], [0, 0, b""])),
    ("sendmsg cmsg bytes", lambda s: s.sendmsg([b"x"], [b"abc"])),
    ("sendmsg cmsg str", lambda s: s.sendmsg([b"x"], "abc")),
    ("sendmsg cmsg good then object", lambda s: s.sendmsg([b"x"], [(0, 0, b""), object()])),
    ("sendmsg cmsg float level", lambda s: s.sendmsg([b"x"], [(1.5, 0, b"")])),
    ("sendmsg cmsg huge level", lambda s: s.sendmsg([b"x"], [(2 ** 31, 0, b"")])),
    ("sendmsg cmsg non-contiguous", lambda s: s.sendmsg([b"x"], [(0, 0, memoryview(b"abcd")[::2])])),
    ("sendmsg bad buffer before bad cmsg", lambda s: s.sendmsg([object()], [(2 ** 31, 0, b"")])),
    ("sendmsg SOL_SOCKET unknown type", lambda s: s.sendmsg([b"x"], [(_SOL, 99, b"")])),
    ("sendmsg SOL_SOCKET type 0", lambda s: s.sendmsg([b"x"], [(True, 0, b"")])),
    ("sendmsg SOL_SOCKET unknown type, no data", lambda s: s.sendmsg([], [(_SOL, 99, b"")])),
    ("sendmsg rights then unknown", lambda s: s.sendmsg([b"x"], [(_SOL, socket.SCM_RIGHTS, b""),
                                                                   (_SOL, 99, b"")])),
    ("sendmsg SO_TIMESTAMPING rx flag", lambda s: s.sendmsg([b"x"], [(_SOL, 37, struct.pack("I", 4))])),
    ("sendmsg SO_TIMESTAMPING 8 bytes", lambda s: s.sendmsg([b"x"], [(_SOL, 37, bytes(8))])),
    ("sendmsg SO_MARK 8 bytes", lambda s: s.sendmsg([b"x"], [(_SOL, socket.SO_MARK, bytes(8))])),
    ("sendmsg SCM_TXTIME unset", lambda s: s.sendmsg([b"x"], [(_SOL, 61, bytes(8))])),
    ("sendmsg too much ancillary data", lambda s: s.sendmsg([b"x"], [(0, 0, bytes(1 << 20))])),
    ("sendmsg MSG_FASTOPEN, bad cmsg", lambda s: s.sendmsg([b"x"], [(_SOL, 99, b"")], socket.MSG_FASTOPEN)),
    ("sendmsg MSG_CMSG_COMPAT, bad cmsg", lambda s: s.sendmsg([b"x"], [(_SOL, 99, b"")], _COMPAT)),
    ("sendto port too big", lambda s: s.sendto(b"x", ("127.0.0.1", 70000))),
    ("sendto short address", lambda s: s.sendto(b"x", ("127.0.0.1",))),
    ("connect port too big when connected", lambda s: s.connect(("127.0.0.1", 70000))),
]


def _outcome(fn, sock):
    try:
        fn(sock)
    except Exception as exc:                     # noqa: BLE001 - that is what is compared
        return type(exc), getattr(exc, "errno", None)
    return None


def _std_pair():
    """A connected pair of plain kernel sockets, whatever the patch does."""
    lst = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        cli.connect(lst.getsockname())
        srv, _ = lst.accept()
    finally:
        lst.close()
    return cli, srv


class ArgumentErrorTests:
    """Every call's argument and state errors: the same exception type and
    errno as the stdlib's, on every kind of connection."""

    @pytest.mark.parametrize("fn", [f for _, f in ARGUMENT_ERRORS], ids=[n for n, _ in ARGUMENT_ERRORS])
    def test_same_error_as_the_stdlib(self, net, fn):
        std_cli, std_srv = _std_pair()
        try:
            std_srv.setblocking(False)
            want = _outcome(fn, std_srv)
        finally:
            std_cli.close()
            std_srv.close()
        assert want is not None, "not an error on the stdlib: not a case for this table"
        cli, srv = net.pair()
        srv.setblocking(False)
        got = _outcome(fn, srv)
        assert got == want, f"{got} where the stdlib gives {want}"
        # And the connection still works.
        cli.sendall(b"ok")
        srv.settimeout(READY)
        assert recv_exactly(srv, 2) == b"ok"
