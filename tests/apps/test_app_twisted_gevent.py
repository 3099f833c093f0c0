"""App matrix: twisted (a Protocol echo server and client), gevent
(monkey.patch_all() server and client) and trio (its own epoll loop)."""

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
        srv = apps.start("server", ["trio_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["trio_client.py", port])
        client = apps.procs[-1]
        apps.stop(srv)
        assert f"3 streams echoed 2000000 {appdata.digest(appdata.blob(2_000_000))}" in out, out
        assert_shm(srv, client, at_least=3)
