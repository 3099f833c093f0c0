"""The patched epoll decides at poll time what a registered fd is.

A program may register a socket with ``select.epoll`` (or a selector) before
``connect()`` or ``listen()`` (pyftpdlib does): the fd number stays, but a
shared-memory connect replaces its file by ``dup2`` (which silently drops a
kernel epoll registration), and a shared-memory listener is ready when its
registry entry is.  Such a socket must get the events of what it became.
``EPOLLONESHOT`` and ``EPOLLET`` hold for shrimpio fds as for kernel ones;
a registration ends with the file it was made for, as in the kernel.

The last test runs pyftpdlib (its epoll IO loop) and ftplib, unmodified
under ``shrimpio run``, with a few MB each way.
"""

from __future__ import annotations

import hashlib
import os
import select
import selectors
import socket
import subprocess
import sys

import pytest

import shrimpio.patch
import shrimpio.socket as ss
from shrimpio._control import Registry

from children import child_env

shrimpio.patch.disable()

READY = 5.0
QUIET = 0.05
IN, OUT = select.EPOLLIN, select.EPOLLOUT


@pytest.fixture
def patched():
    shrimpio.patch.enable()
    try:
        yield
    finally:
        shrimpio.patch.disable()


@pytest.fixture
def listener():
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    lst.settimeout(READY)
    try:
        yield lst
    finally:
        lst.close()


def events(ep, timeout=READY) -> dict:
    return dict(ep.poll(timeout))


def test_registered_before_connect(patched, listener):
    cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    ep = select.epoll()
    try:
        ep.register(cli, OUT)               # as pyftpdlib before its connect()
        cli.connect(listener.getsockname())
        assert ss.info(cli)["path"] == "shm"
        assert events(ep) == {cli.fileno(): OUT}
        srv, _ = listener.accept()
        with srv:
            ep.modify(cli, IN)
            assert events(ep, QUIET) == {}
            srv.sendall(b"hello")
            assert events(ep) == {cli.fileno(): IN}
            assert cli.recv(10) == b"hello"
            assert events(ep, QUIET) == {}
            ep.unregister(cli)
            srv.sendall(b"more")
            assert events(ep, QUIET) == {}
    finally:
        ep.close()
        cli.close()


def test_registered_before_a_nonblocking_connect(patched, listener):
    cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli.setblocking(False)
    ep = select.epoll()
    try:
        ep.register(cli.fileno(), IN | OUT)
        assert cli.connect_ex(listener.getsockname()) in (0, 115)     # (EINPROGRESS on TCP)
        got = events(ep)
        assert got[cli.fileno()] & OUT and cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        srv, _ = listener.accept()
        srv.close()
        assert events(ep)[cli.fileno()] & IN
        assert cli.recv(10) == b""
    finally:
        ep.close()
        cli.close()


@pytest.mark.parametrize("how", ["epoll", "DefaultSelector"])
def test_registered_before_listen(patched, how):
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    poller = select.epoll() if how == "epoll" else selectors.DefaultSelector()
    try:
        if how == "epoll":
            poller.register(lst, IN)
        else:
            poller.register(lst, selectors.EVENT_READ)
        lst.listen(4)
        lst.setblocking(False)
        assert ss.info(lst)["path"] == "shm"

        def ready(timeout):
            if how == "epoll":
                return [fd for fd, _ in poller.poll(timeout)]
            return [key.fd for key, _ in poller.select(timeout)]

        assert ready(QUIET) == []
        cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
        with cli:
            cli.connect(lst.getsockname())
            assert ss.info(cli)["path"] == "shm"
            assert ready(READY) == [lst.fileno()]
            srv, _ = lst.accept()
            srv.close()
            assert ready(QUIET) == []
            # A kernel TCP client of the same listener is seen too.
            tcp = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            with tcp:
                tcp.connect(lst.getsockname())
                assert ready(READY) == [lst.fileno()]
                srv, _ = lst.accept()
                srv.close()
    finally:
        poller.close()
        lst.close()


def test_connect_that_falls_back_stays_registered(patched):
    """A socket registered before a connect that goes by kernel TCP (no
    shrimpio listener there) keeps its kernel registration."""
    plain = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    ep = select.epoll()
    try:
        ep.register(cli, IN)
        cli.connect(plain.getsockname())
        assert ss.info(cli)["path"] == "tcp"
        assert events(ep, QUIET) == {}
        srv, _ = plain.accept()
        with srv:
            srv.sendall(b"x")
            assert events(ep) == {cli.fileno(): IN}
    finally:
        ep.close()
        cli.close()
        plain.close()


def _shm_pair(listener):
    cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    cli.connect(listener.getsockname())
    srv, _ = listener.accept()
    assert ss.info(srv)["path"] == "shm"
    return cli, srv


def test_oneshot(patched, listener):
    cli, srv = _shm_pair(listener)
    ep = select.epoll()
    try:
        ep.register(srv, IN | select.EPOLLONESHOT)
        cli.sendall(b"a")
        assert events(ep) == {srv.fileno(): IN}
        assert events(ep, QUIET) == {}              # disarmed, though still readable
        cli.sendall(b"b")
        assert events(ep, QUIET) == {}
        ep.modify(srv, IN | select.EPOLLONESHOT)    # re-armed
        assert events(ep) == {srv.fileno(): IN}
        assert events(ep, QUIET) == {}
        with pytest.raises(FileExistsError):
            ep.register(srv, IN)                    # still registered while disarmed
    finally:
        ep.close()
        cli.close()
        srv.close()


def test_edge_triggered(patched, listener):
    cli, srv = _shm_pair(listener)
    ep = select.epoll()
    try:
        ep.register(srv, IN | OUT | select.EPOLLET)
        assert events(ep) == {srv.fileno(): OUT}    # writable: one edge
        assert events(ep, QUIET) == {}
        cli.sendall(b"abc")
        assert events(ep) == {srv.fileno(): IN}
        assert events(ep, QUIET) == {}              # not drained, but no new data: no edge
        assert srv.recv(1) == b"a"
        assert events(ep, QUIET) == {}
        cli.sendall(b"d")                           # new data: a new edge
        assert events(ep) == {srv.fileno(): IN}
        assert srv.recv(10) == b"bcd"
        cli.close()                                 # end of file: an edge
        got = events(ep)
        assert got[srv.fileno()] & IN
        assert srv.recv(10) == b""
    finally:
        ep.close()
        cli.close()
        srv.close()


def test_edge_triggered_write_side(patched, listener):
    cli, srv = _shm_pair(listener)
    ep = select.epoll()
    try:
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                srv.send(b"f" * 65536)
        ep.register(srv, OUT | select.EPOLLET)
        assert events(ep, QUIET) == {}
        assert cli.recv(65536)                      # the reader makes room: an edge
        assert events(ep) == {srv.fileno(): OUT}
        assert events(ep, QUIET) == {}
    finally:
        ep.close()
        cli.close()
        srv.close()


def test_a_registration_ends_with_its_file(patched, listener):
    """As the kernel's: closing a registered socket ends its registration,
    so a new socket that gets the same fd number registers afresh, and is
    not reported unless registered."""
    cli, srv = _shm_pair(listener)
    ep = select.epoll()
    try:
        ep.register(srv, IN)
        fd = srv.fileno()
        srv.close()                                 # without unregister()
        cli.close()
        cli2, srv2 = _shm_pair(listener)
        with cli2, srv2:
            if srv2.fileno() != fd and cli2.fileno() == fd:
                srv2, cli2 = cli2, srv2
            if srv2.fileno() == fd:
                cli2.sendall(b"x")
                assert events(ep, QUIET) == {}      # not registered
                ep.register(srv2, IN)               # no FileExistsError
                assert events(ep) == {fd: IN}
        # A kernel socket registered, closed, its fd reused by a shm client:
        # not registered either.
        k = ss.StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        kfd = k.fileno()
        ep.register(k, IN | OUT)
        k.close()
        c3 = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
        with c3:
            if c3.fileno() == kfd:
                c3.connect(listener.getsockname())
                s3, _ = listener.accept()
                with s3:
                    s3.sendall(b"y")
                    assert kfd not in events(ep, QUIET)
    finally:
        ep.close()


# --------------------------------------------------------------------------- pyftpdlib

FTP_SERVER = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, DTPHandler
from pyftpdlib.servers import FTPServer
from pyftpdlib import ioloop
import shrimpio

assert ioloop.IOLoop is ioloop.Epoll
if sys.argv[2] != "sendfile":
    DTPHandler.use_sendfile = lambda self: False     # (os.sendfile: the escape's work)
auth = DummyAuthorizer()
auth.add_user("u", "p", sys.argv[1], perm="elradfmw")
FTPHandler.authorizer = auth
FTPHandler.passive_ports = None
server = FTPServer(("127.0.0.1", 0), FTPHandler)
print(server.socket.getsockname()[1], shrimpio.info(server.socket)["path"], flush=True)
server.serve_forever(timeout=0.5)
"""

FTP_CLIENT = r"""
import ftplib, hashlib, io, sys
import shrimpio
port, passive, size = int(sys.argv[1]), sys.argv[2] == "pasv", int(sys.argv[3])
ftp = ftplib.FTP()
ftp.connect("127.0.0.1", port, timeout=30)
ftp.login("u", "p")
ftp.set_pasv(passive)
paths = set()
real = ftp.ntransfercmd
def ntransfercmd(cmd, rest=None):
    conn, n = real(cmd, rest)
    paths.add(shrimpio.info(conn)["path"])
    return conn, n
ftp.ntransfercmd = ntransfercmd
data = bytes(range(256)) * (size // 256)
ftp.storbinary("STOR up.bin", io.BytesIO(data))
out = io.BytesIO()
ftp.retrbinary("RETR down.bin", out.write)
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(out.getvalue()).hexdigest(),
      shrimpio.info(ftp.sock)["path"], ",".join(sorted(paths)))
ftp.quit()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("passive", ["pasv", "port"])
def test_pyftpdlib_epoll_server_and_ftplib_client(tmp_path, passive):
    pytest.importorskip("pyftpdlib")
    size = 4 << 20
    root = tmp_path / "root"
    root.mkdir()
    down = os.urandom(size)
    (root / "down.bin").write_bytes(down)
    env = child_env()
    (tmp_path / "ftp_server.py").write_text(FTP_SERVER)
    (tmp_path / "ftp_client.py").write_text(FTP_CLIENT)
    server = subprocess.Popen([sys.executable, "-m", "shrimpio", "run", str(tmp_path / "ftp_server.py"),
                               str(root), "copy"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        port, path = server.stdout.readline().split()
        assert path == "shm"
        res = subprocess.run([sys.executable, "-m", "shrimpio", "run", str(tmp_path / "ftp_client.py"),
                              port, passive, str(size)], env=env, capture_output=True, text=True,
                             timeout=90)
        assert res.returncode == 0, res.stderr[-3000:]
        sent, got, ctl_path, data_paths = res.stdout.split()
        assert got == hashlib.sha256(down).hexdigest()
        assert (root / "up.bin").read_bytes() == bytes(range(256)) * (size // 256)
        assert sent == hashlib.sha256((root / "up.bin").read_bytes()).hexdigest()
        assert ctl_path == "shm" and data_paths == "shm"
    finally:
        server.kill()
        _, err = server.communicate(timeout=10)
        Registry.open().sweep()          # the killed server's entry
    assert "Traceback" not in err, err[-3000:]
