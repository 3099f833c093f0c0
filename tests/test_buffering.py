"""A connection buffers like loopback TCP (docs/sockets.md, "Buffering").

A program that writes a few MB before it reads finishes over kernel TCP on
loopback, whose autotuned buffers take about 4 MB one way; over shared
memory it must finish too.  Each test runs for both kinds: ``tcp`` (plain
kernel sockets, the server a plain ``python``) and ``shm`` (a
``shrimpio.socket`` client, the server under ``python -m shrimpio run``);
the server is a real process, the segment real shared memory.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

import shrimpio.socket as ss
from shrimpio import _epoll, _poll
from children import child_env
from conftest import wait_for

KINDS = ("tcp", "shm")

#: The upload of the "write before reading" tests: less than what loopback
#: TCP takes one way (about 3.9 MB here), far more than 256 KiB.
UPLOAD = 3 * 1000 * 1000

#: The last test's bytes of a connection at rest: its first page (headers
#: and small areas), a few pages of slack.
AT_REST = 16 * 4096

#: The answer a server writes before it reads a request's body.
ANSWER = 2 * 1024 * 1024

DEADLINE = 30.0

#: A plain stdlib server for one connection.  ``echo``: echoes until EOF.
#: ``hold``: reads nothing until a ``drain N`` line on stdin, then reads N
#: bytes, says ``drained``, and sends ``done`` and closes on the next line.
#: ``respond``: reads a ``PUT N`` line, writes ANSWER bytes, then reads the
#: N bytes of the body and answers ``got N``.
SERVER = '''
import socket
import sys

mode = sys.argv[1]
srv = socket.create_server(("127.0.0.1", 0))
print("port", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
srv.close()
if mode == "echo":
    while data := conn.recv(1 << 16):
        conn.sendall(data)
elif mode == "respond":
    f = conn.makefile("rb")
    want = int(f.readline().split()[1])
    conn.sendall(bytes(range(256)) * (%d // 256))
    got = len(f.read(want))
    conn.sendall(b"got %%d" %% got)
    f.close()
else:
    print("accepted", flush=True)
    want = int(sys.stdin.readline().split()[1])
    got = 0
    while got < want:
        data = conn.recv(1 << 16)
        assert data, got
        got += len(data)
    print("drained", got, flush=True)
    sys.stdin.readline()
    conn.sendall(b"done")
conn.close()
''' % ANSWER


class Server:
    """The server program in a child: plain ``python`` for tcp, under
    ``shrimpio run`` for shm."""

    def __init__(self, kind: str, mode: str, tmp) -> None:
        path = tmp / "server.py"
        path.write_text(SERVER)
        run = [sys.executable] if kind == "tcp" else [sys.executable, "-m", "shrimpio", "run"]
        env = child_env(drop=[k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"])
        self.proc = subprocess.Popen(run + [str(path), mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.port = int(self.line().split()[1])

    def line(self, timeout: float = DEADLINE) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "server said nothing"
        return self.proc.stdout.readline().strip()

    def tell(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def server(tmp_path):
    made = []

    def start(kind: str, mode: str) -> Server:
        s = Server(kind, mode, tmp_path)
        made.append(s)
        return s
    yield start
    for s in made:
        s.close()


def connect(kind: str, port: int, sndbuf: int = 0) -> socket.socket:
    """A client socket of the kind, connected; ``sndbuf``: SO_SNDBUF set
    before the connect."""
    sock = socket.socket() if kind == "tcp" else ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", port))
    if kind == "shm":
        assert ss.info(sock)["path"] == "shm", ss.info(sock)
    return sock


def payload(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def fill(sock: socket.socket) -> int:
    """Non-blocking sends until EAGAIN, then a send that may wait a
    moment for room (TCP moves bytes from the send buffer to the peer's
    receive buffer as it goes), until one takes nothing.  Bytes taken."""
    chunk = b"f" * (1 << 16)
    sent = 0
    while True:
        sock.setblocking(False)
        try:
            while True:
                sent += sock.send(chunk)
        except BlockingIOError:
            pass
        sock.settimeout(0.5)
        try:
            sent += sock.send(chunk)
        except TimeoutError:
            return sent


@pytest.mark.parametrize("kind", KINDS)
def test_upload_before_reading_the_echo(kind, server):
    """A client sends 3 MB to an echo server and reads the echo only
    afterwards: both directions' buffers take it, as over TCP."""
    srv = server(kind, "echo")
    data = payload(UPLOAD)
    with connect(kind, srv.port) as sock:
        sock.sendall(data)             # (the old 256 KiB rings: TimeoutError)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == data
    srv.proc.wait(DEADLINE)
    assert srv.proc.returncode == 0


@pytest.mark.parametrize("kind", KINDS)
def test_response_before_reading_the_request(kind, server):
    """A server writes a 2 MB answer after a request's first line, before
    it reads the rest (3 MB) of the request; the client sends the whole
    request before it reads the answer."""
    srv = server(kind, "respond")
    body = payload(UPLOAD)
    with connect(kind, srv.port) as sock:
        sock.sendall(b"PUT %d\n" % len(body) + body)    # (the old 256 KiB rings: TimeoutError)
        answer = recv_all(sock)
    assert answer == payload(ANSWER) + b"got %d" % len(body)
    srv.proc.wait(DEADLINE)
    assert srv.proc.returncode == 0


def _taken_without_a_reader(server, kind: str, sndbuf: int = 0) -> int:
    """What a non-blocking sender gets in before EAGAIN while its peer
    does not read (then the peer reads it all and answers)."""
    srv = server(kind, "hold")
    with connect(kind, srv.port, sndbuf) as sock:
        assert srv.line() == "accepted"
        taken = fill(sock)
        srv.tell("drain %d" % taken)
        assert srv.line() == "drained %d" % taken
        srv.tell("reply")
        sock.setblocking(True)
        sock.settimeout(DEADLINE)
        assert recv_all(sock) == b"done"
    srv.proc.wait(DEADLINE)
    return taken


def test_nonblocking_sender_takes_what_tcp_takes(server):
    """A non-blocking sender whose peer does not read gets EAGAIN after
    about as many bytes as over loopback TCP (measured here, same test)."""
    taken = {kind: _taken_without_a_reader(server, kind) for kind in KINDS}
    assert taken["tcp"] > 1 << 20, taken          # (loopback TCP autotunes up to tcp_wmem[2])
    assert taken["shm"] >= taken["tcp"] * 3 // 4, taken


@pytest.mark.parametrize("kind", KINDS)
def test_sndbuf_set_before_connect_still_bounds_the_sender(kind, server):
    """SO_SNDBUF set before connect() still chooses a smaller buffer: the
    ring of that size (docs/sockets.md), kernel TCP's of about it."""
    taken = _taken_without_a_reader(server, kind, sndbuf=1 << 16)
    assert 0 < taken < 1 << 20, taken
    if kind == "shm":
        assert taken == 1 << 16


def _segment_bytes(sock) -> int:
    """Bytes of memory the connection's segment holds, in both processes:
    the memfd's allocated blocks (through the mapping's entry in
    /proc/self/map_files, root only), else the pages it has mapped here
    (this process writes them all: it is the producer)."""
    seg = sock._conn().segment
    view = memoryview(seg)
    try:
        cell = ctypes.c_char.from_buffer(view)
        addr = ctypes.addressof(cell)
        del cell
    finally:
        view.release()
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        first = line.split()[0]
        if "-" not in first or ":" in first:
            continue
        start, end = (int(x, 16) for x in first.split("-"))
        if start <= addr < end:
            break
    else:
        raise AssertionError("no mapping holds the segment")
    try:
        return os.stat("/proc/self/map_files/%s" % first).st_blocks * 512
    except PermissionError:
        rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
        return int(rss.split()[1]) * 1024


def test_memory_is_given_back_after_a_burst(server):
    """A burst of 3 MB to a peer that reads it later is held in pages of
    the segment, which go back to the system once it is read and the
    sender waits (here: for the server's answer, in a blocking recv)."""
    srv = server("shm", "hold")
    with connect("shm", srv.port) as sock:
        assert srv.line() == "accepted"
        rest = _segment_bytes(sock)
        assert rest <= AT_REST, rest
        sock.setblocking(False)
        data = payload(UPLOAD)
        sent = 0
        while sent < len(data):
            sent += sock.send(data[sent:])     # (the old 256 KiB rings: BlockingIOError)
        assert _segment_bytes(sock) >= UPLOAD
        sock.settimeout(DEADLINE)
        got = []
        waiter = threading.Thread(target=lambda: got.append(recv_all(sock)))
        waiter.start()
        try:
            srv.tell("drain %d" % UPLOAD)
            assert srv.line() == "drained %d" % UPLOAD
            wait_for(lambda: _segment_bytes(sock) <= AT_REST, timeout=DEADLINE,
                     what="the drained burst's pages to go back")
        finally:
            srv.tell("reply")
            waiter.join(DEADLINE)
        assert got == [b"done"]
    srv.proc.wait(DEADLINE)


@pytest.mark.parametrize("waiter", ["select", "poll", "epoll"])
def test_memory_is_given_back_to_a_program_that_waits_in_a_poller(server, waiter):
    """As above, for a program that waits in select, poll or epoll (a
    selectors loop, tornado's) rather than in a receive: its wait gives
    the drained burst's pages back too (shrimpio._connection.trim_idle)."""
    srv = server("shm", "hold")
    with connect("shm", srv.port) as sock:
        assert srv.line() == "accepted"
        sock.setblocking(False)
        data = payload(UPLOAD)
        sent = 0
        while sent < len(data):
            sent += sock.send(data[sent:])
        assert _segment_bytes(sock) >= UPLOAD
        srv.tell("drain %d" % UPLOAD)
        assert srv.line() == "drained %d" % UPLOAD
        if waiter == "select":
            wait = lambda: any(_poll.select([sock], [], [], 0.05))         # noqa: E731
        elif waiter == "poll":
            p = _poll.poll()
            p.register(sock, select.POLLIN)
            wait = lambda: bool(p.poll(50))                               # noqa: E731
        else:
            ep = _epoll.epoll()
            ep.register(sock.fileno(), select.EPOLLIN)
            wait = lambda: bool(ep.poll(0.05))                            # noqa: E731

        def waited_and_given_back() -> bool:
            assert not wait()           # nothing to read: the wait slept in the kernel
            return _segment_bytes(sock) <= AT_REST
        try:
            wait_for(waited_and_given_back, timeout=DEADLINE,
                     what="the drained burst's pages to go back")
        finally:
            if waiter == "epoll":
                ep.close()
            srv.tell("reply")
    srv.proc.wait(DEADLINE)
