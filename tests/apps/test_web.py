"""App matrix: HTTP servers and clients (tornado, aiohttp, uvicorn, hypercorn,
gunicorn), each unmodified under ``shrimpio run``, real traffic checked, and
every connection on shared memory at both ends."""

from __future__ import annotations

import signal

import pytest

from apprunner import Apps, appdata, assert_shm, free_port, need

pytestmark = [pytest.mark.apps]

BLOB = 2_000_000
ECHO = 1_000_000

#: Pre-fork and uvloop findings shared with test_prefork.py.
UVLOOP_TCP = ("a plain uvloop loop (uvloop.new_event_loop, not the shrimpio loop) owns the listener: "
              "clients fall back with 'no shrimpio listener', the server reports nothing")


def check_http_transcript(out: str) -> None:
    """What progs/http_client.py printed, checked against the content."""
    echo = appdata.blob(ECHO)
    assert f"echo {len(echo)} {appdata.digest(echo)}" in out, out
    assert f"blob {BLOB} {appdata.digest(appdata.blob(BLOB))}" in out, out
    assert out.rstrip().endswith("done"), out


@pytest.mark.xfail(strict=True, reason=(
    "tornado accepts with loop.add_reader(listener.fileno()), the TCP fd; shm clients queue "
    "on the registry socket, never accepted: the client's first request times out"))
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


@pytest.mark.xfail(strict=True, reason=(
    "tornado's server never accepts shm clients (add_reader on the TCP listener fd), and its "
    "client's IOStream add_reader on the doorbell fd never fires (EAGAIN does not arm the ring)"))
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


@pytest.mark.xfail(strict=True, reason=(
    "tornado's IOStream waits with add_reader on the doorbell fd; a non-blocking recv's EAGAIN "
    "does not arm the ring, so a response that comes later never rings it (2 MB: 0 bytes read)"))
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


@pytest.mark.xfail(strict=True, reason="uvicorn --loop auto: " + UVLOOP_TCP)
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
    pytest.param("uvloop", marks=pytest.mark.xfail(strict=True, reason="hypercorn -k uvloop: " + UVLOOP_TCP)),
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


@pytest.mark.parametrize("worker", ["sync", "gthread"])
@pytest.mark.timeout(60)
def test_gunicorn(worker):
    need("gunicorn", "requests")
    port = free_port()
    with Apps() as apps:
        srv = apps.start("server", ["-m", "gunicorn", "wsgi_app:app", "-b", f"127.0.0.1:{port}",
                                    "-c", "python:gunicorn_conf", "-k", worker, "-w", "1",
                                    "--threads", "4"],
                         stop_signal=signal.SIGTERM)
        apps.wait_output(srv, r"worker \d+ ready")
        out = apps.run("client", ["http_client.py", port])
        cli = apps.procs[-1]
        apps.stop(srv)
        check_http_transcript(out)
        assert_shm(srv, cli)
