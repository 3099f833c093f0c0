"""Blocking line-echo client: ``line_echo_client.py port [connections]``:
small lines and one 300 kB line per connection, each echo checked."""

import socket
import sys

from appdata import TIMEOUT, blob, digest

port = int(sys.argv[1])
for c in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        for i in range(20):
            line = b"conn %d line %d\n" % (c, i)
            sock.sendall(line)
            assert f.readline() == line
        big = blob(300_000).replace(b"\n", b".") + b"\n"
        sock.sendall(big)
        reply = f.readline()
        assert reply == big, len(reply)
        print(f"connection {c}: 20 lines and {len(big)} bytes echoed, {digest(reply)}")
print("done")
