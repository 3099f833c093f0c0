"""gevent client (monkey.patch_all): ``gevent_client.py port``: three
greenlets, each a connection exchanging lines and a 300 kB line with a line
echo server."""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from appdata import TIMEOUT, blob, digest  # noqa: E402

port = int(sys.argv[1])


def one(c):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        for i in range(20):
            line = b"greenlet %d line %d\n" % (c, i)
            sock.sendall(line)
            assert f.readline() == line
        big = blob(300_000).replace(b"\n", b".") + b"\n"
        sock.sendall(big)
        reply = f.readline()
        assert reply == big, len(reply)
        return digest(reply)


jobs = [gevent.spawn(one, c) for c in range(3)]
gevent.joinall(jobs, timeout=20, raise_error=True)
assert all(j.successful() for j in jobs), [j.exception for j in jobs]
print(f"3 connections echoed, {jobs[0].value}")
print("done")
