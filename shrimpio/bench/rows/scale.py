"""Scale benchmark: many idle connections to one server, over shared memory
and over kernel TCP, in one run; what they cost the system, per connection.

One server process (``asyncio``: ``asyncio.start_server``; ``threaded``:
``socketserver.ThreadingTCPServer``, a thread with a blocking socket per
connection) and client processes (asyncio, at most :data:`PER_CLIENT`
connections each, :data:`WINDOW` connects in flight per client); asyncio
on uvloop's loop (the shrimpio loop is uvloop's).  Each connection
exchanges 64 bytes each way, then stays idle; then the clients close every
connection and the server closes its ends.  Both kinds run the very same
programs: over shared memory under ``python -m shrimpio run``, over TCP in
a plain interpreter, without shrimpio: what the program costs without it
(under ``SHRIMPIO_DISABLE=1`` the shrimpio loop's TCP connections hold two
fds each: docs/bench.md, "Scale").  Every connection's path is checked on
both ends.

Memory is the system's view, read three times: before the clients connect
(after every process started and imported what it needs), once every
connection exchanged its bytes (idle), and once every connection closed:

* ``pss``: the proportional set size of the server and of every client
  (``/proc/<pid>/smaps_rollup``): their private memory (Python objects,
  malloc, stacks) plus their share of shared pages: the rings (a page
  mapped by both ends counts half to each);
* ``slab``: the kernel's ``Slab`` (``/proc/meminfo``): socket structures,
  inodes, files, dentries, the shared-memory files' page-cache nodes,
  memory-map descriptors: what the connections' fds and mappings cost the
  kernel;
* ``page_tables``: the kernel's ``PageTables``: the page tables that map
  the processes' memory (every 2 MiB of address space with a page in use
  needs one 4 KiB page of them);
* ``shmem``: the kernel's ``Shmem``: pages of shared memory in use (the
  rings' pages; already inside ``pss``, shown apart).

The figure per connection is ``(pss + slab + page_tables) / n`` of the
difference to before; the kernel's counters are system-wide, so other
programs' activity is noise in them (small beside thousands of connections,
and the same for both kinds).  The connect rate is connections per second
from the first connect to the last connection's exchange, over all clients.

    python -m shrimpio bench --rows scale_asyncio,scale_threaded
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..spec import FULL, Measure, Settings, Spec
from ..table import Figure

__all__ = ["KINDS", "LABELS", "MODES", "PER_CLIENT", "WINDOW", "fd_budget", "meminfo", "new_run", "run_one", "smaps",
           "specs"]

KINDS = ("shrimpio", "tcp")
LABELS = {"shrimpio": "shm", "tcp": "TCP"}
MODES = ("asyncio", "threaded")
HOST = "127.0.0.1"
#: Connections per client process.
PER_CLIENT = 5000
#: Connects in flight per client.
WINDOW = 64
#: fds a process needs beside its connections' (interpreter, pipes, loop).
FD_SPARE = 64

# --- the programs ----------------------------------------------------------------

_LIMITS = '''\
import resource


def raise_fd_limit(want):
    """Soft limit up to the hard one; the hard one too where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
'''

SERVER = _LIMITS + '''\
"""python server.py MODE FDS: serve; commands on stdin: stat, quit."""
import json, os, sys, threading

mode, want = sys.argv[1], int(sys.argv[2])
limit = raise_fd_limit(want)
state = {"open": 0, "served": 0, "errors": 0, "paths": {}}
lock = threading.Lock()


def path_of(sock=None, transport=None):
    if transport is not None:
        info = transport.get_extra_info("shrimpio")
        return info.get("path") if info else "tcp"
    if "shrimpio" in sys.modules:
        import shrimpio
        return shrimpio.info(sock)["path"]
    return "tcp"


def opened(path):
    with lock:
        state["open"] += 1
        state["served"] += 1
        state["paths"][path] = state["paths"].get(path, 0) + 1


def closed():
    with lock:
        state["open"] -= 1


def stat():
    with lock:
        out = dict(state, paths=dict(state["paths"]))
    out["fds"] = len(os.listdir("/proc/self/fd"))
    out["fd_limit"] = limit
    out["threads"] = threading.active_count()
    return json.dumps(out)


def commands(out):
    """Answer stdin's commands until quit (or EOF)."""
    for line in sys.stdin:
        if line.strip() == "stat":
            out(stat())
        else:
            break


def say(text):
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()


if mode == "asyncio":
    import asyncio
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())   # shrimpio's loop under the patch

    async def handle(reader, writer):
        try:
            data = await reader.readexactly(64)
            writer.write(data)
            opened(path_of(transport=writer.transport))
            try:
                await reader.read(1)          # idle until the client closes
            finally:
                closed()
        except (ConnectionError, asyncio.IncompleteReadError):
            with lock:
                state["errors"] += 1
        finally:
            writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        say("port %d %s" % (srv.sockets[0].getsockname()[1], type(loop).__module__))
        done = loop.create_future()
        threading.Thread(target=lambda: (commands(lambda t: loop.call_soon_threadsafe(say, t)),
                                         loop.call_soon_threadsafe(done.set_result, None)),
                         daemon=True).start()
        await done
        srv.close()

    asyncio.run(main())
else:
    import socketserver

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            try:
                got = b""
                while len(got) < 64:
                    part = sock.recv(64 - len(got))
                    if not part:
                        raise ConnectionError("closed early")
                    got += part
                sock.sendall(got)
                opened(path_of(sock))
                try:
                    while sock.recv(1):       # idle until the client closes
                        pass
                finally:
                    closed()
            except ConnectionError:
                with lock:
                    state["errors"] += 1

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        request_queue_size = 4096

    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    say("port %d threads" % srv.server_address[1])
    commands(say)
    srv.shutdown()
    srv.server_close()
'''

CLIENT = _LIMITS + '''\
"""python client.py PORT N WINDOW FDS: wait for "go", connect N, exchange,
say "connected"; wait for "close", close all, say "closed"; wait for EOF."""
import asyncio, json, sys, time

port, n, window, want = (int(a) for a in sys.argv[1:5])
raise_fd_limit(want)
import uvloop
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())       # shrimpio's loop under the patch


def path_of(transport):
    info = transport.get_extra_info("shrimpio")
    return info.get("path") if info else "tcp"


async def main():
    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()

    def feed():
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "")

    import threading
    threading.Thread(target=feed, daemon=True).start()
    print("ready", flush=True)
    await lines.get()
    conns, paths = [], {}
    sem = asyncio.Semaphore(window)

    async def one():
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"p" * 64)
            await reader.readexactly(64)
            p = path_of(writer.transport)
            paths[p] = paths.get(p, 0) + 1
            conns.append((reader, writer))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"connected": len(conns), "seconds": elapsed, "paths": paths}), flush=True)
    await lines.get()
    for _, w in conns:
        w.close()
    for _, w in conns:
        try:
            await w.wait_closed()
        except ConnectionError:
            pass
    conns.clear()
    print(json.dumps({"closed": n}), flush=True)
    await lines.get()

asyncio.run(main())
'''


# --- the system's view ---------------------------------------------------------------

def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_Shmem of a process, bytes (``smaps_rollup``)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:", "Pss_Anon:", "Pss_Shmem:"):
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def meminfo() -> dict[str, int]:
    """The kernel's Slab, PageTables and Shmem, bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Slab", "PageTables", "Shmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def fd_budget(n: int) -> int:
    """fds to ask for in a process holding ``n`` connections: two per
    connection (a shared-memory connection's two fds; TCP needs one)."""
    return 2 * n + FD_SPARE


# --- one run ---------------------------------------------------------------------------

class _Proc:
    """A program with line-oriented stdin/stdout and a deadline per answer."""

    def __init__(self, cmd: list[str], cwd: str, env: dict[str, str], cpu: Optional[int]) -> None:
        def pin() -> None:
            if cpu is not None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, preexec_fn=pin)
        self.buf = b""

    @property
    def pid(self) -> int:
        return self.p.pid

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def line(self, timeout: float) -> str:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"no answer from {self.p.args[-5:]} in {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.p.stderr.read().decode(errors="replace") if self.p.stderr else ""
                raise RuntimeError(f"{self.p.args[-5:]} exited ({self.p.wait()}): {err[-2000:]}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def _env(kind: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SHRIMPIO_REPORT", None)
    if kind == "shrimpio":
        env.pop("SHRIMPIO_DISABLE", None)
    else:
        env["SHRIMPIO_DISABLE"] = "1"
    return env


def _snapshot(pids: list[int]) -> dict[str, Any]:
    procs = [smaps(p) for p in pids]
    return {"procs": procs, "kernel": meminfo()}


def _delta(a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, float]:
    """Per connection, bytes: server and client Pss, the kernel's counters, the total."""
    srv = b["procs"][0]["Pss"] - a["procs"][0]["Pss"]
    cli = sum(y["Pss"] - x["Pss"] for x, y in zip(a["procs"][1:], b["procs"][1:]))
    shm = sum(y["Pss_Shmem"] - x["Pss_Shmem"] for x, y in zip(a["procs"], b["procs"]))
    k = {key: b["kernel"][key] - a["kernel"][key] for key in a["kernel"]}
    out = {"server_pss": srv / n, "client_pss": cli / n, "pss_shmem": shm / n,
           "slab": k["Slab"] / n, "page_tables": k["PageTables"] / n, "shmem": k["Shmem"] / n}
    out["total"] = out["server_pss"] + out["client_pss"] + out["slab"] + out["page_tables"]
    return out


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat(server: _Proc) -> dict[str, Any]:
    server.send("stat")
    return json.loads(server.line(60))


def _wait_open(server: _Proc, want: int, timeout: float) -> dict[str, Any]:
    """Poll the server's count of open connections until it is ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        st = _stat(server)
        if st["open"] == want:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"server has {st['open']} open connections, expected {want}: {st}")
        time.sleep(0.05)          # a condition polled with a deadline


def run_one(mode: str, kind: str, n: int, timeout: float = 300) -> dict[str, Any]:
    """``n`` connections to one ``mode`` server over ``kind``: the memory
    deltas per connection (idle, after close), the connect rate, the paths."""
    if mode not in MODES or kind not in KINDS:
        raise ValueError(f"mode must be one of {MODES} and kind one of {KINDS}")
    nclients = max(1, -(-n // PER_CLIENT))
    shares = [n // nclients + (1 if i < n % nclients else 0) for i in range(nclients)]
    run = [sys.executable, "-m", "shrimpio", "run"] if kind == "shrimpio" else [sys.executable]
    env = _env(kind)
    procs: list[_Proc] = []
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-scale-") as tmp:
        Path(tmp, "server.py").write_text(SERVER)
        Path(tmp, "client.py").write_text(CLIENT)
        try:
            server = _Proc(run + ["server.py", mode, str(fd_budget(n))], tmp, env, 1)
            procs.append(server)
            port = int(server.line(60).split()[1])
            for i, share in enumerate(shares):
                c = _Proc(run + ["client.py", str(port), str(share), str(WINDOW), str(fd_budget(share))],
                          tmp, env, 0)
                procs.append(c)
            for c in procs[1:]:
                if c.line(60) != "ready":
                    raise RuntimeError("client did not start")
            before = _snapshot([p.pid for p in procs])
            cpu0 = [_cpu(p.pid) for p in procs]
            t0 = time.perf_counter()
            for c in procs[1:]:
                c.send("go")
            got = [json.loads(c.line(timeout)) for c in procs[1:]]
            st = _wait_open(server, n, timeout)
            elapsed = time.perf_counter() - t0
            cpu1 = [_cpu(p.pid) for p in procs]
            idle = _snapshot([p.pid for p in procs])
            for c in procs[1:]:
                c.send("close")
            for c in procs[1:]:
                c.line(timeout)
            after_st = _wait_open(server, 0, timeout)
            after = _snapshot([p.pid for p in procs])
        finally:
            for p in reversed(procs):
                p.stop()
    paths: dict[str, int] = {}
    for g in got:
        for p, k in g["paths"].items():
            paths[p] = paths.get(p, 0) + k
    want = LABELS[kind].lower()
    if paths != {want: n} or st["paths"] != {want: n}:
        raise RuntimeError(f"{mode} {kind}: clients' paths {paths}, server's {st['paths']}, "
                           f"expected {n} {want}")
    return {"n": n, "clients": nclients, "idle": _delta(before, idle, n), "closed": _delta(before, after, n),
            "connect_per_s": n / elapsed,
            "server_cpu_us": (cpu1[0] - cpu0[0]) / n * 1e6,
            "client_cpu_us": sum(b - a for a, b in zip(cpu0[1:], cpu1[1:])) / n * 1e6, "client_seconds": max(g["seconds"] for g in got),
            "server_fds": st["fds"], "fd_limit": st["fd_limit"], "errors": after_st["errors"]}


def can_raise_fd_limit(want: int) -> bool:
    """May a process raise its hard fd limit to ``want`` (root is not
    enough: it takes ``CAP_SYS_RESOURCE``)?  Tried in a child."""
    probe = ("import resource, sys\n"
             "try:\n"
             f"    resource.setrlimit(resource.RLIMIT_NOFILE, ({want}, {want}))\n"
             "except (ValueError, OSError):\n"
             "    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def max_connections(n: int) -> int:
    """Connections a server can hold over shared memory (two fds each)
    under the fd limit the programs can raise theirs to: ``n``, or fewer
    (the rows say how many)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= fd_budget(n) or can_raise_fd_limit(fd_budget(n)):
        return n
    return max(1, (hard - FD_SPARE) // 2)


# --- rows of ``shrimpio bench`` ----------------------------------------------------------

#: What each row shows of a run: (row key suffix, title, unit).
ROWS = (("", "idle conns: memory each", "KB"),
        ("_closed", "conns all closed: memory left each", "KB"),
        ("_rate", "conns: connect rate", "conn/s"))


def row_key(mode: str, suffix: str) -> str:
    return f"scale_{mode}{suffix}"


def row_title(mode: str, suffix: str, n: int) -> str:
    title = dict((s, t) for s, t, _ in ROWS)[suffix]
    return f"{mode} server, {n:,} {title}"


class Runs:
    """Runs of :func:`run_one` shared by a mode's rows: the first row to
    ask for its i-th repeat of a kind measures it, the others reuse it (one
    run gives all three figures)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.used: dict[tuple[str, str, str], int] = {}

    def get(self, mode: str, kind: str, suffix: str, n: int) -> dict[str, Any]:
        runs = self.runs.setdefault((mode, kind), [])
        i = self.used.get((mode, kind, suffix), 0)
        self.used[(mode, kind, suffix)] = i + 1
        while len(runs) <= i:
            runs.append(run_one(mode, kind, max_connections(n)))
        return runs[i]


def figure_values(res: dict[str, Any], suffix: str) -> tuple[float, dict[str, Any]]:
    """A run as one row's figure: (value, extra)."""
    extra: dict[str, Any] = {"n": res["n"], "clients": res["clients"], "server_fds": res["server_fds"],
                             "fd_limit": res["fd_limit"]}
    if suffix == "_rate":
        extra.update(server_cpu_us=res["server_cpu_us"], client_cpu_us=res["client_cpu_us"])
        return res["connect_per_s"], extra
    part = res["idle" if suffix == "" else "closed"]
    extra.update({k: v / 1024 for k, v in part.items() if k != "total"})
    return part["total"] / 1024, extra


# --- the rows of ``shrimpio bench`` ---------------------------------------------

_runs = Runs()


def new_run() -> None:
    """Forget the measurements of the last ``shrimpio bench`` run."""
    global _runs
    _runs = Runs()


def _measure(mode: str, kind: str, suffix: str) -> Measure:
    label = LABELS[kind]

    def m(s: Settings) -> Figure:
        n = s.scale_asyncio if mode == "asyncio" else s.scale_threaded
        value, extra = figure_values(_runs.get(mode, kind, suffix, n), suffix)
        extra["paths"] = [label.lower()]
        return Figure(label, value, None, [value], extra)
    return m


def specs() -> list[Spec]:
    """Per mode, memory per idle connection, memory left after close and the
    connect rate (slow: left out of ``--quick`` unless named)."""
    return [Spec(row_key(mode, suffix), row_title(mode, suffix, getattr(FULL, f"scale_{mode}")), unit,
                 [(LABELS[k], _measure(mode, k, suffix)) for k in KINDS], slow=True)
            for mode in MODES for suffix, _, unit in ROWS]
