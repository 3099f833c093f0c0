"""App matrix: twisted (a Protocol echo server and client), gevent
(monkey.patch_all() server and client), eventlet (kernel TCP, said so), trio (its own epoll loop) and
paramiko (SSH: a transport thread per connection)."""

from __future__ import annotations

import pytest

from apprunner import TCP, Apps, appdata, assert_shm, need

pytestmark = [pytest.mark.apps]


@pytest.mark.timeout(60)
def test_twisted_echo():
    need("twisted")
    with Apps() as apps:
        srv = apps.start("server", ["twisted_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["twisted_client.py", port])
        client = apps.procs[-1]
        apps.stop(srv)
        payload = b"".join(b"message %d\n" % i for i in range(100)) + appdata.blob(2_000_000)
        assert f"echoed {len(payload)} {appdata.digest(payload)}" in out, out
        assert_shm(srv, client)


@pytest.mark.timeout(60)
def test_gevent_monkey_patched():
    """gevent's cooperative sockets and StreamServer under monkey.patch_all()
    keep shared memory (shrimpio/_gevent.py)."""
    need("gevent")
    with Apps() as apps:
        srv = apps.start("server", ["gevent_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["gevent_client.py", port])
        client = apps.procs[-1]
        apps.stop(srv)
        assert "3 connections echoed" in out, out
        assert_shm(srv, client, at_least=3)


@pytest.mark.timeout(60)
def test_eventlet_stays_on_tcp_and_says_so():
    """eventlet's green sockets come from an unpatched copy of socket and its
    hub polls the fd in the kernel: its connections stay on kernel TCP, and
    every one of them (its server's, its client's) reports why; a patched
    plain client of its server reports "no shrimpio listener"."""
    need("eventlet")
    from shrimpio._eventlet import REASON
    with Apps() as apps:
        srv = apps.start("server", ["eventlet_server.py"])
        port = apps.wait_port(srv)
        green_out = apps.run("client", ["eventlet_client.py", port])
        green = apps.procs[-1]
        plain_out = apps.run("plain", ["line_echo_client.py", port])
        plain = apps.procs[-1]
        apps.stop(srv)
        assert "3 connections echoed" in green_out, green_out
        assert plain_out.count("20 lines and 300001 bytes echoed") == 2, plain_out
        green_reasons = [(r["path"], r["reason"]) for r in green.records()]
        assert green_reasons == [(TCP, REASON)] * 3, green_reasons
        plain_reasons = [(r["path"], r["reason"]) for r in plain.records()]
        assert plain_reasons == [(TCP, "no shrimpio listener")] * 2, plain_reasons
        srv_records = srv.records()
        assert [(r["path"], r["reason"]) for r in srv_records] == [(TCP, REASON)] * 5, srv_records
        assert sum(r["bytes_received"] for r in srv_records) == \
            sum(r["bytes_sent"] for r in green.records() + plain.records()), srv_records


@pytest.mark.timeout(60)
def test_trio_echo():
    """trio drives non-blocking sockets with its own epoll loop
    (EPOLLONESHOT registrations, modified before each wait)."""
    need("trio")
    with Apps() as apps:
        out, srv, client = apps.serve_one_client(["trio_server.py"], ["trio_client.py"])
        assert f"3 streams echoed 2000000 {appdata.digest(appdata.blob(2_000_000))}" in out, out
        assert_shm(srv, client, at_least=3)


@pytest.mark.timeout(90)
def test_paramiko_ssh_echo():
    """paramiko: blocking sockets read with a timeout by a transport thread
    per connection, closed by that thread and by the program at once; each
    connection reported once, on shared memory."""
    need("paramiko")
    with Apps() as apps:
        out, srv, client = apps.serve_one_client(["paramiko_server.py"], ["paramiko_client.py"])
        assert f"2 connections echoed 2000000 {appdata.digest(appdata.blob(2_000_000))}" in out, out
        assert_shm(srv, client, at_least=2)
        for proc in (srv, client):
            records = proc.records()
            assert len(records) == 2, records            # once each, not once per closer
            assert all(r["local"][0] == r["peer"][0] == "127.0.0.1" for r in records), records
