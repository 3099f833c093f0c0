"""App matrix: HTTP servers and clients (tornado, aiohttp, uvicorn, hypercorn,
gunicorn, cheroot, waitress), each unmodified under ``shrimpio run``, real traffic checked, and
every connection on shared memory at both ends."""

from __future__ import annotations

import signal

import pytest

from apprunner import Apps, appdata, assert_shm, free_port, need

pytestmark = [pytest.mark.apps]

BLOB = 2_000_000
ECHO = 1_000_000



def check_http_transcript(out: str) -> None:
    """What progs/http_client.py printed, checked against the content."""
    echo = appdata.blob(ECHO)
    assert f"echo {len(echo)} {appdata.digest(echo)}" in out, out
    assert f"blob {BLOB} {appdata.digest(appdata.blob(BLOB))}" in out, out
    assert out.rstrip().endswith("done"), out


@pytest.mark.timeout(60)
def test_tornado_server_requests_client():
    need("tornado", "requests")
    with Apps() as apps:
        srv = apps.start("server", ["tornado_server.py"])
        port = apps.wait_port(srv)
        cli_out = apps.run("client", ["http_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(cli_out)
        assert_shm(srv, cli)


@pytest.mark.timeout(60)
def test_tornado_server_tornado_client():
    need("tornado")
    with Apps() as apps:
        srv = apps.start("server", ["tornado_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["tornado_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli, at_least=7)


@pytest.mark.timeout(60)
def test_tornado_client_aiohttp_server():
    """The tornado client alone, against a server that works."""
    need("tornado", "aiohttp")
    with Apps() as apps:
        srv = apps.start("server", ["aiohttp_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["tornado_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli, at_least=7)


@pytest.mark.timeout(60)
def test_aiohttp_server_and_client():
    need("aiohttp")
    with Apps() as apps:
        srv = apps.start("server", ["aiohttp_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["aiohttp_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli)


@pytest.mark.timeout(60)
def test_uvicorn_default_loop():
    need("uvicorn", "requests")
    port = free_port()
    with Apps() as apps:
        srv = apps.start("server", ["-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1",
                                    "--port", port])
        apps.wait_output(srv, r"Application startup complete")
        out = apps.run("client", ["http_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli)


@pytest.mark.parametrize("worker", [
    "asyncio",
    "uvloop",
])
@pytest.mark.timeout(60)
def test_hypercorn(worker):
    need("hypercorn", "requests")
    if worker == "uvloop":
        need("uvloop")
    port = free_port()
    with Apps() as apps:
        srv = apps.start("server", ["-m", "hypercorn", "asgi_app:app", "--bind", f"127.0.0.1:{port}",
                                    "-k", worker])
        apps.wait_output(srv, r"Running on")
        out = apps.run("client", ["http_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli)


@pytest.mark.parametrize("worker", [
    "sync",
    "gthread",
])
@pytest.mark.timeout(60)
def test_gunicorn(worker):
    """(gunicorn's sync worker with --threads above 1 is its gthread worker.)"""
    need("gunicorn", "requests")
    port = free_port()
    threads = ["--threads", "4"] if worker == "gthread" else []
    with Apps() as apps:
        srv = apps.start("server", ["-m", "gunicorn", "wsgi_app:app", "-b", f"127.0.0.1:{port}",
                                    "-c", "python:gunicorn_conf", "-k", worker, "-w", "1", *threads],
                         stop_signal=signal.SIGTERM)
        apps.wait_output(srv, r"worker \d+ ready")
        out = apps.run("client", ["http_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli)


@pytest.mark.parametrize("server", ["cheroot", "waitress"])
@pytest.mark.timeout(90)
def test_threaded_wsgi_server(server):
    """Thread-pool WSGI servers: cheroot (its workers register kept-alive
    connections with the selector its main thread waits in) and waitress
    (its own poll loop, woken by a pipe when a worker is done).  Keep-alive
    requests, then 20 connections each for one request, from 4 threads."""
    need(server, "requests")
    with Apps() as apps:
        out, srv, cli = apps.serve_one_client([f"{server}_server.py"], ["http_client.py", "20", "4"])
        check_http_transcript(out)
        assert "pids: " in out, out
        assert_shm(srv, cli, at_least=21)
