"""A connection whose fd leaves shrimpio's hands escapes to a kernel stream
(shrimpio/_escape.py): raw reads and writes of the fd, an fd sent to another
process or given to an exec'd program, never lose a byte, and the peer
stays on shared memory.  The peer runs in another process wherever the
behaviour depends on it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import shrimpio
import shrimpio.patch
from shrimpio import _escape
from shrimpio.socket import socket as ShmSocket

from children import child_env
from conftest import wait_for
from result_thread import ResultThread

shrimpio.patch.disable()        # importing it enabled it; the fixture below chooses

BIG = 3 * 1024 * 1024 + 17


@pytest.fixture
def patched():
    shrimpio.patch.enable()
    try:
        yield
    finally:
        shrimpio.patch.disable()


@pytest.fixture
def listener():
    srv = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv
    srv.close()


def pair(srv):
    c = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect(srv.getsockname())
    s, _ = srv.accept()
    assert shrimpio.info(c)["path"] == shrimpio.info(s)["path"] == "shm"
    return c, s


def read_exactly(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relays_done():
    wait_for(lambda: _escape.relay_count() == 0, timeout=10, what="the relay to let go")


def peer_process(script: str, *args: str, **popen) -> subprocess.Popen:
    """A child python running ``script`` (shrimpio importable)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            env=child_env(), **popen)


# -- detach -----------------------------------------------------------------------


def test_detach_raw_io_keeps_every_byte_in_order(listener):
    """Bytes in the ring when the fd escapes come first, then the rest;
    raw writes reach the peer; large transfers both ways are whole."""
    c, s = pair(listener)
    s.sendall(b"in the ring before detach")
    fd = c.detach()
    try:
        assert _escape.relay_count() == 1
        assert read_exactly(fd, 25) == b"in the ring before detach"
        write_all(fd, b"raw write")
        assert s.recv(100) == b"raw write"
        big = os.urandom(BIG)
        t = ResultThread(s.sendall, big)
        t.start()
        assert read_exactly(fd, BIG) == big
        t.result(timeout=10)
        t = ResultThread(write_all, fd, big)
        t.start()
        got = bytearray()
        while len(got) < BIG:
            got += s.recv(1 << 20)
        t.result(timeout=10)
        assert got == big
    finally:
        os.close(fd)
    assert s.recv(10) == b""                  # the program closed it: EOF
    # And nobody reads any more: EPIPE, or (as over TCP, from a peer that
    # closed with bytes of ours unread: the relay may have taken a send
    # before it saw the program's close) ECONNRESET; at the latest once
    # more than a ring's worth went (docs/sockets.md: dropped up to a
    # ring's worth, when the relay has not run meanwhile).
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(2 * s._shm.tx.capacity // 65536 + 1):
            s.sendall(b"x" * 65536)
    s.close()
    relays_done()


def test_detached_fd_is_a_real_kernel_stream(listener):
    """Whatever inspects the escaped fd finds a connected TCP socket, and
    the object made on it says why it left shared memory."""
    c, s = pair(listener)
    s.sendall(b"x")                           # bytes moved: no taking it back
    peer = c.getpeername()
    fd = c.detach()
    try:
        assert read_exactly(fd, 1) == b"x"
        raw = socket.socket(fileno=os.dup(fd))    # the stdlib class, unpatched
        try:
            assert isinstance(raw, shrimpio.socket.StdSocket)
            assert raw.family == socket.AF_INET and raw.type == socket.SOCK_STREAM
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            raw.close()
        again = ShmSocket(fileno=fd)
        fd = -1
        try:
            info = shrimpio.info(again)
            assert info["path"] == "tcp" and info["reason"] == "fd escaped: detach()"
            assert again.getpeername() == peer      # the connection's, not loopback's
            again.sendall(b"after")
            assert s.recv(10) == b"after"
        finally:
            again.close()
    finally:
        if fd >= 0:
            os.close(fd)
    s.close()
    relays_done()


def test_socket_from_detached_fd_before_data_keeps_shared_memory(listener):
    """socket.socket(fileno=sock.detach()) costs nothing: no byte moved, so
    the connection goes back onto shared memory."""
    c, s = pair(listener)
    c2 = ShmSocket(fileno=c.detach())
    try:
        assert shrimpio.info(c2)["path"] == "shm"
        assert _escape.relay_count() == 0
        c2.sendall(b"ping")
        assert s.recv(10) == b"ping"
        s.sendall(b"pong")
        assert c2.recv(10) == b"pong"
    finally:
        c2.close()
        s.close()


def test_peer_death_after_escape_reads_eof(listener):
    """A peer that dies: the escaped fd reads what was sent, then EOF."""
    port = listener.getsockname()[1]
    child = peer_process("""
        import os, signal, sys, socket
        from shrimpio.socket import socket as S
        c = S(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(("127.0.0.1", int(sys.argv[1])))
        c.sendall(b"last words")
        c.recv(1)
        os.kill(os.getpid(), signal.SIGKILL)
    """, str(port))
    try:
        s, _ = listener.accept()
        assert shrimpio.info(s)["path"] == "shm"
        fd = s.detach()
        try:
            assert read_exactly(fd, 10) == b"last words"
            write_all(fd, b"!")
            assert child.wait(timeout=10) == -9
            assert os.read(fd, 100) == b""
        finally:
            os.close(fd)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    relays_done()


# -- whole programs ------------------------------------------------------------------

MPC = """
import hashlib, sys, multiprocessing.connection as mpc
if sys.argv[1] == "server":
    with mpc.Listener(("127.0.0.1", 0), authkey=b"k") as l:
        print(l.address[1], flush=True)
        with l.accept() as c:
            while True:
                try:
                    x = c.recv()
                except EOFError:
                    break
                c.send(("echo", hashlib.sha256(x["blob"]).hexdigest(), x["i"]))
else:
    with mpc.Client(("127.0.0.1", int(sys.argv[2])), authkey=b"k") as c:
        for i in range(20):
            blob = bytes([i]) * (i * 50000)
            c.send({"i": i, "blob": blob})
            tag, digest, j = c.recv()
            assert (tag, digest, j) == ("echo", hashlib.sha256(blob).hexdigest(), i)
        print("done", flush=True)
"""


def test_multiprocessing_connection_between_patched_processes(tmp_path):
    """multiprocessing.connection (Listener/Client detach their sockets and
    read the fds directly) works between two patched processes, and says
    which path it took."""
    report = tmp_path / "report.jsonl"
    script = tmp_path / "mpc.py"
    script.write_text(MPC)
    env = child_env({"SHRIMPIO_REPORT": str(report)})
    cmd = [sys.executable, "-m", "shrimpio", "run", str(script)]
    server = subprocess.Popen(cmd + ["server"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        assert port.isdigit(), port
        client = subprocess.run(cmd + ["client", port], env=env, capture_output=True, text=True,
                                timeout=60)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "done"
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
    records = [json.loads(line) for line in report.read_text().splitlines()]
    ends = [r for r in records if port in (str(r["local"][1]), str(r["peer"][1]))]
    assert len(ends) == 2, records
    assert all(r["path"] == "shm" for r in ends), ends      # they never escaped
    assert _sum_sent(ends) == _sum_received(ends) > 20 * 50000


def _sum_sent(records):
    return sum(r["bytes_sent"] for r in records)


def _sum_received(records):
    return sum(r["bytes_received"] for r in records)


def run_pair(tmp_path, script_text: str, timeout: float = 60) -> list[dict]:
    """Run ``script_text`` as ``server`` (which prints its port) and then as
    ``client <port>``, both under ``shrimpio run``; the report's records."""
    report = tmp_path / "report.jsonl"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(script_text))
    env = child_env({"SHRIMPIO_REPORT": str(report)})
    cmd = [sys.executable, "-m", "shrimpio", "run", str(script)]
    # Its own process group: children it starts go with it, whatever happens.
    server = subprocess.Popen(cmd + ["server"], env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        port = server.stdout.readline().strip()
        assert port.isdigit(), port
        client = subprocess.run(cmd + ["client", port], env=env, capture_output=True, text=True,
                                timeout=timeout)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip().endswith("done"), client.stdout
        assert server.wait(timeout=timeout) == 0
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
        server.stdout.close()
    return [json.loads(line) for line in report.read_text().splitlines()]


MANAGER = """
import sys
from multiprocessing.managers import BaseManager, DictProxy

shared = {}

class M(BaseManager):
    pass

M.register("get", callable=lambda: shared, proxytype=DictProxy)

if sys.argv[1] == "server":
    m = M(address=("127.0.0.1", 0), authkey=b"k")
    server = m.get_server()
    print(server.address[1], flush=True)
    server.serve_forever()
else:
    m = M(address=("127.0.0.1", int(sys.argv[2])), authkey=b"k")
    m.connect()
    d = m.get()
    for i in range(200):
        d[i] = str(i) * 10
    assert sum(len(d[i]) for i in range(200)) == sum(len(str(i)) * 10 for i in range(200))
    assert len(d) == 200
    import multiprocessing.connection as mc, multiprocessing.managers as mm
    conn = mc.Client(("127.0.0.1", int(sys.argv[2])), authkey=b"k")
    try:
        mm.dispatch(conn, None, "shutdown")       # the server exits
    except EOFError:
        pass
    conn.close()
    print("done", flush=True)
"""


def test_multiprocessing_managers_over_shared_memory(tmp_path):
    """A BaseManager server and a client using a shared dict through its
    proxies: every connection between them is on shared memory."""
    records = run_pair(tmp_path, MANAGER)
    tcp = [r for r in records if r["path"] != "shm"]
    assert not tcp, tcp
    assert len(records) >= 4, records      # the proxy's and the dispatcher's, both ends


SPAWN = """
import hashlib, multiprocessing as mp, socket, sys

def child(sock, n):
    data = b""
    while len(data) < n:
        data += sock.recv(1 << 20)
    sock.sendall(hashlib.sha256(data).hexdigest().encode())
    sock.close()

if __name__ == "__main__":
    if sys.argv[1] == "server":
        srv = socket.create_server(("127.0.0.1", 0))
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        n = int(conn.recv(16).decode().strip())
        p = mp.get_context("spawn").Process(target=child, args=(conn, n))
        p.start()
        conn.close()
        p.join()
        assert p.exitcode == 0
        srv.close()
    else:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
        data = bytes(range(256)) * 4096
        c.sendall(b"%-16d" % len(data))
        c.sendall(data)
        assert c.recv(100).decode() == hashlib.sha256(data).hexdigest()
        print("done", flush=True)
"""


def test_socket_passed_to_a_spawned_process(tmp_path):
    """A connected socket given to a multiprocessing spawn child (pickled:
    its fd passes to the child): the child reads the stream and answers."""
    records = run_pair(tmp_path, SPAWN)
    server_side = [r for r in records if r["path"] == "tcp"]
    assert any(r["reason"] == "fd escaped: fd given to a child process" for r in server_side), records


HANDOFF_CHILD = """
import socket, sys
from multiprocessing import reduction
u = socket.socket(fileno=int(sys.argv[1]))
fd = reduction.recv_handle(u)
u.close()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fd)
got = b""
while not got.endswith(b"."):
    got += s.recv(100)
s.sendall(b"child got " + got)
s.close()
"""


def test_fd_sent_to_another_process_keeps_the_stream(listener, patched):
    """An accepted connection handed to another process by SCM_RIGHTS
    (multiprocessing.reduction.send_handle): bytes already in the ring, and
    those sent after, reach the new owner; its answer reaches the peer."""
    from multiprocessing import reduction
    c, s = pair(listener)
    c.sendall(b"early ")
    a, b = socket.socketpair()
    child = peer_process(HANDOFF_CHILD, str(b.fileno()), pass_fds=[b.fileno()])
    try:
        b.close()
        reduction.send_handle(a, s.fileno(), child.pid)
        info = shrimpio.info(s)
        assert info["path"] == "tcp" and info["reason"] == "fd escaped: fd sent to another process"
        s.close()
        c.sendall(b"and late.")
        got = b""
        while not got.endswith(b"late."):
            chunk = c.recv(100)
            assert chunk
            got += chunk
        assert got == b"child got early and late."
        assert child.wait(timeout=30) == 0
        assert c.recv(10) == b""
        assert shrimpio.info(c)["path"] == "shm"       # the peer never left shared memory
    finally:
        a.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        c.close()
    relays_done()


def test_fd_given_to_an_exec_program(listener, patched):
    """subprocess with the connection as an exec'd program's stdin and
    stdout: cat echoes the stream back."""
    c, s = pair(listener)
    proc = subprocess.Popen(["cat"], stdin=s, stdout=s)
    try:
        s.close()
        data = os.urandom(300000)
        t = ResultThread(c.sendall, data)
        t.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = c.recv(65536)
            assert chunk
            got += chunk
        t.result(timeout=10)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(10) == b""                      # cat saw EOF and exited
        assert got == data
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        c.close()
    relays_done()


def test_writer_that_exits_at_once_delivers_everything(listener):
    """A process writes to an escaped fd and exits: what it wrote still
    reaches the peer (as a kernel socket's would after the exit)."""
    port = listener.getsockname()[1]
    child = peer_process("""
        import os, sys, socket
        from shrimpio.socket import socket as S
        c = S(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(("127.0.0.1", int(sys.argv[1])))
        fd = c.detach()
        data = bytes(range(256)) * 8192
        v = memoryview(data)
        while v:
            v = v[os.write(fd, v):]
    """, str(port))
    try:
        s, _ = listener.accept()
        got = bytearray()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        assert child.wait(timeout=10) == 0
        assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(range(256)) * 8192).digest()
        s.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


# -- sendfile ---------------------------------------------------------------------------


def test_sendfile_into_shared_memory(listener, patched, tmp_path):
    """socket.sendfile and os.sendfile deliver every byte and stay on
    shared memory."""
    path = tmp_path / "f.bin"
    data = os.urandom(BIG)
    path.write_bytes(data)
    c, s = pair(listener)
    try:
        with open(path, "rb") as f:
            t = ResultThread(c.sendfile, f, 5, BIG - 10)
            t.start()
            got = bytearray()
            while len(got) < BIG - 10:
                got += s.recv(1 << 20)
            assert t.result(timeout=10) == BIG - 10
            assert got == data[5:BIG - 5]
            assert f.tell() == BIG - 5
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.sendfile(c.fileno(), fd, 100, 5000) == 5000
            got = bytearray()
            while len(got) < 5000:
                got += s.recv(5000)
            assert got == data[100:5100]
            os.lseek(fd, 7, os.SEEK_SET)
            assert os.sendfile(c.fileno(), fd, None, 3) == 3       # from the file's position
            assert os.lseek(fd, 0, os.SEEK_CUR) == 10
            assert s.recv(10) == data[7:10]
        finally:
            os.close(fd)
        assert shrimpio.info(c)["path"] == "shm"
    finally:
        c.close()
        s.close()


def test_os_sendfile_on_a_socket_with_a_timeout_waits_for_room(listener, patched, tmp_path):
    """A socket with a timeout has a non-blocking fd (Python waits itself):
    os.sendfile into it waits for room in the ring up to the timeout, rather
    than failing with EAGAIN whenever the ring is full (a kernel socket's
    buffer, which grows to megabytes, would rarely be)."""
    path = tmp_path / "f.bin"
    data = os.urandom(BIG)
    path.write_bytes(data)
    c, s = pair(listener)
    c.settimeout(10)
    try:
        reader = ResultThread(lambda: b"".join(iter(lambda: s.recv(1 << 20), b"")))
        reader.start()
        with open(path, "rb") as f:
            sent = 0
            while sent < BIG:
                sent += os.sendfile(c.fileno(), f.fileno(), sent, BIG - sent)
        c.shutdown(socket.SHUT_WR)
        assert reader.result(timeout=20) == data
    finally:
        c.close()
        s.close()


def test_os_read_and_write_of_the_fd_use_the_rings(listener, patched):
    """``os.read``/``os.write`` of a connection's fd are the socket's recv
    and send (as the kernel's read and write of a socket are): the bytes
    come from and go to the rings, not the doorbell; the connection stays
    on shared memory; a non-blocking fd (a socket with a timeout) says
    EAGAIN when there is nothing, as the kernel's does."""
    c, s = pair(listener)
    try:
        c.sendall(b"hello raw")
        assert os.read(s.fileno(), 100) == b"hello raw"
        assert os.write(s.fileno(), b"back raw") == 8
        assert c.recv(100) == b"back raw"
        blob = os.urandom(BIG)
        t = ResultThread(lambda: c.sendall(blob))
        t.start()
        got = bytearray()
        while len(got) < len(blob):
            got += os.read(s.fileno(), 1 << 20)
        t.result(timeout=30)
        assert bytes(got) == blob
        s.settimeout(5)
        with pytest.raises(BlockingIOError):
            os.read(s.fileno(), 10)
        assert shrimpio.info(s)["path"] == "shm"
        c.close()
        assert os.read(s.fileno(), 10) == b""             # end of stream
    finally:
        c.close()
        s.close()


def test_fd_opened_as_a_file_escapes(listener, patched):
    """``os.fdopen``/``open`` of a connection's fd make a file object that
    reads the fd in C: the connection escapes to a kernel stream first, the
    bytes already in the ring come first, and the peer stays on shared
    memory."""
    c, s = pair(listener)
    try:
        c.sendall(b"before ")
        with os.fdopen(s.fileno(), "rb", buffering=0, closefd=False) as f:
            assert shrimpio.info(s)["reason"] == "fd escaped: fd opened as a file"
            c.sendall(b"after")
            got = b""
            while len(got) < 12:
                got += f.read(100)
            assert got == b"before after"
        assert shrimpio.info(c)["path"] == "shm"
    finally:
        c.close()
        s.close()
