"""``sendfile_client.py port mode file``: sends ``file`` with ``mode``
(socket: sock.sendfile, os: os.sendfile), half-closes, checks the server's
"<length> <digest>" and the bytes it sends back."""

import os
import socket
import sys

from appdata import TIMEOUT, digest

port, mode, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(path, "rb") as f:
    expect = f.read()
    f.seek(0)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        if mode == "socket":
            sent = sock.sendfile(f)
        else:
            sent = 0
            while sent < len(expect):
                sent += os.sendfile(sock.fileno(), f.fileno(), sent, len(expect) - sent)
        assert sent == len(expect), sent
        sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as r:
            line = r.readline().decode().strip()
            back = r.read()
assert line == f"{len(expect)} {digest(expect)}", (line, len(expect), digest(expect))
print(f"server got {line}")
assert back == expect, (len(back), digest(back))
print(f"got back {len(back)} {digest(back)}")
print("done")
