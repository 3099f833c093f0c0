"""Unmodified stdlib-style network programs for tests/test_programs.py.

Nothing here knows about shrimpio: each text is an ordinary program that the
tests write to a file and run as ``python prog.py ...`` (plain) or ``python
-m shrimpio run prog.py ...`` (patched).

Servers take ``[port] [host]`` (port 0 = any, host defaults to 127.0.0.1)
and print one line ending in ``on port N`` once they accept connections.
Clients take ``port [host] ...`` and print a deterministic transcript; the
expected transcripts are computed by the functions at the bottom.
"""

from __future__ import annotations

import hashlib

# ---------------------------------------------------------------------------
# socketserver echo servers (line echo, as examples/echo_server.py)

_ECHO_HANDLER = '''
import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
'''

THREADING_ECHO_SERVER = _ECHO_HANDLER + '''

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8007
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    with socketserver.ThreadingTCPServer((host, port), Echo) as server:
        print(f"threading echo server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
'''

FORKING_ECHO_SERVER = _ECHO_HANDLER + '''

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8007
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    with socketserver.ForkingTCPServer((host, port), Echo) as server:
        print(f"forking echo server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
'''

#: Line-echo client: ``echo_client.py port [host] [connections]``.  Each
#: connection sends small lines and one line larger than a default ring
#: (256 KiB), reads every echo back and checks it.
ECHO_CLIENT = '''
import hashlib
import socket
import sys

port = int(sys.argv[1])
host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
connections = int(sys.argv[3]) if len(sys.argv) > 3 else 1
for c in range(connections):
    with socket.create_connection((host, port), timeout=10) as sock:
        f = sock.makefile("rb")
        for i in range(20):
            line = b"conn %d line %d\\n" % (c, i)
            sock.sendall(line)
            reply = f.readline()
            assert reply == line, (reply, line)
        big = bytes(i % 251 for i in range(300_000)).replace(b"\\n", b".") + b"\\n"
        sock.sendall(big)
        reply = f.readline()
        assert reply == big, (len(reply), len(big))
        f.close()
        print(f"connection {c}: 20 lines and {len(big)} bytes echoed,"
              f" sha256 {hashlib.sha256(reply).hexdigest()[:16]}")
'''

# ---------------------------------------------------------------------------
# http.server

HTTP_SERVER = '''
import hashlib
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive

    def _reply(self, body, ctype="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self._reply(bytes(i % 256 for i in range(n)), "application/octet-stream")
        else:
            self._reply(f"hello from {self.path}\\n".encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(f"{len(body)} bytes sha256 {hashlib.sha256(body).hexdigest()}\\n".encode())

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8008
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    with http.server.ThreadingHTTPServer((host, port), Handler) as server:
        print(f"http server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
'''

#: urllib.request: two separate requests (urllib closes each connection).
URLLIB_CLIENT = '''
import hashlib
import sys
import urllib.request

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"
with urllib.request.urlopen(base + "/urllib", timeout=10) as r:
    print(r.status, r.read().decode().strip())
with urllib.request.urlopen(base + "/bytes/400000", timeout=10) as r:
    body = r.read()
    print(r.status, len(body), hashlib.sha256(body).hexdigest())
'''

#: http.client: several requests on one keep-alive connection.
HTTPCLIENT_CLIENT = '''
import hashlib
import http.client
import sys

port = int(sys.argv[1])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for i in range(10):
    conn.request("GET", f"/get/{i}")
    r = conn.getresponse()
    print(r.status, r.getheader("Connection"), r.read().decode().strip())
conn.request("GET", "/bytes/400000")
r = conn.getresponse()
body = r.read()
print(r.status, len(body), hashlib.sha256(body).hexdigest())
payload = bytes(range(256)) * 1200
conn.request("POST", "/post", body=payload, headers={"Content-Type": "application/octet-stream"})
r = conn.getresponse()
print(r.status, r.read().decode().strip())
conn.close()
'''

#: requests, with a Session (one pooled keep-alive connection).
REQUESTS_CLIENT = '''
import hashlib
import sys

import requests

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"
with requests.Session() as s:
    for i in range(5):
        r = s.get(f"{base}/requests/{i}", timeout=10)
        print(r.status_code, r.text.strip())
    r = s.get(f"{base}/bytes/400000", timeout=10)
    print(r.status_code, len(r.content), hashlib.sha256(r.content).hexdigest())
    payload = bytes(range(256)) * 1200
    r = s.post(f"{base}/post", data=payload, timeout=10)
    print(r.status_code, r.text.strip())
'''

# ---------------------------------------------------------------------------
# xmlrpc

XMLRPC_SERVER = '''
import sys
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer


class Quiet(SimpleXMLRPCRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8009
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    with SimpleXMLRPCServer((host, port), requestHandler=Quiet, allow_none=True) as server:
        server.register_function(lambda a, b: a + b, "add")
        server.register_function(lambda s: s[::-1], "reverse")
        server.register_function(lambda s: len(s), "length")
        server.register_multicall_functions()
        print(f"xmlrpc server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
'''

XMLRPC_CLIENT = '''
import sys
import xmlrpc.client

port = int(sys.argv[1])
with xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/") as proxy:
    print("add(2, 3) =", proxy.add(2, 3))
    print("reverse('shrimp') =", proxy.reverse("shrimp"))
    print("length(300000 chars) =", proxy.length("s" * 300_000))
    multi = xmlrpc.client.MultiCall(proxy)
    for i in range(20):
        multi.add(i, i)
    print("sum of add(i, i) =", sum(multi()))
'''

# ---------------------------------------------------------------------------
# selectors: the echo server of the stdlib ``selectors`` documentation
# (non-blocking accept and read with DefaultSelector); only the address
# comes from argv and the per-event prints are gone.

SELECTORS_SERVER = '''
import selectors
import socket
import sys

sel = selectors.DefaultSelector()


def accept(sock, mask):
    conn, addr = sock.accept()  # Should be ready
    conn.setblocking(False)
    sel.register(conn, selectors.EVENT_READ, read)


def read(conn, mask):
    data = conn.recv(1000)  # Should be ready
    if data:
        conn.send(data)  # Hope it won't block
    else:
        sel.unregister(conn)
        conn.close()


port = int(sys.argv[1]) if len(sys.argv) > 1 else 1234
host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
sock = socket.socket()
sock.bind((host, port))
sock.listen(100)
sock.setblocking(False)
sel.register(sock, selectors.EVENT_READ, accept)
print(f"selectors echo server on port {sock.getsockname()[1]}", flush=True)

try:
    while True:
        events = sel.select()
        for key, mask in events:
            callback = key.data
            callback(key.fileobj, mask)
finally:
    sel.close()
    sock.close()
'''

#: Three connections at once, messages interleaved between them; each
#: echo is read back completely (the server echoes at most 1000 bytes a read).
SELECTORS_CLIENT = '''
import socket
import sys

port = int(sys.argv[1])
socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


total = 0
for i in range(10):
    for c, sock in enumerate(socks):
        msg = (b"message %d on connection %d;" % (i, c)) * (1 + i * 50)
        sock.sendall(msg)
        assert recv_exactly(sock, len(msg)) == msg
        total += len(msg)
for sock in socks:
    sock.close()
print(f"{len(socks)} connections, 30 messages, {total} bytes echoed")
'''

# ---------------------------------------------------------------------------
# multiprocessing with the spawn start method

MP_SPAWN_CLIENT = '''
import multiprocessing
import os
import socket
import sys


def child(port):
    cls = f"{socket.socket.__module__}.{socket.socket.__qualname__}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"hello from a spawned child\\n")
        with sock.makefile("rb") as f:
            reply = f.readline()
    print(f"child pid {os.getpid()} socket class {cls} got {reply!r}", flush=True)


if __name__ == "__main__":
    port = int(sys.argv[1])
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=child, args=(port,))
    p.start()
    p.join(30)
    print(f"child exit code {p.exitcode}", flush=True)
'''

PROGRAMS = {
    "threading_echo_server.py": THREADING_ECHO_SERVER,
    "forking_echo_server.py": FORKING_ECHO_SERVER,
    "echo_client.py": ECHO_CLIENT,
    "http_server.py": HTTP_SERVER,
    "urllib_client.py": URLLIB_CLIENT,
    "httpclient_client.py": HTTPCLIENT_CLIENT,
    "requests_client.py": REQUESTS_CLIENT,
    "xmlrpc_server.py": XMLRPC_SERVER,
    "xmlrpc_client.py": XMLRPC_CLIENT,
    "selectors_server.py": SELECTORS_SERVER,
    "selectors_client.py": SELECTORS_CLIENT,
    "mp_spawn_client.py": MP_SPAWN_CLIENT,
}


# ---------------------------------------------------------------------------
# Expected transcripts


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` in hex, as the programs print it."""
    return hashlib.sha256(data).hexdigest()


def echo_lines(big: bytes, connections: int) -> str:
    """An echo client's transcript: per connection, its 20 lines and the
    big message ``big`` echoed (the asyncio streams client's too)."""
    return "".join(f"connection {c}: 20 lines and {len(big)} bytes echoed,"
                   f" sha256 {sha256_hex(big)[:16]}\n" for c in range(connections))


def download_line() -> str:
    """An HTTP client's line for ``GET /bytes/400000``."""
    body = bytes(i % 256 for i in range(400000))
    return f"200 {len(body)} {sha256_hex(body)}"


def post_line() -> str:
    """An HTTP client's line for its 300 kB POST."""
    payload = bytes(range(256)) * 1200
    return f"200 {len(payload)} bytes sha256 {sha256_hex(payload)}"


def expected_echo(connections: int = 1) -> str:
    return echo_lines(bytes(i % 251 for i in range(300_000)).replace(b"\n", b".") + b"\n", connections)


def expected_urllib() -> str:
    return f"200 hello from /urllib\n{download_line()}\n"


def expected_httpclient() -> str:
    lines = [f"200 None hello from /get/{i}" for i in range(10)]
    return "\n".join(lines + [download_line(), post_line()]) + "\n"


def expected_requests() -> str:
    lines = [f"200 hello from /requests/{i}" for i in range(5)]
    return "\n".join(lines + [download_line(), post_line()]) + "\n"


def expected_xmlrpc() -> str:
    return ("add(2, 3) = 5\n"
            "reverse('shrimp') = pmirhs\n"
            "length(300000 chars) = 300000\n"
            f"sum of add(i, i) = {sum(2 * i for i in range(20))}\n")


def expected_selectors() -> str:
    total = sum(len((b"message %d on connection %d;" % (i, c)) * (1 + i * 50))
                for i in range(10) for c in range(3))
    return f"3 connections, 30 messages, {total} bytes echoed\n"
