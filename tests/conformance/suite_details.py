"""Conformance tests for details that CPython's own ``test.test_socket``
checks (see tests/test_cpython_socket.py), so that they are held on every
kind of connection without CPython's suite: what ``sendmsg`` does with
ancillary data and an address, the type of option values, a listener's
blocking mode, a send to a peer that closed.

Mixins, as in ``suite.py``: ``tests/test_conformance.py`` gives them the
``net`` fixture.  The expected outcomes are Linux TCP's.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import pytest

from .harness import READY, Poller, StdSocket, Worker, recv_exactly
from .suite import _assert_blocked, _send_until_error, _std_pair


def _outcome(fn, *args):
    try:
        return fn(*args)
    except OSError as exc:
        return type(exc)


_SOL = socket.SOL_SOCKET
_SO_TIMESTAMPING_OLD = 37


def _ignored_ancdata():
    creds = struct.pack("iII", os.getpid(), os.getuid(), os.getgid())
    return {
        "other level": [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack("i", 0))],
        "level 0": [(0, 0, b"data")],
        "tcp level": [(socket.IPPROTO_TCP, 5, b"abc")],
        "SCM_CREDENTIALS": [(_SOL, socket.SCM_CREDENTIALS, creds)],
        "SO_TIMESTAMPING": [(_SOL, _SO_TIMESTAMPING_OLD, struct.pack("I", 0))],
        "list item": [[0, 0, bytearray(b"x")]],
        "two items": [(0, 0, b""), (socket.IPPROTO_IP, 1, b"")],
        "an iterator": iter([(0, 0, b"")]),
        "a dict": {},
    }


class SendmsgTests:
    """sendmsg on a connected stream: ancillary data Linux TCP does not
    refuse is ignored (no fd goes anywhere), and so is the address."""

    @pytest.mark.parametrize("case", list(_ignored_ancdata()))
    def test_ancillary_data_tcp_accepts_is_ignored(self, net, case):
        cli, srv = net.pair()
        assert cli.sendmsg([b"ab", b"cd"], _ignored_ancdata()[case]) == 4
        srv.settimeout(READY)
        data, anc, _flags, _addr = srv.recvmsg(4, 1024)
        data += recv_exactly(srv, 4 - len(data))
        assert data == b"abcd" and anc == []

    def test_scm_rights_over_a_stream_carries_no_fd(self, net):
        cli, srv = net.pair()
        r, w = os.pipe()
        try:
            fds = struct.pack("i", r)
            assert cli.sendmsg([b"fd"], [(_SOL, socket.SCM_RIGHTS, fds)]) == 2
        finally:
            os.close(r)
            os.close(w)
        srv.settimeout(READY)
        data, anc, _flags, _addr = srv.recvmsg(2, socket.CMSG_SPACE(4))
        assert data + recv_exactly(srv, 2 - len(data)) == b"fd" and anc == []

    def test_so_mark_item_as_the_kernel_says(self, net):
        # Accepted only with CAP_NET_RAW or CAP_NET_ADMIN: whatever the
        # stdlib socket gets here, every kind gets.
        item = [(_SOL, socket.SO_MARK, struct.pack("I", 0))]
        std_cli, std_srv = _std_pair()
        try:
            want = _outcome(std_cli.sendmsg, [b"m"], item)
        finally:
            std_cli.close()
            std_srv.close()
        cli, _ = net.pair()
        assert _outcome(cli.sendmsg, [b"m"], item) == want

    def test_address_is_ignored(self, net):
        cli, srv = net.pair()
        assert cli.sendmsg([b"a"], [], 0, ("127.0.0.1", 9)) == 1
        assert cli.sendmsg([b"b"], [], 0, None) == 1
        assert cli.sendto(b"c", ("127.0.0.1", 9)) == 1
        assert cli.sendto(b"d", 0, ("127.0.0.1", 9)) == 1
        srv.settimeout(READY)
        assert recv_exactly(srv, 4) == b"abcd"


class OptionTypeTests:
    """Option values read back as the kernel's: plain ints."""

    @pytest.mark.parametrize("name,expected", [
        ("SO_TYPE", socket.SOCK_STREAM), ("SO_DOMAIN", socket.AF_INET),
        ("SO_PROTOCOL", socket.IPPROTO_TCP), ("SO_ERROR", 0), ("SO_ACCEPTCONN", 0),
        ("SO_KEEPALIVE", 0), ("SO_SNDBUF", None), ("SO_RCVBUF", None),
    ])
    def test_values_are_plain_ints(self, net, name, expected):
        cli, srv = net.pair()
        for sock in (cli, srv):
            value = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, name))
            assert type(value) is int, f"{name}: {value!r}"
            if expected is not None:
                assert value == expected
        lst = net.listener()
        value = lst.getsockopt(socket.SOL_SOCKET, getattr(socket, name))
        assert type(value) is int


def _fd_blocking(sock) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


class ListenerModeTests:
    """A listening socket's fd is blocking exactly when it has no timeout
    (as ``fcntl`` shows), and accept() serves every client in each mode."""

    @pytest.mark.parametrize("before_listen", [None, 0.0, 5.0])
    def test_fd_mode_follows_the_timeout(self, net, before_listen):
        lst = net.socket()
        lst.settimeout(before_listen)
        lst.bind(("127.0.0.1", 0))
        net.served(lst.getsockname()[1])
        lst.listen()
        assert _fd_blocking(lst) == (before_listen is None)
        for value in (None, 0.0, 10.0, 0, None, 2.5, None):
            lst.settimeout(value)
            assert lst.gettimeout() == value
            assert lst.getblocking() == (value != 0)
            assert _fd_blocking(lst) == (value is None)
        lst.setblocking(False)
        assert not _fd_blocking(lst)
        lst.setblocking(True)
        assert _fd_blocking(lst)

    def test_blocking_listener_accepts_clients_of_both_kinds(self, net):
        lst = net.listener()
        assert _fd_blocking(lst)
        for make in (lambda: net.connect(lst.getsockname()),
                     lambda: net.track(_std_client(lst.getsockname()))):
            acceptor = Worker(lst.accept)
            _assert_blocked(acceptor)
            cli = make()
            srv, _ = acceptor.result(READY)
            net.track(srv)
            cli.sendall(b"hello")
            srv.settimeout(READY)
            assert recv_exactly(srv, 5) == b"hello"
        assert _fd_blocking(lst)

    def test_threads_blocked_in_accept_all_get_a_client(self, net):
        lst = net.listener(backlog=32)
        threads, per_thread = 4, 2

        def accept_some():
            got = []
            for _ in range(per_thread):
                conn, _ = lst.accept()
                got.append(conn)
            return got

        workers = [Worker(accept_some) for _ in range(threads)]
        clients = []
        for i in range(threads * per_thread):
            clients.append(net.connect(lst.getsockname()) if i % 2 else _std_client(lst.getsockname()))
            net.track(clients[-1])
        accepted = [conn for w in workers for conn in w.result(READY * 2)]
        for conn in accepted:
            net.track(conn)
        assert len(accepted) == threads * per_thread
        assert {c.getpeername() for c in accepted} == {c.getsockname() for c in clients}


def _std_client(address) -> StdSocket:
    """A plain kernel TCP client (never shared memory, patched or not)."""
    cli = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    cli.connect(address)
    return cli


def _eof(sock) -> None:
    """Wait (up to READY) until the peer's close or shutdown has arrived."""
    sock.settimeout(READY)
    assert sock.recv(10) == b""


def _readable(sock) -> None:
    with Poller("select") as p:
        p.register(sock)
        assert p.readable(sock, READY)


class PeerClosedTests:
    """Writing to a peer that closed.  Linux TCP takes the first send after
    the peer's close (the peer's kernel answers it with a reset) and fails
    the later ones with EPIPE; if the peer closed with bytes of ours
    unread, its kernel reset the connection at once: the first call, send
    or recv, raises ECONNRESET, then sends EPIPE and reads EOF."""

    @pytest.mark.parametrize("how", ["close", "SHUT_RDWR"])
    def test_first_send_after_peer_close_succeeds_then_epipe(self, net, how):
        cli, srv = net.pair()
        if how == "close":
            srv.close()
        else:
            srv.shutdown(socket.SHUT_RDWR)
        _eof(cli)
        assert cli.send(b"x") == 1
        assert isinstance(_send_until_error(cli), BrokenPipeError)
        with pytest.raises(BrokenPipeError):
            cli.sendall(b"x")
        with pytest.raises(BrokenPipeError):
            cli.send(b"")
        assert cli.recv(10) == b""

    @pytest.mark.parametrize("call", ["send", "sendall", "sendmsg"])
    def test_first_small_send_after_peer_close_is_whole(self, net, call):
        cli, srv = net.pair()
        srv.close()
        _eof(cli)
        data = b"y" * 1000
        if call == "send":
            assert cli.send(data) == len(data)
        elif call == "sendall":
            assert cli.sendall(data) is None
        else:
            assert cli.sendmsg([data[:10], data[10:]]) == len(data)
        assert isinstance(_send_until_error(cli), BrokenPipeError)

    def test_empty_sends_after_peer_close_succeed(self, net):
        cli, srv = net.pair()
        srv.close()
        _eof(cli)
        assert cli.send(b"") == 0
        assert cli.sendall(b"") is None
        assert cli.sendmsg([]) == 0
        assert cli.send(b"z") == 1          # an empty send was not "the first send"

    def test_huge_sendall_after_peer_close_is_epipe(self, net):
        cli, srv = net.pair()
        srv.close()
        _eof(cli)
        with pytest.raises(BrokenPipeError):
            cli.sendall(b"w" * (32 << 20))

    @pytest.mark.parametrize("first", ["recv", "send", "sendall", "empty send"])
    def test_peer_close_with_our_bytes_unread_is_a_reset_once(self, net, first):
        cli, srv = net.pair()
        cli.sendall(b"unread")
        _readable(srv)                      # arrived, and never read
        srv.close()
        _readable(cli)                      # the reset (or the peer's end) arrived
        calls = {"recv": lambda: cli.recv(10), "send": lambda: cli.send(b"x"),
                 "sendall": lambda: cli.sendall(b"x"), "empty send": lambda: cli.send(b"")}
        with pytest.raises(ConnectionResetError):
            calls[first]()
        assert cli.recv(10) == b""
        with pytest.raises(BrokenPipeError):
            cli.send(b"x")
        assert cli.recv(10) == b""

    def test_data_sent_before_the_reset_is_read_first(self, net):
        cli, srv = net.pair()
        cli.sendall(b"request")
        _readable(srv)
        srv.sendall(b"response")
        srv.close()
        cli.settimeout(READY)
        assert recv_exactly(cli, 8) == b"response"
        with pytest.raises(ConnectionResetError):
            cli.recv(10)
        assert cli.recv(10) == b""

    def test_peer_shut_rd_only_still_takes_sends(self, net):
        cli, srv = net.pair()
        srv.shutdown(socket.SHUT_RD)
        for _ in range(3):
            assert cli.send(b"q") == 1
        srv.settimeout(READY)
        assert recv_exactly(srv, 3) == b"qqq"
