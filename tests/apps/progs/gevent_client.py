"""gevent client (monkey.patch_all): ``gevent_client.py port``: three
greenlets, each a connection exchanging lines and a 300 kB line with a line
echo server."""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from appdata import TIMEOUT, echo_exchange  # noqa: E402

port = int(sys.argv[1])


def one(c):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        return echo_exchange(sock, f, b"greenlet %d" % c)[1]


jobs = [gevent.spawn(one, c) for c in range(3)]
gevent.joinall(jobs, timeout=20, raise_error=True)
assert all(j.successful() for j in jobs), [j.exception for j in jobs]
print(f"3 connections echoed, {jobs[0].value}")
print("done")
