"""Real frameworks on the shrimpio loop, unmodified, under ``shrimpio run``.

Small checks of what the loop must give them (the app matrix in
``tests/apps`` is the thorough one): tornado and ``dask.distributed`` drive
sockets with ``add_reader``/``add_writer``; uvicorn and hypercorn ask uvloop
for their loop.  Each runs in child processes under ``python -m shrimpio
run``, with ``SHRIMPIO_REPORT``: every connection must be shared memory.
Skipped when the framework is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from children import child_env

pytestmark = pytest.mark.timeout(120)


def _needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def _run(code: str, report: Path, *args: str, timeout: float = 90) -> str:
    """Run ``code`` as a program under shrimpio run; its output."""
    prog = report.with_suffix(".py")
    prog.write_text(code)
    out = subprocess.run([sys.executable, "-m", "shrimpio", "run", str(prog), *args],
                         env=child_env({"SHRIMPIO_REPORT": str(report)}), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _records(report: Path) -> list:
    return [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []


def _all_shm(report: Path, at_least: int) -> None:
    recs = _records(report)
    assert len(recs) >= at_least, recs
    assert all(r["path"] == "shm" for r in recs), [r for r in recs if r["path"] != "shm"]


_TORNADO = r'''
import asyncio, tornado.web, tornado.httpserver, tornado.netutil
from tornado.httpclient import AsyncHTTPClient

class Echo(tornado.web.RequestHandler):
    def get(self):
        self.write("hello " + self.get_argument("n"))
    def post(self):
        self.write(self.request.body[::-1])

async def main():
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", Echo)]))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    client = AsyncHTTPClient()
    for i in range(20):
        r = await client.fetch(f"http://127.0.0.1:{port}/?n={i}")
        assert r.body == b"hello %d" % i, r.body
    body = bytes(range(256)) * 8192                       # 2 MiB: the rings fill and drain
    r = await client.fetch(f"http://127.0.0.1:{port}/", method="POST", body=body,
                           headers={"Content-Type": "application/octet-stream"})
    assert r.body == body[::-1]
    client.close()
    server.stop()
    await server.close_all_connections()
    print("ok")

asyncio.run(main())
'''


@_needs("tornado")
def test_tornado_http_server_and_client(tmp_path: Path) -> None:
    """tornado's HTTP server and client (IOStream on add_reader/add_writer)
    under shrimpio run: 21 requests, one of 2 MiB, all over shared memory."""
    assert _run(_TORNADO, tmp_path / "report").strip() == "ok"
    _all_shm(tmp_path / "report", 2 * 21)


_DASK_COMM = r'''
import asyncio
from distributed.comm import connect, listen

async def main():
    async def echo(comm):
        while True:
            try:
                msg = await comm.read()
            except Exception:
                break
            await comm.write(msg)
        await comm.close()

    async with listen("tcp://127.0.0.1:0", echo) as listener:
        comm = await connect(listener.contact_address)
        for i in range(50):
            await comm.write({"i": i})
            assert await comm.read() == {"i": i}
        big = b"x" * (16 << 20)
        await comm.write({"big": big})
        assert (await comm.read())["big"] == big
        await comm.close()
    print("ok")

asyncio.run(main())
'''


@_needs("distributed")
def test_dask_distributed_tcp_comm(tmp_path: Path) -> None:
    """dask.distributed's TCP comm (tornado IOStream) echoes 50 messages and
    16 MiB over shared memory under shrimpio run."""
    assert _run(_DASK_COMM, tmp_path / "report").strip().endswith("ok")
    _all_shm(tmp_path / "report", 2)


_ASGI_APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    import asyncio
    loop = type(asyncio.get_running_loop())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%s.%s %d" % (
        loop.__module__.encode(), loop.__name__.encode(), len(body))})
'''

_HTTP_CLIENT = r'''
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
for i in range(20):
    c.request("POST", "/", body=b"x" * (i * 1000))
    r = c.getresponse()
    assert r.status == 200, r.status
    assert r.read() == b"shrimpio.transport._loop.Loop %d" % (i * 1000)
c.close()
print("ok")
'''


def _serve(args: list, report: Path, log: Path, cwd: Path) -> tuple:
    """A server under shrimpio run, and the port it says it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "shrimpio", "run", "-m", *args], cwd=cwd,
                            env=child_env({"SHRIMPIO_REPORT": str(report), "PYTHONPATH": str(cwd)
                                           + ":" + child_env()["PYTHONPATH"]}),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())
        if m:
            return proc, int(m.group(1))
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)                      # a condition polled with a deadline
    proc.kill()
    proc.wait()
    raise AssertionError(f"server did not start: {log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("server", [
    pytest.param(["uvicorn", "app:app", "--port", "0"], marks=_needs("uvicorn"), id="uvicorn"),
    pytest.param(["hypercorn", "-k", "uvloop", "-b", "127.0.0.1:0", "app:app"],
                 marks=_needs("hypercorn"), id="hypercorn-uvloop"),
])
def test_asgi_servers_with_uvloop_get_the_shrimpio_loop(tmp_path: Path, server: list) -> None:
    """uvicorn with its defaults (--loop auto picks uvloop) and hypercorn -k
    uvloop ask uvloop for their loop: under shrimpio run they get the
    shrimpio loop, and a keep-alive client's connection is shared memory on
    both ends."""
    (tmp_path / "app.py").write_text(_ASGI_APP)
    sreport, creport = tmp_path / "server.report", tmp_path / "client.report"
    proc, port = _serve(server, sreport, tmp_path / "server.log", tmp_path)
    try:
        assert _run(_HTTP_CLIENT, creport, str(port)).strip() == "ok"
        deadline = time.monotonic() + 30
        while not _records(sreport) and time.monotonic() < deadline:
            time.sleep(0.05)                  # the server reports when it sees the close
    finally:
        _stop(proc)
    _all_shm(creport, 1)
    _all_shm(sreport, 1)


_AIOHTTP_CLIENT = r'''
import asyncio, sys, aiohttp

async def main():
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{sys.argv[1]}/") as r:
                assert r.status == 200 and await r.read()
    print("ok")

asyncio.run(main())
'''


@_needs("aiohttp")
def test_aiohttp_client_to_a_plain_server_reports_tcp(tmp_path: Path) -> None:
    """aiohttp's client (its own sockets, then create_connection(sock=...))
    under shrimpio run, to a server that is not shrimpio: kernel TCP, and
    every connection says so with its reason."""
    (tmp_path / "index.html").write_text("hello")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=child_env())
    try:
        port = re.search(r"port (\d+)", server.stdout.readline()).group(1)
        assert _run(_AIOHTTP_CLIENT, tmp_path / "report", port).strip() == "ok"
    finally:
        _stop(server)
        server.stdout.close()
    recs = _records(tmp_path / "report")
    assert recs and all(r["path"] == "tcp" and r["reason"] for r in recs), recs
