"""App matrix: multiprocessing.connection (Listener / Client) and
multiprocessing.managers (a BaseManager server process and a client
process), over TCP addresses, under ``shrimpio run``."""

from __future__ import annotations

import pytest

from apprunner import Apps, assert_shm

pytestmark = [pytest.mark.apps]

@pytest.mark.timeout(60)
def test_multiprocessing_connection():
    with Apps() as apps:
        srv = apps.start("server", ["mpconn_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["mpconn_client.py", port], timeout=10)
        client = apps.procs[-1]
        apps.stop(srv)
        assert out.count("3 objects and 3 byte messages echoed") == 2, out
        assert out.rstrip().endswith("done"), out
        assert_shm(srv, client, at_least=2)


@pytest.mark.timeout(60)
def test_multiprocessing_manager():
    with Apps() as apps:
        srv = apps.start("server", ["manager_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["manager_client.py", port], timeout=10)
        client = apps.procs[-1]
        apps.stop(srv)
        assert "shared dict: 51 keys" in out and out.rstrip().endswith("done"), out
        assert_shm(srv, client)
