"""A shrimpio listener's fd keeps the stdlib's blocking mode (blocking
without a timeout), and accept() never waits in the kernel for a TCP client
another process took: a listener shared with other processes (a fork, an fd
sent in ``SCM_RIGHTS``) is made non-blocking, and every client is still
accepted exactly once.  (The mode of an unshared listener, on every kind of
connection: tests/conformance/suite_details.py, ``ListenerModeTests``.)"""

from __future__ import annotations

import array
import fcntl
import os
import socket

import shrimpio.socket as ss
from children import reap
from result_thread import ResultThread

READY = 10.0


def _blocking(sock) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def _listener() -> ss.socket:
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    assert ss.info(lst)["path"] == "shm" and _blocking(lst)
    return lst


def _serve(lst, n: int, answer: bytes) -> None:
    for _ in range(n):
        conn, _ = lst.accept()
        with conn:
            conn.sendall(answer)


def _tcp_clients(address, n: int) -> list:
    """``n`` plain kernel TCP clients (never shared memory): their answers."""
    answers = []
    for _ in range(n):
        with ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM) as cli:
            cli.settimeout(READY)
            cli.connect(address)
            answers.append(cli.recv(10))
    return answers


def test_forked_listener_serves_each_tcp_client_once():
    lst = _listener()
    try:
        pid = os.fork()
        if pid == 0:                                   # pragma: no cover - child
            code = 1
            try:
                _serve(lst, 2, b"child")
                code = 0
            finally:
                os._exit(code)
        try:
            parent = ResultThread(_serve, lst, 2, b"parent", deadline=READY * 2)
            parent.start()
            answers = _tcp_clients(lst.getsockname(), 4)
            parent.result()
            assert sorted(answers) == [b"child", b"child", b"parent", b"parent"]
            assert not _blocking(lst)              # shared: made non-blocking
        finally:
            assert reap(pid, READY) == 0
    finally:
        lst.close()


def test_listener_sent_in_scm_rights_becomes_non_blocking():
    lst = _listener()
    a, b = socket.socketpair()
    try:
        fds = array.array("i", [lst.fileno()])
        # (through a shrimpio Unix socket: its sendmsg sees the fds go)
        sender = ss.socket(fileno=a.detach())
        try:
            sender.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        finally:
            sender.close()
        _msg, anc, _flags, _addr = b.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        received = array.array("i")
        received.frombytes(anc[0][2])
        os.close(received[0])
        assert not _blocking(lst)
        lst.settimeout(None)
        assert not _blocking(lst)                  # and stays so
        server = ResultThread(_serve, lst, 2, b"ok", deadline=READY * 2)
        server.start()
        assert _tcp_clients(lst.getsockname(), 2) == [b"ok", b"ok"]
        server.result()
    finally:
        b.close()
        lst.close()
