"""Blocking line-echo client: ``line_echo_client.py port [connections]``:
small lines and one 300 kB line per connection, each echo checked."""

import socket
import sys

from appdata import TIMEOUT, echo_exchange

port = int(sys.argv[1])
for c in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        n, dig = echo_exchange(sock, f, b"conn %d" % c)
        print(f"connection {c}: 20 lines and {n} bytes echoed, {dig}")
print("done")
