"""eventlet client (monkey_patch): ``eventlet_client.py port``: three green
threads, each a connection exchanging lines and a 300 kB line with a line
echo server."""

import eventlet

eventlet.monkey_patch()

import socket  # noqa: E402
import sys  # noqa: E402

from appdata import TIMEOUT, echo_exchange  # noqa: E402

port = int(sys.argv[1])


def one(c):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        return echo_exchange(sock, f, b"green thread %d" % c)[1]


pool = eventlet.GreenPool()
digests = list(pool.imap(one, range(3)))
assert len(set(digests)) == 1, digests
print(f"3 connections echoed, {digests[0]}")
print("done")
