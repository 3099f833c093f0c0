"""``shrimpio stat`` lists the listeners and connections of every shrimpio
process of this user, live, from another process: pid and program,
addresses, path and fallback reason, bytes each way, ring fill and who
waits.  The programs are real processes that did nothing special (they
run under ``import shrimpio.patch``); stat is the real command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from children import child_env
from conftest import wait_for

pytestmark = pytest.mark.timeout(120)

SERVER = """
import shrimpio.patch, socket, sys
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen()
print(lst.getsockname()[1], flush=True)
c, _ = lst.accept()
got = 0
while got < 3000:
    got += len(c.recv(65536))
print("read", got, flush=True)
sys.stdin.readline()
while got < 8000:
    got += len(c.recv(65536))
print("read", got, flush=True)
print("eof" if c.recv(1) == b"" else "data?", flush=True)   # blocks until the client closes
sys.stdin.readline()
"""

CLIENT = """
import shrimpio.patch, socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(c.getsockname()[1], flush=True)
c.sendall(b"a" * 3000)
sys.stdin.readline()
c.sendall(b"b" * 5000)             # bytes the server does not read yet: ring fill
print("sent", flush=True)
sys.stdin.readline()
c.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def _start(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=child_env(env))


def _stat(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "shrimpio", "stat", "--json", *args],
                         capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _entries(res: dict, pid: int) -> list[dict]:
    return [e for p in res["processes"] if p["pid"] == pid for e in p["entries"]]


def _finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def _tell(p: subprocess.Popen, expect: str) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == expect


def _pair(res: dict, server: int, client: int) -> tuple[dict, dict]:
    (srv,) = [e for e in _entries(res, server) if e["kind"] == "shm"]
    (cli,) = [e for e in _entries(res, client) if e["kind"] == "shm"]
    return srv, cli


def test_stat_lists_both_ends_of_a_connection_live():
    server = _start(SERVER)
    client = None
    try:
        port = server.stdout.readline().strip()
        client = _start(CLIENT, port)
        cport = client.stdout.readline().strip()
        assert server.stdout.readline().split() == ["read", "3000"]

        res = _stat()
        (lst,) = [e for e in _entries(res, server.pid) if e["kind"] == "listen"]
        assert lst["local"] == f"127.0.0.1:{port}"
        srv, cli = _pair(res, server.pid, client.pid)
        assert (srv["local"], srv["peer"]) == (f"127.0.0.1:{port}", f"127.0.0.1:{cport}")
        assert (cli["local"], cli["peer"]) == (srv["peer"], srv["local"])
        assert cli["bytes_sent"] == srv["bytes_received"] == 3000
        assert cli["bytes_received"] == srv["bytes_sent"] == 0
        assert cli["send_fill"] == srv["receive_fill"] == 0
        assert cli["peer_pid"] == server.pid and srv["peer_pid"] == client.pid
        assert srv["reason"] == cli["reason"] == ""
        prog = next(p for p in res["processes"] if p["pid"] == client.pid)["program"]
        assert "shrimpio.patch" in prog

        # Bytes the server has not read yet: the ring's fill, from outside.
        _tell(client, "sent")
        srv, cli = _pair(_stat(), server.pid, client.pid)
        assert cli["bytes_sent"] == 8000 and srv["bytes_received"] == 3000
        assert cli["send_fill"] == srv["receive_fill"] == 5000

        # The server reads them, then blocks in a recv: seen as it happens.
        _tell(server, "read 8000")

        def blocked():
            srv, cli = _pair(_stat(), server.pid, client.pid)
            return (srv, cli) if srv["blocked_receiving"] else None
        srv, cli = wait_for(blocked, timeout=30, interval=0.05, what="the server blocked in recv")
        assert srv["bytes_received"] == 8000 and cli["send_fill"] == 0
        assert not cli["blocked_receiving"] and not cli["blocked_sending"]

        _tell(client, "closed")
        assert server.stdout.readline().strip() == "eof"
        # A closed connection leaves the listing at once.
        assert [e["kind"] for e in _entries(_stat(), client.pid)] == []
    finally:
        _finish(*(p for p in (client, server) if p is not None))
    res = _stat()
    assert _entries(res, server.pid) == [] and _entries(res, client.pid) == []


TCP_PAIR = """
import shrimpio.patch, socket, sys
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen()
c = socket.create_connection(lst.getsockname())
s, _ = lst.accept()
print(c.getsockname()[1], lst.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def test_stat_shows_tcp_fallbacks_with_their_reason():
    p = _start(TCP_PAIR, env={"SHRIMPIO_DISABLE": "1"})
    try:
        cport, port = p.stdout.readline().split()
        entries = _entries(_stat(), p.pid)
        assert sorted((e["kind"], e["local"], e["peer"], e["reason"]) for e in entries) == sorted([
            ("tcp", f"127.0.0.1:{cport}", f"127.0.0.1:{port}", "disabled"),
            ("tcp", f"127.0.0.1:{port}", f"127.0.0.1:{cport}", "disabled")])
        assert all(e["bytes_sent"] is None for e in entries)      # the kernel's, not ours
    finally:
        _finish(p)


TLS_PAIR = """
import shrimpio.patch, socket, ssl, sys, threading, trustme
ca = trustme.CA()
server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
client_ctx = ssl.create_default_context()
ca.configure_trust(client_ctx)
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen()
c = socket.create_connection(lst.getsockname())
s, _ = lst.accept()
held = {}
t = threading.Thread(target=lambda: held.update(tls=server_ctx.wrap_socket(s, server_side=True)))
t.start()
tc = client_ctx.wrap_socket(c, server_hostname="127.0.0.1")
t.join()
tc.sendall(b"x" * 100)
assert held["tls"].recv(100)
ci, si = shrimpio.info(tc), shrimpio.info(held["tls"])
print(ci["bytes_sent"], ci["bytes_received"], si["bytes_sent"], si["bytes_received"], flush=True)
print(tc.getsockname()[1], lst.getsockname()[1], flush=True)
sys.stdin.readline()
tc.close()
held["tls"].close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_stat_lists_tls_connections_over_tcp():
    """A connection on kernel TCP wrapped in TLS is still listed (the TLS
    socket takes over the slot of the socket it wraps), with the kernel's
    byte counts in shrimpio.info, and leaves the listing when the TLS
    socket closes."""
    p = _start(TLS_PAIR, env={"SHRIMPIO_DISABLE": "1"})
    try:
        # shrimpio.info counts what crossed the kernel (OpenSSL moved it,
        # ciphertext): the two ends agree, and it is more than the payload.
        c_sent, c_received, s_sent, s_received = map(int, p.stdout.readline().split())
        assert (c_sent, c_received) == (s_received, s_sent)
        assert c_sent > 100 and s_sent > 0
        cport, port = p.stdout.readline().split()
        entries = _entries(_stat(), p.pid)
        assert sorted((e["kind"], e["local"], e["peer"], e["reason"]) for e in entries) == sorted([
            ("tcp", f"127.0.0.1:{cport}", f"127.0.0.1:{port}", "disabled"),
            ("tcp", f"127.0.0.1:{port}", f"127.0.0.1:{cport}", "disabled")])
        _tell(p, "closed")
        assert _entries(_stat(), p.pid) == []
    finally:
        _finish(p)


def test_a_killed_listener_leaves_a_stale_entry_that_stat_sweeps(registry):
    server = _start(SERVER)
    try:
        port = server.stdout.readline().strip()
        assert any(e["kind"] == "listen" for e in _entries(_stat(), server.pid))
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        res = _stat("--no-sweep")
        assert [s["entry"] for s in res["stale"]] == [f"tcp4-127.0.0.1-{port}"]
        assert _entries(res, server.pid) == []          # its table went with it
        res = _stat()
        assert [s["entry"] for s in res["stale"]] == [f"tcp4-127.0.0.1-{port}"]
        assert _stat()["stale"] == []                    # removed
    finally:
        _finish(server)


HOSTILE = """
import mmap, os, sys
fd = os.memfd_create("shrimpio-stat")
how = sys.argv[1]
if how == "garbage":
    os.ftruncate(fd, 4096 + 256 * 4)
    os.pwrite(fd, os.urandom(4096 + 256 * 4), 0)
elif how == "slots":
    os.ftruncate(fd, 4096 + 256 * 4)
    os.pwrite(fd, b"SHRSTAT1" + (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
              + os.getpid().to_bytes(8, "little"), 0)
    for i in range(4):           # live slots full of garbage
        os.pwrite(fd, (1).to_bytes(4, "little") + (i % 4).to_bytes(4, "little") + os.urandom(248),
                  4096 + 256 * i)
else:
    os.ftruncate(fd, 1000)       # an impossible size
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["garbage", "slots", "size"])
def test_a_hostile_table_is_reported_not_trusted(how):
    p = _start(HOSTILE, how)
    try:
        assert p.stdout.readline().strip() == "ready"
        res = _stat()
        mine = [q for q in res["processes"] if q["pid"] == p.pid]
        if how == "slots":
            (q,) = mine
            assert not q["error"] and 1 <= len(q["entries"]) <= 3     # kinds 1-3 of 0-3
            for e in q["entries"]:
                assert e["kind"] in ("shm", "tcp", "listen")
                assert isinstance(e["local"], str) and len(e["local"]) <= 64   # at most its field
        else:
            (q,) = mine
            assert q["error"] and q["entries"] == []
        text = subprocess.run([sys.executable, "-m", "shrimpio", "stat"], capture_output=True,
                              text=True, env=child_env(), timeout=60)
        assert text.returncode == 0, text.stderr
        assert str(p.pid) in text.stdout
    finally:
        _finish(p)


def test_a_process_holds_one_fd_for_its_table():
    """However many listeners and connections, one fd on the table (the
    mapping's: Python's mmap keeps its own duplicate of the fd it maps)."""
    from shrimpio.socket import socket as ShmSocket
    import socket

    def table_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:shrimpio-stat")
            except OSError:
                pass
        return n

    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    pairs = []
    try:
        for _ in range(100):             # several pages of slots
            c = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
            c.connect(lst.getsockname())
            pairs.append((c, lst.accept()[0]))
        assert all(c._shm is not None for c, _ in pairs)
        assert table_fds() == 1
    finally:
        for c, s in pairs:
            c.close()
            s.close()
        lst.close()
