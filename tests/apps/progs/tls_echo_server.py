"""Blocking TLS line-echo server (ssl.SSLContext.wrap_socket on accepted
sockets, a thread per connection): ``tls_echo_server.py cert.pem key.pem``.
Prints "tls echo server on port N"."""

import socket
import ssl
import sys
import threading

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])


def serve(conn):
    with ctx.wrap_socket(conn, server_side=True) as tls, tls.makefile("rb") as f:
        for line in f:
            tls.sendall(line)


with socket.create_server(("127.0.0.1", 0)) as listener:
    print(f"tls echo server on port {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.settimeout(10)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
