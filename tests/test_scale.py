"""A connection costs no more fds than a kernel TCP socket plus one per
side, and running short of fds behaves as TCP does: a client that cannot
get the fds shared memory needs connects by TCP ("fd limit"); a listener
out of fds says EMFILE as a kernel listener's accept() would, and loses no
client.  Real processes where the limit must be another process's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import shrimpio
from shrimpio.socket import socket as ShmSocket

from children import child_env


def _fds() -> int:
    """Open fds, less the registry's ports file (one per process while it
    has a client connection: shrimpio/_ports.py)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("/.ports"):
                continue
        except OSError:
            continue        # the listing's own fd, closed already
        n += 1
    return n


def test_one_fd_per_side_beyond_tcp():
    """Each end of a shared-memory connection holds two fds: its socket's
    (the control socket, also the data doorbell) and the space doorbell;
    kernel TCP holds one."""
    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    pairs = []
    try:
        from shrimpio import _connection
        _connection.drop_spares()
        before = _fds()
        for _ in range(20):
            c = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
            c.connect(lst.getsockname())
            s, _ = lst.accept()
            pairs.append((c, s))
        _connection.drop_spares()            # a process keeps one spare kit: not per connection
        assert all(shrimpio.info(x)["path"] == "shm" for p in pairs for x in p)
        assert _fds() - before == 20 * 4      # 2 per side, both sides in this process
        # A second object on the connection, closed first: the doorbell moves.
        c, s = pairs[0]
        c2 = c.dup()
        c.close()
        c2.sendall(b"still here")
        assert s.recv(100) == b"still here"
        s.sendall(b"and back")
        assert c2.recv(100) == b"and back"
        c2.close()
        assert s.recv(10) == b""
    finally:
        for p in pairs:
            for x in p:
                x.close()
        lst.close()


CLIENT = """
import resource, socket, sys, json
import shrimpio.patch, shrimpio
port, limit = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
socks, reasons, error = [], [], None
try:
    for i in range(200):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"%d\\n" % i)
        assert c.recv(100) == b"%d\\n" % i       # each connection works, whatever its path
        socks.append(c)
        reasons.append(shrimpio.info(c)["reason"] or "shm")
except OSError as exc:
    error = exc.errno
print(json.dumps({"reasons": reasons, "error": error}))
"""


def test_client_short_of_fds_connects_by_tcp(tmp_path):
    """A client that cannot open the fds shared memory needs (kit, registry
    socket) connects by kernel TCP, which needs none beyond its socket, and
    says why; it fails only where TCP itself would (EMFILE on socket())."""
    import json
    lst = socket.create_server(("127.0.0.1", 0))     # a kernel echo server: the client's peer
    port = lst.getsockname()[1]
    srv = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.close()
    srv.bind(("127.0.0.1", port))
    srv.listen(256)
    import threading
    stop = False
    served = []

    def serve():
        while not stop:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue            # (the timeout only lets it see `stop`: a loaded
                                    # host may take longer than that to start the client)
            except OSError:
                return
            served.append(conn)
            conn.sendall(conn.recv(100))

    srv.settimeout(1)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), str(port), "60"],
                             env=child_env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        reasons = out["reasons"]
        assert reasons.count("shm") >= 10, reasons
        assert reasons.count("fd limit") >= 10, reasons       # near the limit: TCP
        assert set(reasons) <= {"shm", "fd limit"}, reasons
        assert reasons.index("fd limit") > reasons.count("shm") - 1      # shm first, then TCP
        assert out["error"] == 24             # then EMFILE, from socket() itself
    finally:
        stop = True
        t.join(5)
        for c in served:
            c.close()
        srv.close()


SERVER = """
import resource, socket, sys, time
import shrimpio.patch
limit = int(sys.argv[1])
lst = socket.create_server(("127.0.0.1", 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(lst.getsockname()[1], flush=True)
held = []
errors = 0
while True:
    try:
        conn, _ = lst.accept()
    except OSError as exc:
        assert exc.errno == 24, exc
        errors += 1
        # Out of fds: as a server would, let some connections go.
        for c in held[:4]:
            c.close()
        del held[:4]
        continue
    data = conn.recv(100)
    conn.sendall(data)
    if data == b"bye\\n":
        break
    held.append(conn)
print("emfile", errors, flush=True)
"""


def test_listener_short_of_fds_says_emfile_and_loses_nobody(tmp_path):
    """A listener out of fds: accept() raises EMFILE as a kernel listener's
    would; the clients waiting are served once fds are free again, each
    with its bytes (one or two fds short, by TCP)."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER), "40"], env=child_env(),
                         stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        socks = []
        for i in range(40):
            c = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(30)
            c.connect(("127.0.0.1", port))
            c.sendall(b"%d\n" % i)
            socks.append(c)
        for i, c in enumerate(socks):
            assert c.recv(100) == b"%d\n" % i
        # Shared memory, or TCP for those the listener took one or two fds
        # short of its limit (the late fallback: test_fd_limit.py).
        paths = [(shrimpio.info(c)["path"], shrimpio.info(c)["reason"]) for c in socks]
        assert set(paths) <= {("shm", ""), ("tcp", "fd limit")}, paths
        assert ("shm", "") in paths, paths
        bye = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
        bye.settimeout(30)
        bye.connect(("127.0.0.1", port))
        bye.sendall(b"bye\n")
        assert bye.recv(100) == b"bye\n"
        bye.close()
        line = p.stdout.readline().split()
        assert line[0] == "emfile" and int(line[1]) >= 1, line
        assert p.wait(timeout=30) == 0
        for c in socks:
            c.close()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()

