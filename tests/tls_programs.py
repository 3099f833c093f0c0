"""Unmodified TLS programs for tests/test_tls.py, run as real processes.

Nothing here knows about shrimpio (but ``IMPORT_FIRST_CLIENT``, which
imports the patch by hand after ``ssl``).  Servers take ``[port] [host]``
and print one line ending in ``on port N``; certificates come from the
environment (``TLS_CERT``: chain and key, ``TLS_CA``: the CA to trust).
"""

from __future__ import annotations

import hashlib

_PATTERN = '''
def pattern(n):
    block = bytes(range(251))
    return (block * (n // 251 + 1))[:n]
'''

#: A threaded TLS server; each connection's first line (over TLS) says what
#: to do with it: ``echo`` (echo until EOF), ``sink N`` (read N bytes, then
#: send them back), ``lines`` (echo lines through
#: makefile), ``stall`` (never read again), ``unwrap`` (say so, unwrap, then
#: answer one plain line), ``await-close`` (echo one read, wait for the
#: client's close_notify, answer it, then wait for EOF).  ``TLS_MUTE=1``: no TLS at
#: all (the client's handshake never gets an answer).
TLS_SERVER = _PATTERN + '''
import os
import socket
import ssl
import sys
import threading

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(os.environ["TLS_CERT"])
ctx.set_alpn_protocols(["h2", "http/1.1"])
MUTE = os.environ.get("TLS_MUTE") == "1"
STARTTLS = os.environ.get("TLS_STARTTLS") == "1"


def line(s):
    out = b""
    while not out.endswith(b"\\n"):
        b = s.recv(1)
        if not b:
            break
        out += b
    return out


def drain(s):
    while s.recv(65536):
        pass


def serve(conn):
    with conn:
        if MUTE:
            drain(conn)
            return
        if STARTTLS:
            conn.sendall(b"go ahead: " + line(conn))
        s = ctx.wrap_socket(conn, server_side=True)
        with s:
            cmd = line(s).strip()
            if cmd == b"echo":
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    s.sendall(data)
            elif cmd.startswith(b"sink "):
                n = int(cmd.split()[1])
                got = bytearray()
                while len(got) < n:
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
                s.sendall(got)
            elif cmd == b"lines":
                with s.makefile("rwb") as f:
                    for text in f:
                        f.write(text)
                        f.flush()
            elif cmd == b"stall":
                threading.Event().wait()
            elif cmd == b"unwrap":
                s.sendall(b"unwrapping\\n")
                plain = s.unwrap()
                plain.sendall(b"plain " + line(plain))
                drain(plain)
            elif cmd == b"await-close":
                s.sendall(s.recv(4))
                assert s.recv(10) == b""
                plain = s.unwrap()
                drain(plain)


def serve_quietly(conn):
    try:
        serve(conn)
    except OSError:
        pass        # a client that refused our certificate, or died


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8443
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    lst = socket.create_server((host, port))
    print(f"tls server on port {lst.getsockname()[1]}", flush=True)
    try:
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=serve_quietly, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        lst.close()
'''

#: A TLS client of a server in the test: ``tls_client.py port what [n]``.
#: ``hello``: send a line, print the answer line.  ``feed n``: read the
#: server's first line, send n bytes, say "fed", then wait (to be killed).
TLS_CLIENT = _PATTERN + '''
import os
import socket
import ssl
import sys

port, what = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=os.environ["TLS_CA"])
raw = socket.create_connection(("127.0.0.1", port), timeout=30)
s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
f = s.makefile("rb")
if what == "hello":
    s.sendall(b"hello\\n")
    print(f.readline().decode().strip(), flush=True)
elif what == "feed":
    f.readline()
    s.sendall(pattern(int(sys.argv[3])))
    print("fed", flush=True)
    sys.stdin.buffer.read()
f.close()
s.close()
'''

#: ``ssl`` imported and a context made before ``import shrimpio.patch``
#: (when argv[2] is "patch"): ``client.py port patch|plain``.
IMPORT_FIRST_CLIENT = '''
import os
import socket
import ssl
import sys

ctx = ssl.create_default_context(cafile=os.environ["TLS_CA"])
if sys.argv[2] == "patch":
    import shrimpio.patch  # noqa: F401
import shrimpio

with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"echo\\nping")
        got = b""
        while len(got) < 4:
            got += s.recv(4 - len(got))
        print(got.decode(), isinstance(s, ssl.SSLSocket), s.version(), shrimpio.info(s)["path"])
'''

#: http.server over TLS (the listening socket wrapped, as its docs show).
HTTPS_SERVER = _PATTERN + '''
import http.server
import os
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive

    def do_GET(self):
        if self.path.startswith("/bytes/"):
            body = pattern(int(self.path.rsplit("/", 1)[1]))
        else:
            body = f"hello from {self.path}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8443
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.environ["TLS_CERT"])
    with http.server.ThreadingHTTPServer((host, port), Handler) as server:
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        print(f"https server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
'''

#: requests (one keep-alive session) and urllib.request (two connections)
#: over https, verifying the server with the test's CA.
HTTPS_CLIENT = '''
import hashlib
import os
import ssl
import sys
import urllib.request

import requests

base = f"https://127.0.0.1:{int(sys.argv[1])}"
ca = os.environ["TLS_CA"]
with requests.Session() as s:
    for i in range(3):
        r = s.get(f"{base}/requests/{i}", verify=ca, timeout=10)
        print(r.status_code, r.text.strip())
    r = s.get(f"{base}/bytes/300000", verify=ca, timeout=10)
    print(r.status_code, len(r.content), hashlib.sha256(r.content).hexdigest())
ctx = ssl.create_default_context(cafile=ca)
with urllib.request.urlopen(base + "/urllib", context=ctx, timeout=10) as r:
    print(r.status, r.read().decode().strip())
with urllib.request.urlopen(base + "/bytes/300000", context=ctx, timeout=10) as r:
    body = r.read()
    print(r.status, len(body), hashlib.sha256(body).hexdigest())
'''


def pattern(n: int) -> bytes:
    """What the programs' ``pattern(n)`` makes."""
    block = bytes(range(251))
    return (block * (n // 251 + 1))[:n]


def expected_https() -> str:
    digest = hashlib.sha256(pattern(300000)).hexdigest()
    return "".join([f"200 hello from /requests/{i}\n" for i in range(3)]
                   + [f"200 300000 {digest}\n", "200 hello from /urllib\n",
                      f"200 300000 {digest}\n"])
