"""gevent's cooperative sockets over shared memory (shrimpio/_gevent.py):
a program that calls gevent.monkey.patch_all() under shrimpio run.  The
program runs in its own process (monkey-patching the test process would
change every other test); it asserts and prints what it saw."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from children import child_env

pytest.importorskip("gevent")

PROGRAM = """
from gevent import monkey
monkey.patch_all()
import os, signal, socket, sys, time
import gevent
import shrimpio

lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(8)
port = lst.getsockname()[1]
out = {}

def server():
    conn, _ = lst.accept()                       # a greenlet accept on the registry socket
    out["server_path"] = shrimpio.info(conn._sock)["path"]
    data = b""
    while len(data) < 1_000_000:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    conn.sendall(data[::-1])
    conn.settimeout(0.2)
    try:
        conn.recv(1)                             # nothing comes: gevent's timeout
    except socket.timeout:
        out["timeout"] = True
    conn.settimeout(None)
    out["eof"] = conn.recv(10)                   # the client closes: end of file
    conn.close()

def client():
    c = socket.create_connection(("127.0.0.1", port))
    out["client_path"] = shrimpio.info(c._sock)["path"]
    payload = bytes(range(256)) * 3907
    g = gevent.spawn(c.sendall, payload[:1_000_000])   # fills the ring: waits for room
    back = b""
    while len(back) < 1_000_000:
        back += c.recv(1 << 20)
    g.join()
    out["echo"] = back == payload[:1_000_000][::-1]
    gevent.sleep(0.3)
    c.close()

# A greenlet blocked in recv while another closes the socket is woken
# (gevent's cancel_wait), as with a kernel socket.
def blocked_then_closed():
    a = socket.create_connection(("127.0.0.1", port2))
    b, _ = lst2.accept()
    def reader():
        try:
            a.recv(10)
        except OSError as exc:
            return type(exc).__name__
    g = gevent.spawn(reader)
    gevent.sleep(0.05)
    a.close()
    out["cancelled"] = g.get(timeout=5)
    b.close()

# gevent.ssl runs OpenSSL on the fd: over shared memory the connection
# escapes to a kernel stream first, and TLS works as over TCP.
def tls():
    import ssl, trustme
    ca = trustme.CA()
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(sctx)
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    def serve():
        c, _ = lst3.accept()
        s = sctx.wrap_socket(c, server_side=True)
        data = b""
        while len(data) < 300000:
            data += s.recv(65536)
        s.sendall(data[::-1])
        s.close()
    g = gevent.spawn(serve)
    c = cctx.wrap_socket(socket.create_connection(("127.0.0.1", port3)), server_hostname="localhost")
    payload = bytes(range(256)) * 1172
    c.sendall(payload)
    back = b""
    while len(back) < len(payload):
        back += c.recv(65536)
    out["tls"] = back == payload[::-1]
    c.close()
    g.get(timeout=10)

lst2 = socket.socket(); lst2.bind(("127.0.0.1", 0)); lst2.listen(8); port2 = lst2.getsockname()[1]
lst3 = socket.socket(); lst3.bind(("127.0.0.1", 0)); lst3.listen(8); port3 = lst3.getsockname()[1]
gevent.joinall([gevent.spawn(server), gevent.spawn(client)], timeout=20, raise_error=True)
blocked_then_closed()
tls()
lst.close(); lst2.close(); lst3.close()
print(json.dumps({k: (v.decode() if isinstance(v, bytes) else v) for k, v in out.items()}))
"""


def _run(script, extra=None) -> dict:
    res = subprocess.run([sys.executable, "-m", "shrimpio", "run", str(script)],
                         env=child_env(extra), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_gevent_sockets_keep_shared_memory_and_behave_as_kernel_ones(tmp_path):
    """The same program over shared memory and (SHRIMPIO_DISABLE=1) over
    kernel TCP: the same results, on shm where asked."""
    script = tmp_path / "prog.py"
    script.write_text("import json\n" + textwrap.dedent(PROGRAM))
    shm = _run(script)
    tcp = _run(script, {"SHRIMPIO_DISABLE": "1"})
    assert (shm.pop("server_path"), shm.pop("client_path")) == ("shm", "shm")
    assert (tcp.pop("server_path"), tcp.pop("client_path")) == ("tcp", "tcp")
    assert shm == tcp, (shm, tcp)
    assert shm["echo"] and shm["timeout"] and shm["eof"] == "" and shm["tls"]
