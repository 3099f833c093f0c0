"""Web framework benchmark: real servers, unmodified, over shared memory and
over kernel TCP, with a keep-alive client, in one run.

* ``uvicorn``: a hello-world ASGI app under ``python -m uvicorn app:app
  --port 0 --no-access-log`` (otherwise uvicorn's defaults: ``--loop auto``,
  which is the shrimpio loop under the patch and uvloop without it;
  ``--http auto``; one worker);
* ``tornado``: a hello-world ``tornado.web.Application`` on
  ``tornado.httpserver.HTTPServer`` (``asyncio.run``: the shrimpio loop under
  the patch, asyncio's own loop without it);
* ``threading``: the stdlib's ``http.server.ThreadingHTTPServer`` (HTTP/1.0:
  one connection per request), and a client that opens a new connection for
  each request: what connection setup costs a real program.

The client is the stdlib's ``http.client.HTTPConnection``: one keep-alive
connection (a new one per request for ``threading``), ``GET /`` then read
the whole answer, one request in flight (a service calling another and
awaiting each answer: the wait for the peer counts).  For ``shrimpio`` the server and the client run under ``python -m
shrimpio run`` (as a user would run them); for ``tcp`` the very same
programs run unpatched.  Both are separate processes, pinned to two
different cores (server 1, client 0).

The client reports requests per second over a timed window (after a fifth
of warm-up), the median and p99 time of one request, the share of the
window spent in requests slower than 1 ms (on a loaded host: waits for a
CPU, which set the mean when they dominate), its own CPU and the
server's (utime + stime from ``/proc``) over the window, in percent of one
core, and how long each waited for a CPU while runnable (``/proc/<pid>/schedstat``:
other work on its core).  The path is checked: over shared memory, both ends' connections
(``SHRIMPIO_REPORT``) must have been shared memory; over TCP, the client's
socket must be a kernel socket.  With a connection per request
(``threading``), the client checks every connection's path itself
(``shrimpio.info``; both ends of a connection take one path) and no report
is written: a line per connection would burden only the shared-memory side.

    python -m shrimpio bench --rows uvicorn,tornado
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..spec import Measure, Settings, Spec
from ..table import Figure

__all__ = ["FRAMEWORKS", "KINDS", "LABELS", "available", "run_one", "server_command", "specs", "title"]

FRAMEWORKS = ("uvicorn", "tornado", "threading")
KINDS = ("shrimpio", "tcp")
LABELS = {"shrimpio": "shm", "tcp": "TCP"}
HOST = "127.0.0.1"
BODY = b"Hello, World!"
SERVER_CPU, CLIENT_CPU = 1, 0

# --- the programs (written to a temporary directory, run as they are) ------------

ASGI_APP = '''\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"Hello, World!"})
'''

TORNADO_APP = '''\
import asyncio
import signal
import tornado.httpserver
import tornado.netutil
import tornado.web


class Hello(tornado.web.RequestHandler):
    def get(self):
        self.write("Hello, World!")


async def main():
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", Hello)]))
    server.add_sockets(sockets)
    print("listening on port", sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.stop()
    await server.close_all_connections()

asyncio.run(main())
'''

THREADING_APP = '''\
import http.server


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "13")
        self.end_headers()
        self.wfile.write(b"Hello, World!")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
print("listening on port", server.server_address[1], flush=True)
server.serve_forever()
'''

CLIENT = '''\
"""http.client loop: python client.py PORT SECONDS SERVER_PID [new]
(``new``: a new connection for each request, else one kept alive)"""
import http.client, json, os, statistics, sys, time

port, seconds, server_pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
per_request = sys.argv[4:] == ["new"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def runq_seconds(pid):
    """Time the process waited for a CPU while runnable (0 without schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


paths = set()
if "shrimpio.patch" in sys.modules:
    import shrimpio

    def path_of(sock):
        return shrimpio.info(sock)["path"]
else:
    import socket

    def path_of(sock):
        return "tcp" if type(sock) is socket.socket else "?"


def request():
    global conn
    if per_request:
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    if per_request or not paths:    # every connection's path (an HTTP/1.0 answer closes it)
        paths.add(path_of(conn.sock))
    r = conn.getresponse()
    body = r.read()
    if r.status != 200 or body != b"Hello, World!":
        raise SystemExit(f"bad answer: {r.status} {body[:100]!r}")


request()
clock = time.perf_counter_ns
end = clock() + int(seconds / 5 * 1e9)          # warm-up
while clock() < end:
    request()
samples = []
me = os.getpid()
t0, c0, s0 = clock(), time.process_time(), cpu_seconds(server_pid)
q0, sq0 = runq_seconds(me), runq_seconds(server_pid)
end = t0 + int(seconds * 1e9)
while True:
    a = clock()
    request()
    b = clock()
    samples.append(b - a)
    if b >= end:
        break
elapsed = (b - t0) / 1e9
cpu, scpu = time.process_time() - c0, cpu_seconds(server_pid) - s0
q, sq = runq_seconds(me) - q0, runq_seconds(server_pid) - sq0
conn.close()
samples.sort()
print(json.dumps({"rps": len(samples) / elapsed, "n": len(samples),
                  "median_us": statistics.median(samples) / 1000,
                  "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000,
                  "client_cpu_percent": cpu / elapsed * 100, "server_cpu_percent": scpu / elapsed * 100,
                  "client_runq_percent": q / elapsed * 100, "server_runq_percent": sq / elapsed * 100,
                  "slow_time_percent": sum(x for x in samples if x > 1e6) / sum(samples) * 100,
                  "paths": sorted(paths)}))
'''

#: The line a server prints once it listens (uvicorn logs it; the tornado
#: program prints it).
_PORT = re.compile(rb"(?:http://127\.0\.0\.1:|listening on port )(\d+)")


def available(framework: str) -> bool:
    """Is the framework installed?  (``threading``: the stdlib's.)"""
    return importlib.util.find_spec(framework) is not None


def title(framework: str) -> str:
    """The table title of a framework's row."""
    return {"uvicorn": "uvicorn hello world (defaults), keep-alive",
            "tornado": "tornado hello world, keep-alive",
            "threading": "http.server threads, a connection per request"}[framework]


def server_command(framework: str, kind: str) -> list[str]:
    """The server's command line (run in the directory of the programs)."""
    run = [sys.executable, "-m", "shrimpio", "run"] if kind == "shrimpio" else [sys.executable]
    if framework == "uvicorn":
        return run + ["-m", "uvicorn", "app:app", "--host", HOST, "--port", "0", "--no-access-log"]
    if framework == "tornado":
        return run + ["tornado_app.py"]
    if framework == "threading":
        return run + ["threading_app.py"]
    raise ValueError(f"unknown framework {framework!r}")


def client_command(kind: str, port: int, seconds: float, server_pid: int,
                   per_request: bool = False) -> list[str]:
    """The client's command line."""
    run = [sys.executable, "-m", "shrimpio", "run"] if kind == "shrimpio" else [sys.executable]
    return run + ["client.py", str(port), str(seconds), str(server_pid)] + (["new"] if per_request else [])


def _env(kind: str, report: Optional[Path]) -> dict[str, str]:
    env = dict(os.environ)
    if kind == "shrimpio":
        env.pop("SHRIMPIO_DISABLE", None)
        if report is not None:
            env["SHRIMPIO_REPORT"] = str(report)
    else:
        env.pop("SHRIMPIO_REPORT", None)
        env["SHRIMPIO_DISABLE"] = "1"   # in case this process's children are patched
    return env


def _pinned(cpu: int) -> Callable[[], None]:
    def pin() -> None:
        n = os.cpu_count() or 1
        if n > 1 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu % n})
    return pin


def _wait_port(proc: subprocess.Popen, log: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        m = _PORT.search(log.read_bytes())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.02)                     # a condition polled with a deadline
    raise RuntimeError(f"server did not say its port: {log.read_text()[-2000:]}")


def _records(report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(framework: str, kind: str, seconds: float, timeout: float = 120) -> dict[str, Any]:
    """Start the server, run the client against it for ``seconds``, stop
    the server; the client's result, with the paths both ends took."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-web-") as tmp:
        d = Path(tmp)
        (d / "app.py").write_text(ASGI_APP)
        (d / "tornado_app.py").write_text(TORNADO_APP)
        (d / "threading_app.py").write_text(THREADING_APP)
        (d / "client.py").write_text(CLIENT)
        sreport, creport, log = d / "server.report", d / "client.report", d / "server.log"
        if framework == "threading":
            # A connection per request: the client checks the path of
            # every one (both ends of a connection take the same), and no
            # report line per connection burdens one side of the
            # comparison only (the TCP programs run without shrimpio).
            sreport = creport = None
        with log.open("wb") as out:
            srv = subprocess.Popen(server_command(framework, kind), cwd=d, env=_env(kind, sreport),
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_pinned(SERVER_CPU))
        try:
            port = _wait_port(srv, log, time.monotonic() + 60)
            cli = subprocess.run(client_command(kind, port, seconds, srv.pid, framework == "threading"), cwd=d,
                                 env=_env(kind, creport), stdin=subprocess.DEVNULL,
                                 capture_output=True, timeout=timeout, preexec_fn=_pinned(CLIENT_CPU))
            if cli.returncode != 0:
                raise RuntimeError(f"{framework} {kind} client failed ({cli.returncode}): "
                                   f"{cli.stderr.decode(errors='replace')[-2000:]}")
            res = json.loads(cli.stdout.decode().strip().splitlines()[-1])
            if kind == "shrimpio" and sreport is not None:
                # The server writes its record when it closes the connection
                # after the client's; wait for it (a deadline, not a sleep).
                deadline = time.monotonic() + 30
                while not _records(sreport) and time.monotonic() < deadline and srv.poll() is None:
                    time.sleep(0.02)
                served = [r["path"] for r in _records(sreport)]
                if not served:
                    raise RuntimeError(f"{framework} server reported no connection: {log.read_text()[-2000:]}")
                res["paths"] = res["paths"] + [r["path"] for r in _records(creport)] + served
        finally:
            _stop(srv)
    want = "shm" if kind == "shrimpio" else "tcp"
    if set(res["paths"]) != {want}:
        took = {p: res["paths"].count(p) for p in set(res["paths"])}
        raise RuntimeError(f"{framework} {kind}: connections took {took}, expected {want}")
    return res


# --- the rows of ``shrimpio bench`` ---------------------------------------------

def _measure(framework: str, kind: str) -> Measure:
    label = LABELS[kind]

    def m(s: Settings) -> Figure:
        res = run_one(framework, kind, s.seconds)   # checks both ends' paths
        extra = {k: res[k] for k in ("median_us", "p99_us", "n", "client_cpu_percent", "server_cpu_percent",
                                     "slow_time_percent")}
        extra["paths"] = sorted(set(res["paths"]))
        return Figure(label, res["rps"], None, [res["rps"]], extra)
    return m


def specs() -> list[Spec]:
    """One row per framework (skipped when it is not installed)."""
    return [Spec(fw, title(fw), "req/s", [(LABELS[k], _measure(fw, k)) for k in KINDS], needs=fw)
            for fw in FRAMEWORKS]
