"""Unmodified programs over shrimpio, as real processes.

Each program of ``tests/programs.py`` runs as a subprocess, with both sides
patched (``python -m shrimpio run prog.py``) and with one side a plain
``python``.  What path each connection took is read from the
``SHRIMPIO_REPORT`` files the patched processes append to when a connection
closes (one file per process role, so a line says whose it is); the program
output is compared with its expected transcript.

Also: a connection to another host (two network namespaces joined by a veth
pair) falls back to TCP with reason "remote host", and ``SHRIMPIO_DISABLE``
and ``SHRIMPIO_TCP`` keep connections on TCP with their reasons.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

import shrimpio
from conftest import wait_for
from programs import (PROGRAMS, expected_echo, expected_httpclient, expected_requests,
                      expected_selectors, expected_urllib, expected_xmlrpc)

#: Where the shrimpio package lives (source tree or site-packages):
#: subprocesses need it on PYTHONPATH to ``python -m shrimpio``.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(shrimpio.__file__)))

READY_TIMEOUT = 20.0      # a server's "on port N" line
CLIENT_TIMEOUT = 60.0     # a client run, start to exit
STOP_TIMEOUT = 10.0       # a server's exit after SIGINT

SHM, TCP = "shm", "tcp"

# ---------------------------------------------------------------------------
# Running programs


def _env(report: Optional[Path], extra: Optional[dict] = None) -> dict:
    """The environment of a program: shrimpio importable, not patched unless
    run under ``shrimpio run``, reporting to ``report``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SHRIMPIO_") or k == "SHRIMPIO_REGISTRY"}
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([PKG_PARENT] + [p for p in paths if p != PKG_PARENT])
    if report is not None:
        env["SHRIMPIO_REPORT"] = str(report)
    env.update(extra or {})
    return env


def _program(name: str) -> str:
    path = Path.cwd() / name            # conftest chdirs into tmp_path
    if not path.exists():
        path.write_text(PROGRAMS[name])
    return str(path)


def _command(name: str, args, patched: bool, netns: Optional[str] = None) -> list[str]:
    cmd = [sys.executable]
    if patched:
        cmd += ["-m", "shrimpio", "run"]
    cmd += [_program(name), *map(str, args)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return cmd


def _default_sigint() -> None:
    """In the server child before exec: SIGINT raises KeyboardInterrupt
    there even if pytest runs as a background job (which ignores SIGINT,
    and an ignored SIGINT is inherited and left alone by Python)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    report: Path
    stderr: Path
    baseline: frozenset = frozenset()   # its socket fds when it became ready


def _sockets_of(pid: int) -> frozenset:
    """The socket inodes ``pid`` holds open."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return frozenset()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return frozenset(out)


def _children_of(pid: int) -> set:
    kids = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(f.read().split())
        except OSError:
            pass
    return kids


def _idle(srv: Server) -> bool:
    """The server holds no sockets beyond those it had when it became ready
    and has no child processes: every connection it served is closed (and a
    patched process writes its report line before the close)."""
    return _sockets_of(srv.proc.pid) <= srv.baseline and not _children_of(srv.proc.pid)


def _read_ready_line(proc: subprocess.Popen, stderr: Path) -> int:
    """The port from the server's first stdout line, within READY_TIMEOUT."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"server gave no ready line in {READY_TIMEOUT}s; "
                                 f"stdout {buf!r}, stderr {stderr.read_text()!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(STOP_TIMEOUT)
                raise AssertionError(f"server exited ({proc.returncode}) before its ready line; "
                                     f"stdout {buf!r}, stderr {stderr.read_text()!r}")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    m = re.search(r"on port (\d+)$", line)
    assert m, f"unexpected ready line {line!r}"
    return int(m.group(1))


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (the servers close their listener on KeyboardInterrupt, which
    removes the registry entry), SIGKILL if that does not do, and reap."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=STOP_TIMEOUT)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def server(name: str, *, patched: bool, host: Optional[str] = None, netns: Optional[str] = None,
           env: Optional[dict] = None, tag: str = "server") -> Iterator[Server]:
    """Run server program ``name``; always stopped and reaped on exit."""
    report = Path.cwd() / f"{tag}.report"
    errpath = Path.cwd() / f"{tag}.stderr"
    args = [0] + ([host] if host else [])
    with open(errpath, "wb") as err:
        proc = subprocess.Popen(_command(name, args, patched, netns), stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, env=_env(report, env),
                                preexec_fn=_default_sigint)
    try:
        port = _read_ready_line(proc, errpath)
        yield Server(proc, port, report, errpath, _sockets_of(proc.pid))
    finally:
        _stop(proc)


def run_client(name: str, args, *, patched: bool, netns: Optional[str] = None,
               env: Optional[dict] = None, tag: str = "client") -> tuple[str, list[dict]]:
    """Run client program ``name`` to completion; its stdout and report."""
    report = Path.cwd() / f"{tag}.report"
    res = subprocess.run(_command(name, args, patched, netns), capture_output=True,
                         stdin=subprocess.DEVNULL, env=_env(report, env), timeout=CLIENT_TIMEOUT)
    assert res.returncode == 0, (f"{name} exited {res.returncode}\nstdout:\n{res.stdout.decode()}"
                                 f"\nstderr:\n{res.stderr.decode()}")
    return res.stdout.decode(), read_report(report)


def read_report(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def records_when_idle(srv: Server) -> list[dict]:
    """The server's report once it has closed every connection it served."""
    wait_for(lambda: _idle(srv), timeout=10, what="the server to close its connections")
    return read_report(srv.report)


def server_records(srv: Server, n: int, *, forking: bool = False) -> list[dict]:
    """The server's report lines for the ``n`` connections it served, read
    once it has closed all of them (a server closes its side after the
    client's EOF, possibly after the client has exited).

    A forking server's connections are closed by its children, which leave
    with ``os._exit``: their lines must be there all the same.  Its parent
    also closes its copy of each accepted socket right after the fork; those
    lines (if any) must say that no bytes went through the parent."""
    records = records_when_idle(srv)
    served = [r for r in records if r["pid"] != srv.proc.pid] if forking else records
    assert len(served) == n, records
    if forking:
        assert all(r["bytes_sent"] == r["bytes_received"] == 0
                   for r in records if r["pid"] == srv.proc.pid), records
    else:
        assert all(r["pid"] == srv.proc.pid for r in records), records
    return served


def _addr(rec: dict, key: str) -> tuple:
    return tuple(rec[key][:2])


def assert_paired(client: list[dict], server: list[dict], path: str) -> None:
    """Every client connection has the server-side record of the same
    connection (addresses crossed), both on ``path``, and the byte counts of
    each direction agree."""
    for c in client:
        assert c["path"] == path, c
        match = [s for s in server
                 if _addr(s, "peer") == _addr(c, "local") and _addr(s, "local") == _addr(c, "peer")]
        assert match, f"no server record for client connection {c} in {server}"
        s = match[-1]
        assert s["path"] == path, s
        assert (c["bytes_sent"], c["bytes_received"]) == (s["bytes_received"], s["bytes_sent"]), (c, s)
        assert c["bytes_sent"] > 0 and c["bytes_received"] > 0, c


def assert_tcp(records: list[dict], n: int, reason: str) -> None:
    assert len(records) == n, records
    for r in records:
        assert (r["path"], r["reason"]) == (TCP, reason), r
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, r


# ---------------------------------------------------------------------------
# Each client/server pair: (server, client, client args, expected output,
# connections the client makes)

PAIRS = {
    "threading-echo": ("threading_echo_server.py", "echo_client.py", ["127.0.0.1", 2], expected_echo(2), 2),
    "forking-echo": ("forking_echo_server.py", "echo_client.py", ["127.0.0.1", 2], expected_echo(2), 2),
    "http-urllib": ("http_server.py", "urllib_client.py", [], expected_urllib(), 2),
    "http-client-keepalive": ("http_server.py", "httpclient_client.py", [], expected_httpclient(), 1),
    "requests": ("http_server.py", "requests_client.py", [], expected_requests(), 1),
    "xmlrpc": ("xmlrpc_server.py", "xmlrpc_client.py", [], expected_xmlrpc(), 4),
    "selectors-echo": ("selectors_server.py", "selectors_client.py", [], expected_selectors(), 3),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_both_patched_use_shared_memory(pair):
    if pair == "requests":
        pytest.importorskip("requests")
    server_prog, client_prog, args, expected, nconn = PAIRS[pair]
    forking = server_prog.startswith("forking")
    with server(server_prog, patched=True) as srv:
        out, client = run_client(client_prog, [srv.port, *args], patched=True)
        assert out == expected
        assert len(client) == nconn, client
        assert all(r["pid"] != srv.proc.pid for r in client)
        served = server_records(srv, nconn, forking=forking)
        assert_paired(client, served, SHM)
        if forking:     # one child process per connection
            assert len({r["pid"] for r in served}) == nconn, served


@pytest.mark.parametrize("pair", list(PAIRS))
def test_plain_server_patched_client_falls_back(pair):
    """The patched client finds no shrimpio listener and uses kernel TCP."""
    if pair == "requests":
        pytest.importorskip("requests")
    server_prog, client_prog, args, expected, nconn = PAIRS[pair]
    with server(server_prog, patched=False) as srv:
        out, client = run_client(client_prog, [srv.port, *args], patched=True)
        assert out == expected
        assert_tcp(client, nconn, "no shrimpio listener")
    assert read_report(srv.report) == []        # the plain server really was plain


@pytest.mark.parametrize("pair", list(PAIRS))
def test_patched_server_plain_client_falls_back(pair):
    """The patched server serves an unpatched client over kernel TCP.
    (selectors-echo: ``sel.select()`` without a timeout must see a kernel
    TCP client of a patched listener; it hung before _poll watched the
    listener's own fd.)"""
    if pair == "requests":
        pytest.importorskip("requests")
    server_prog, client_prog, args, expected, nconn = PAIRS[pair]
    forking = server_prog.startswith("forking")
    with server(server_prog, patched=True) as srv:
        out, client = run_client(client_prog, [srv.port, *args], patched=False)
        assert out == expected
        assert client == []                     # the plain client really was plain
        served = server_records(srv, nconn, forking=forking)
        assert_tcp(served, nconn, "peer is not shrimpio")


# ---------------------------------------------------------------------------
# multiprocessing, spawn start method


def test_multiprocessing_spawn_child_is_patched():
    """A child spawned by a patched parent has shrimpio's socket class, and
    its connection to a patched server goes over shared memory."""
    with server("threading_echo_server.py", patched=True) as srv:
        out, client = run_client("mp_spawn_client.py", [srv.port], patched=True)
        lines = out.splitlines()
        assert len(lines) == 2, out
        m = re.fullmatch(r"child pid (\d+) socket class (\S+) got (.*)", lines[0])
        assert m, out
        child_pid, cls, reply = int(m.group(1)), m.group(2), m.group(3)
        assert cls == "shrimpio.socket.socket"
        assert reply == repr(b"hello from a spawned child\n")
        assert lines[1] == "child exit code 0"
        assert len(client) == 1 and client[0]["pid"] == child_pid, client
        records = server_records(srv, 1)
        assert_paired(client, records, SHM)


def test_multiprocessing_spawn_from_plain_parent_is_not_patched():
    """The control: without ``shrimpio run`` the same child is plain."""
    with server("threading_echo_server.py", patched=True) as srv:
        out, client = run_client("mp_spawn_client.py", [srv.port], patched=False)
        assert "socket class socket.socket got" in out, out
        assert client == []


# ---------------------------------------------------------------------------
# Fallback reasons: disabled, rules


def test_disabled_on_both_sides_uses_tcp():
    off = {"SHRIMPIO_DISABLE": "1"}
    with server("threading_echo_server.py", patched=True, env=off) as srv:
        out, client = run_client("echo_client.py", [srv.port, "127.0.0.1", 1], patched=True, env=off)
        assert out == expected_echo(1)
        assert_tcp(client, 1, "disabled")
        # The disabled listener made no registry entry: nothing for a client to find.
        assert not [f for _, _, files in os.walk(os.environ["SHRIMPIO_REGISTRY"])
                    for f in files if not f.startswith(".")]
        records = server_records(srv, 1)
        # The server side says why too: its listener was disabled.
        assert (records[0]["path"], records[0]["reason"]) == (TCP, "disabled"), records
        assert records[0]["bytes_received"] == client[0]["bytes_sent"], (records, client)


@pytest.mark.parametrize("rule", ["{port}", "127.0.0.1:{port}"])
def test_tcp_rule_keeps_connection_on_tcp(rule):
    with server("threading_echo_server.py", patched=True) as srv:
        env = {"SHRIMPIO_TCP": rule.format(port=srv.port)}
        out, client = run_client("echo_client.py", [srv.port, "127.0.0.1", 1], patched=True, env=env)
        assert out == expected_echo(1)
        assert_tcp(client, 1, "disabled by rule")
        # A rule for another port changes nothing.
        out, client = run_client("echo_client.py", [srv.port, "127.0.0.1", 1], patched=True,
                                 env={"SHRIMPIO_TCP": str(srv.port + 1 if srv.port < 65535 else 1)},
                                 tag="client2")
        assert out == expected_echo(1)
        assert [r["path"] for r in client] == [SHM], client


# ---------------------------------------------------------------------------
# Another host: two network namespaces joined by a veth pair


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _ip_checked(*args: str) -> subprocess.CompletedProcess:
    res = _ip(*args)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@pytest.fixture
def two_hosts():
    """Two network namespaces, 10.231.X.1 and 10.231.X.2 on a veth pair;
    removed afterwards whatever happens."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: no `ip` command")
    if os.geteuid() != 0:
        pytest.skip("network namespaces: creating them needs root")
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"shrimpio-{os.getpid()}-{tag}-a", f"shrimpio-{os.getpid()}-{tag}-b"
    veth_a, veth_b = f"shr{tag}a", f"shr{tag}b"
    net = f"10.231.{secrets.randbelow(254) + 1}"
    made: list[str] = []
    try:
        res = _ip("netns", "add", ns_a)
        if res.returncode != 0:
            pytest.skip(f"network namespaces: cannot create one: {res.stderr.strip()}")
        made.append(ns_a)
        _ip_checked("netns", "add", ns_b)
        made.append(ns_b)
        res = _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        if res.returncode != 0:
            pytest.skip(f"network namespaces: cannot create a veth pair: {res.stderr.strip()}")
        made.append(veth_a)
        for ns, dev, addr in ((ns_a, veth_a, f"{net}.1"), (ns_b, veth_b, f"{net}.2")):
            _ip_checked("link", "set", dev, "netns", ns)
            _ip_checked("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip_checked("-n", ns, "link", "set", dev, "up")
            _ip_checked("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{net}.1"
    finally:
        errors = []
        for name in reversed(made):
            if name.startswith("shrimpio-"):
                res = _ip("netns", "del", name)      # takes its veth end along
            elif _ip("link", "show", name).returncode == 0:
                res = _ip("link", "del", name)       # still in our namespace
            else:
                continue
            if res.returncode != 0:
                errors.append(f"{name}: {res.stderr.strip()}")
        assert not errors, f"could not clean up: {errors}"
        left = _ip("netns", "list").stdout
        assert ns_a not in left and ns_b not in left, left


def test_other_host_falls_back_to_tcp(two_hosts):
    ns_a, ns_b, server_addr = two_hosts
    with server("threading_echo_server.py", patched=True, host=server_addr, netns=ns_a) as srv:
        # From the other namespace (another host): kernel TCP, "remote host".
        out, client = run_client("echo_client.py", [srv.port, server_addr, 1], patched=True,
                                 netns=ns_b, tag="remote")
        assert out == expected_echo(1)
        assert_tcp(client, 1, "remote host")
        assert tuple(client[0]["peer"][:2]) == (server_addr, srv.port), client
        assert client[0]["local"][0] == server_addr.rsplit(".", 1)[0] + ".2", client
        # From the server's own namespace, the same address is this host: shm.
        out, local = run_client("echo_client.py", [srv.port, server_addr, 1], patched=True,
                                netns=ns_a, tag="local")
        assert out == expected_echo(1)
        records = records_when_idle(srv)
        assert all(r["pid"] == srv.proc.pid for r in records), records
        assert_paired(local, records, SHM)
        remote = [r for r in records if r["path"] == TCP]
        assert len(records) == 2, records
        assert len(remote) == 1 and remote[0]["reason"] == "peer is not shrimpio", records
        assert remote[0]["bytes_received"] == client[0]["bytes_sent"], (remote, client)
