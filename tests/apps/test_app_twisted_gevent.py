"""App matrix: twisted (a Protocol echo server and client), gevent
(monkey.patch_all() server and client), trio (its own epoll loop) and
paramiko (SSH: a transport thread per connection)."""

from __future__ import annotations

import pytest

from apprunner import Apps, appdata, assert_shm, need

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
