"""gevent echo server (monkey.patch_all, StreamServer): line echo.
Prints "gevent echo server on port N"."""

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def handle(sock, addr):
    with sock, sock.makefile("rb") as f:
        for line in f:
            sock.sendall(line)


server = StreamServer(("127.0.0.1", 0), handle)
server.start()
print(f"gevent echo server on port {server.server_port}", flush=True)
gevent.signal_handler(signal.SIGINT, server.stop)
server.serve_forever()
