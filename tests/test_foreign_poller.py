"""A poller that is not shrimpio's (the kernel's epoll or poll used
directly: a C library's loop, an epoll made before the patch) watching a
shared-memory connection's fd, with the usual non-blocking pattern: wait
until readable, read until EAGAIN, wait again.  The fd becomes readable when
data comes after such a read, and on a new connection's first bytes (the
readers of a new connection count as asleep); no message waits for a
timeout.  The writer is another process."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import textwrap

import pytest

import shrimpio
from shrimpio._poll import _real_epoll, _real_poll
from shrimpio.socket import socket as ShmSocket

from children import child_env

WRITER = """
import socket, sys, time
from shrimpio.socket import socket as S
c = S(socket.AF_INET, socket.SOCK_STREAM)
c.connect(("127.0.0.1", int(sys.argv[1])))
for i in range(40):
    c.sendall(b"message %03d;" % i)
    if i % 4 == 0:
        time.sleep(0.01)          # now and then the reader has gone back to waiting
c.close()
"""


@pytest.mark.parametrize("kind", ["epoll", "poll"])
def test_foreign_poller_sees_every_message(kind):
    lst = ShmSocket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER),
                               str(lst.getsockname()[1])], env=child_env())
    try:
        conn, _ = lst.accept()
        assert shrimpio.info(conn)["path"] == "shm"
        conn.setblocking(False)
        if kind == "epoll":
            p = _real_epoll()
            p.register(conn.fileno(), select.EPOLLIN)
        else:
            p = _real_poll()
            p.register(conn.fileno(), select.POLLIN)
        got = b""
        eof = False
        waits = 0
        while not eof:
            # The first wait comes before any read (a new connection's first bytes).
            ready = p.poll(5.0 if kind == "epoll" else 5000)
            assert ready, f"the fd never became readable; got {len(got)} bytes"
            waits += 1
            while True:
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    break
                if not data:
                    eof = True
                    break
                got += data
        assert got == b"".join(b"message %03d;" % i for i in range(40))
        assert waits >= 2
        if kind == "epoll":
            p.close()
        conn.close()
        assert writer.wait(timeout=10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        lst.close()
