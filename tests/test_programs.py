"""Unmodified programs over shrimpio, as real processes.

Each program of ``tests/programs.py`` runs as a subprocess (by
``tests/program_runner.py``), with both sides patched (``python -m shrimpio
run prog.py``) and with one side a plain ``python``.  What path each
connection took is read from the ``SHRIMPIO_REPORT`` files the patched
processes append to when a connection closes (one file per process role, so
a line says whose it is); the program output is compared with its expected
transcript.

Also: a connection to another host (two network namespaces joined by a veth
pair) falls back to TCP with reason "remote host", and ``SHRIMPIO_DISABLE``
and ``SHRIMPIO_TCP`` keep connections on TCP with their reasons.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess

import pytest

from program_runner import (SHM, TCP, assert_paired, assert_tcp, read_report, records_when_idle,
                            run_client, server, server_records)
from programs import (expected_echo, expected_httpclient, expected_requests, expected_selectors,
                      expected_urllib, expected_xmlrpc)

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
