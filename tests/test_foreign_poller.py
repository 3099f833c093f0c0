"""A poller that is not shrimpio's (the kernel's epoll or poll used
directly: a C library's loop, an epoll made before the patch) watching a
shared-memory connection's fd, with the usual non-blocking patterns: wait
until readable, then read until EAGAIN (or read once), wait again.  The fd becomes readable when
data comes after such a read, and on a new connection's first bytes (the
readers of a new connection count as asleep).  The writer is another
process that sends the next message only when the reader acknowledged the
last.  Reading once per wake, every message finds the reader back in its
poller; reading until EAGAIN, only those that come after an EAGAIN do (the
writer is often quicker).  One message that does not make the fd readable
fails the test: its poll times out."""

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
import socket, sys
from shrimpio.socket import socket as S
c = S(socket.AF_INET, socket.SOCK_STREAM)
c.connect(("127.0.0.1", int(sys.argv[1])))
for i in range(40):
    c.sendall(b"message %03d;" % i)
    ack = b""
    while len(ack) < 3:
        more = c.recv(3 - len(ack))
        assert more, "reader went away"
        ack += more
    assert ack == b"%03d" % i, ack
c.close()
"""


@pytest.mark.parametrize("pattern", ["until-eagain", "once"])
@pytest.mark.parametrize("kind", ["epoll", "poll"])
def test_foreign_poller_sees_every_message(kind, pattern):
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
        acked = 0
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
                while len(got) // 12 > acked:
                    conn.sendall(b"%03d" % acked)
                    acked += 1
                if pattern == "once":
                    break
        assert got == b"".join(b"message %03d;" % i for i in range(40))
        if pattern == "once":
            assert waits >= 40
        if kind == "epoll":
            p.close()
        conn.close()
        assert writer.wait(timeout=10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        lst.close()
