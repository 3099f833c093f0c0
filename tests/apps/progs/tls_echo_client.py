"""Blocking TLS client: ``tls_echo_client.py port ca.pem``: lines and a
300 kB line per connection through a TLS line-echo server."""

import socket
import ssl
import sys

from appdata import TIMEOUT, echo_exchange

port = int(sys.argv[1])
ctx = ssl.create_default_context(cafile=sys.argv[2])
for c in range(2):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as sock, sock.makefile("rb") as f:
        n, dig = echo_exchange(sock, f, b"conn %d" % c)
        print(f"connection {c}: {sock.version()}, 20 lines and {n} bytes echoed, {dig}")
print("done")
