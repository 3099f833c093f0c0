"""A listener's registry entry goes however its process ends: at close, at
a normal exit without close, and when SIGTERM or SIGHUP (left at their
default action) kill it; the stale entry of one killed by SIGKILL goes at
the next listen() of any process.  Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from children import child_env
from conftest import wait_for

LISTENER = """
import os, signal, socket, sys, time
# The signals at their default action, whatever this child inherited (under
# nohup, SIGHUP comes ignored, and then no signal kills it).
for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_DFL)
import shrimpio.patch
how = sys.argv[1]
if how == "own-handler":
    signal.signal(signal.SIGTERM, lambda *a: (print("handled", flush=True), sys.exit(3)))
srv = socket.create_server(("127.0.0.1", 0))
child = 0
if how == "fork":
    child = os.fork()
    if child == 0:                     # the child shares the listener, then is killed
        time.sleep(60)
        os._exit(0)
sys.stdout.write(f"{srv.getsockname()[1]} {child}\\n")
sys.stdout.flush()
if how == "exit":
    sys.exit(0)                        # without closing the listener
time.sleep(60)
"""


def entries(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*.sock"))


def start(how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(LISTENER), how],
                            env=child_env(), stdout=subprocess.PIPE, text=True)


def test_normal_exit_without_close(registry):
    p = start("exit")
    try:
        port = p.stdout.readline().split()[0]
        assert p.wait(timeout=20) == 0
        assert port and entries(registry) == []
    finally:
        p.stdout.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_killed_by_a_default_terminating_signal(registry, sig):
    p = start("sleep")
    try:
        port = p.stdout.readline().split()[0]
        assert entries(registry) == [f"tcp4-127.0.0.1-{port}.sock"]
        p.send_signal(sig)
        assert p.wait(timeout=20) == -sig             # died of it, as without shrimpio
        assert entries(registry) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def test_a_program_s_own_handler_is_kept(registry):
    p = start("own-handler")
    try:
        p.stdout.readline()
        p.send_signal(signal.SIGTERM)
        assert p.stdout.readline().strip() == "handled"
        assert p.wait(timeout=20) == 3
        assert entries(registry) == []                # its exit ran the exit handlers
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def test_a_killed_child_leaves_its_parent_s_entry(registry):
    """A forked child shares the listener: its death by SIGTERM must not
    take the entry of the parent, which still listens."""
    p = start("fork")
    try:
        port, child = p.stdout.readline().split()
        child = int(child)
        os.kill(child, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{child}/status")
                 or "zombie" in open(f"/proc/{child}/status").read().lower(),
                 timeout=20, what="the child to die")
        assert entries(registry) == [f"tcp4-127.0.0.1-{port}.sock"]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == -signal.SIGTERM
        assert entries(registry) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def test_sigkill_leaves_a_stale_entry_the_next_listen_sweeps(registry):
    p = start("sleep")
    try:
        port = p.stdout.readline().split()[0]
        p.kill()
        p.wait(timeout=20)
        assert entries(registry) == [f"tcp4-127.0.0.1-{port}.sock"]     # nothing could run
    finally:
        p.stdout.close()
    q = start("exit")                  # any process's first listen sweeps
    try:
        q.stdout.readline()
        assert q.wait(timeout=20) == 0
        assert entries(registry) == []
    finally:
        q.stdout.close()
