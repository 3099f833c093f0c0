"""A listener that runs out of fds, one or two short: TCP's accept() fails
with EMFILE and the client waits in the backlog until the server has an fd
again; nothing is lost.  Found by the chaos suite (scenario ``exhaust``):
over shared memory the listener took the client from the registry, could
not receive the hello's fds (the kernel drops fds it cannot install) and
dropped the client, which read EOF.  (tests/test_scale.py: many clients
and a listener short of fds.)"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys

import pytest

import shrimpio.patch
import shrimpio.socket as ss
from children import child_env

shrimpio.patch.disable()

CLIENT = r"""
import socket, sys
import shrimpio.patch
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
print(__import__("shrimpio").info(c)["path"], flush=True)
c.sendall(b"ping")
got = b""
while len(got) < 4:
    d = c.recv(4)
    if not d:
        break
    got += d
print(got.decode(), flush=True)
"""


@pytest.mark.parametrize("headroom", [1, 2])
def test_a_listener_out_of_fds_keeps_its_client_waiting(headroom):
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    child = subprocess.Popen([sys.executable, "-c", CLIENT, str(lst.getsockname()[1])],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = None
    try:
        assert child.stdout.readline().strip() == "shm"
        have = len(os.listdir("/proc/self/fd")) - 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (have + headroom, saved[1]))
        try:
            lst.settimeout(2)
            try:
                srv, _ = lst.accept()         # enough fds after all: fine
            except OSError as exc:
                assert exc.errno in (errno.EMFILE, errno.ENFILE), exc   # as TCP
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is None:
            srv, _ = lst.accept()             # the client waited, as in TCP's backlog
        srv.settimeout(10)
        assert srv.recv(4) == b"ping"
        srv.sendall(b"pong")
        assert child.stdout.readline().strip() == "pong"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is not None:
            srv.close()
        lst.close()
        child.kill()
        child.wait()
        child.stdout.close()
