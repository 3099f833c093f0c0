"""asyncio benchmark: the shrimpio loop over shared memory beside uvloop over
kernel TCP loopback, same code, in one run.

* ``rtt_64B``: asyncio streams ping-pong, ``write`` 64 bytes then
  ``readexactly(64)`` the echo; median and p99 round trip;
* ``echo_1KiB``: vmbench-style echo, 10 concurrent client connections each
  with one 1 KiB message in flight, against an ``asyncio.Protocol`` echo
  server and against an asyncio streams echo server; requests per second;
* ``aiohttp_1``, ``aiohttp_4``, ``aiohttp_16``: an aiohttp hello-world
  server and an aiohttp ``ClientSession`` client (keep-alive, 1, 4 or 16
  requests in flight); requests per second, and each side's CPU per request
  (a client busy all the time bounds the ratio of the two loops by the
  ratio of their clients' CPU per request).

Each measurement forks a fresh server and a fresh client process, pinned to
two different cores.  For ``shrimpio`` both import ``shrimpio.patch`` (as
``shrimpio run`` does: aiohttp's client makes its own sockets) and run a
shrimpio loop; for ``uvloop`` both run a plain ``uvloop`` loop.  Every
client checks which path its connections took.  Each figure is the median
of three repeats (one with ``--quick``); the two kinds take turns within
each repeat.

    python -m shrimpio bench-asyncio [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable, Optional

from ..common import machine, private_registry
from ..common import pin as _pin
from ..common import stats as _stats
from ..spec import Measure, Settings, Spec
from ..table import Figure, Row, format_table, from_stats, machine_line

KINDS = ("shrimpio", "uvloop")
HOST = "127.0.0.1"
ECHO_CLIENTS = 10
ECHO_SIZE = 1024
#: Requests in flight in the aiohttp measurements: one (a service calling
#: another, each answer awaited: the wait for the peer counts), four and
#: sixteen (the aiohttp client busy all the time: its own code sets the rate).
HTTP_IN_FLIGHT = (1, 4, 16)


def _in_flight(test: str) -> int:
    """The requests in flight of an ``aiohttp-N`` measurement."""
    return int(test.rpartition("-")[2])


# --- per-process setup ----------------------------------------------------------

def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "shrimpio":
        from ... import patch       # as ``shrimpio run``: patched sockets (enable(),
        patch.enable()            # not the import: it may have been disabled since)
        from ...transport import new_event_loop
        return new_event_loop
    import uvloop
    return uvloop.new_event_loop


def _path_of(transport: Any) -> str:
    """``shm`` for a shrimpio shared-memory transport, else ``tcp``."""
    info = transport.get_extra_info("shrimpio")
    return "shm" if info and info.get("path") == "shm" else "tcp"


# --- servers --------------------------------------------------------------------

class _EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(102400)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _streams_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            writer.write(await reader.readexactly(64))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _start(test: str, paths: dict) -> Any:
    loop = asyncio.get_running_loop()
    if test == "rtt":
        return await asyncio.start_server(_streams_pong, HOST, 0)
    if test == "echo-protocol":
        return await loop.create_server(_EchoProtocol, HOST, 0)
    if test == "echo-streams":
        return await asyncio.start_server(_streams_echo, HOST, 0)
    from aiohttp import web

    async def hello(request: Any) -> Any:
        t = request.transport
        if id(t) not in paths:
            paths[id(t)] = _path_of(t)
        return web.Response(text="Hello, World!")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner


def _server(kind: str, test: str, pipe: Any) -> None:
    """Serve until the parent writes to ``pipe``; the port goes first, the
    paths of the connections it checked (aiohttp) last."""
    _pin(1)
    paths: dict = {}

    async def main() -> None:
        srv = await _start(test, paths)
        if test.startswith("aiohttp"):
            port = srv.addresses[0][1]
        else:
            port = srv.sockets[0].getsockname()[1]
        stop = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(pipe.fileno(), lambda: stop.done() or stop.set_result(None))
        pipe.send(port)
        await stop
        asyncio.get_running_loop().remove_reader(pipe.fileno())
        if test.startswith("aiohttp"):
            await srv.cleanup()
        else:
            srv.close()
            await asyncio.wait_for(srv.wait_closed(), 5)

    with asyncio.Runner(loop_factory=_loop_factory(kind)) as runner:
        runner.run(main())
    pipe.send(sorted(set(paths.values())))


# --- clients --------------------------------------------------------------------

async def _client_rtt(port: int, n: int) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    path = _path_of(writer.transport)
    msg = b"p" * 64
    clock = time.perf_counter_ns
    out = []
    for i in range(n + n // 10):            # the first tenth warms up
        t0 = clock()
        writer.write(msg)
        await reader.readexactly(64)
        if i >= n // 10:
            out.append(clock() - t0)
    writer.close()
    await writer.wait_closed()
    return {"samples": out, "paths": [path]}


class _EchoClient(asyncio.Protocol):
    """One message of ECHO_SIZE bytes in flight; the next goes out when the
    whole echo is back."""

    def __init__(self, msg: bytes, counter: list) -> None:
        self.msg = msg
        self.counter = counter
        self.got = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(self.msg):
            self.got -= len(self.msg)
            self.counter[0] += 1
            if self.counter[1]:
                self.transport.write(self.msg)

    def connection_lost(self, exc: Any) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


#: How long a measurement window may be stretched for its first completed
#: request (a loaded host can let none complete in a short window).
WINDOW_DEADLINE = 60.0


async def _window(count: Callable[[], int], seconds: float,
                  at_start: Optional[Callable[[], None]] = None) -> tuple[int, float]:
    """After a warm-up of ``seconds / 5``, a timed window of ``seconds``:
    (requests completed in it, its length).  The window ends at its time or,
    if no request completed by then, once one has (at most WINDOW_DEADLINE
    more seconds), so that a rate is always measured, never an empty one."""
    await asyncio.sleep(seconds / 5)          # warm-up: a timed window, not a synchronisation
    start_n, t0 = count(), time.perf_counter()
    if at_start is not None:
        at_start()
    await asyncio.sleep(seconds)              # the window
    deadline = t0 + seconds + WINDOW_DEADLINE
    while count() == start_n and time.perf_counter() < deadline:
        await asyncio.sleep(0.001)            # the first completion: a condition, with a deadline
    return count() - start_n, time.perf_counter() - t0


async def _client_echo(port: int, seconds: float, server_pid: int) -> dict:
    loop = asyncio.get_running_loop()
    msg = b"x" * ECHO_SIZE
    counter = [0, True]                     # completed requests, keep going
    conns = [await loop.create_connection(lambda: _EchoClient(msg, counter), HOST, port)
             for _ in range(ECHO_CLIENTS)]
    paths = [_path_of(t) for t, _ in conns]
    for t, _ in conns:
        t.write(msg)
    cpu = _CpuWindow(server_pid)
    done, elapsed = await _window(lambda: counter[0], seconds, cpu.start)
    res = {"rps": done / elapsed, "paths": paths}
    res.update(cpu.per_request(done, elapsed))
    counter[1] = False
    for t, p in conns:
        t.close()
        await p.closed
    return res


def _cpu_seconds(pid: int) -> Optional[float]:
    """CPU time of process ``pid`` so far (its main thread's, in ns from
    schedstat, else user + system in clock ticks); None without /proc."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class _CpuWindow:
    """The CPU this process (the client) and the server used over a timed
    window: ``start`` at its beginning, ``per_request`` at its end."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.client0: float = 0.0
        self.server0: Optional[float] = None

    def start(self) -> None:
        self.client0, self.server0 = time.process_time(), _cpu_seconds(self.server_pid)

    def per_request(self, done: int, elapsed: float) -> dict:
        """The client's CPU in percent of a core, and each side's CPU per
        request in microseconds (what the rate of a side that is busy all
        the time comes from)."""
        client = time.process_time() - self.client0
        server_end = _cpu_seconds(self.server_pid)
        res = {"client_cpu_percent": client / elapsed * 100}
        if done:
            res["client_cpu_us"] = client / done * 1e6
            if self.server0 is not None and server_end is not None:
                res["server_cpu_us"] = (server_end - self.server0) / done * 1e6
        return res


async def _client_aiohttp(port: int, seconds: float, in_flight: int, server_pid: int) -> dict:
    import aiohttp
    url = f"http://{HOST}:{port}/"
    count = [0]
    running = [True]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def worker() -> None:
            while running[0]:
                async with session.get(url) as r:
                    body = await r.read()
                assert r.status == 200 and body == b"Hello, World!", (r.status, body)
                count[0] += 1

        workers = [asyncio.create_task(worker()) for _ in range(in_flight)]
        cpu = _CpuWindow(server_pid)
        done, elapsed = await _window(lambda: count[0], seconds, cpu.start)
        # How busy the client was: near 100 % means the client's own code, not
        # the connection, sets the rate; then the ratio of the two paths is at
        # most the ratio of their client CPU per request.
        res = {"rps": done / elapsed, "paths": []}
        res.update(cpu.per_request(done, elapsed))
        running[0] = False
        await asyncio.gather(*workers)
    # aiohttp gives a client no public handle on the transport of a small
    # response (released before the caller sees it): the server checks.
    return res


def _client(kind: str, test: str, port: int, amount: float, server_pid: int, pipe: Any) -> None:
    _pin(0)
    if test == "rtt":
        coro = _client_rtt(port, int(amount))
    elif test.startswith("aiohttp"):
        coro = _client_aiohttp(port, amount, _in_flight(test), server_pid)
    else:
        coro = _client_echo(port, amount, server_pid)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(kind)) as runner:
            res = runner.run(coro)
    except BaseException as exc:          # the parent says what went wrong
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    pipe.send(res)


# --- the bound of a streams server -------------------------------------------------

class _NullTransport(asyncio.Transport):
    """A transport that costs nothing: each write hands the next request
    straight back to the reader (one loop callback later)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
        super().__init__()
        self.loop, self.reader, self.count = loop, reader, 0

    def write(self, data: Any) -> None:
        self.count += 1
        self.loop.call_soon(self.reader.feed_data, data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _streams_bound(seconds: float, pipe: Any) -> None:
    _pin(1)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport = _NullTransport(loop, reader)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        task = asyncio.ensure_future(_streams_echo(reader, writer))
        reader.feed_data(b"x" * ECHO_SIZE)
        await asyncio.sleep(seconds / 5)          # warm-up: a timed window
        n0, t0, c0 = transport.count, time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        n = transport.count - n0
        rate = n / (time.perf_counter() - t0)
        cpu_us = (time.process_time() - c0) / n * 1e6 if n else None
        task.cancel()
        return {"rps": rate, "cpu_us": cpu_us}

    import uvloop
    pipe.send(uvloop.run(main()))


def streams_bound(seconds: float) -> dict:
    """The streams echo server's own code (asyncio's StreamReader/StreamWriter
    on uvloop) with a transport that costs nothing, on one pinned core: its
    requests per second (``rps``) and CPU per request (``cpu_us``).  No
    transport can make the streams server use less CPU per request than
    this; on a loaded host the rate says less (a process that never waits
    for a peer gets a larger share of its core than a server that does), so
    the CPU per request is what to set beside the servers'."""
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_streams_bound, args=(seconds, there))
    p.start()
    there.close()
    try:
        if not here.poll(60):
            raise RuntimeError("the streams bound measurement gave no result")
        return here.recv()
    finally:
        _join(p)
        here.close()


# --- one measurement --------------------------------------------------------------

def _join(p: mp.process.BaseProcess) -> None:
    p.join(30)
    if p.exitcode is None:
        p.kill()
        p.join()


def run_one(kind: str, test: str, amount: float) -> dict:
    """Fork a server and a client; the client's result."""
    ctx = mp.get_context("fork")
    s_here, s_there = ctx.Pipe()
    c_here, c_there = ctx.Pipe()
    srv = ctx.Process(target=_server, args=(kind, test, s_there))
    srv.start()
    s_there.close()
    try:
        if not s_here.poll(30):
            raise RuntimeError(f"{kind} {test} server did not start")
        port = s_here.recv()
        cli = ctx.Process(target=_client, args=(kind, test, port, amount, srv.pid, c_there))
        cli.start()
        c_there.close()
        try:
            if not c_here.poll(120):
                raise RuntimeError(f"{kind} {test} client gave no result")
            res = c_here.recv()
        finally:
            _join(cli)
            c_here.close()
    finally:
        try:
            s_here.send("stop")
            served = s_here.recv() if s_here.poll(30) else []
        except (OSError, EOFError):
            served = []
        _join(srv)
        s_here.close()
    if "error" in res:
        raise RuntimeError(f"{kind} {test}: {res['error']}")
    res["paths"] = list(res["paths"]) + served
    if not res["paths"]:
        raise RuntimeError(f"{kind} {test}: no connection path checked")
    want = "shm" if kind == "shrimpio" else "tcp"
    if set(res["paths"]) != {want}:
        raise RuntimeError(f"{kind} {test}: connections took {res['paths']}, expected {want}")
    return res


# --- the whole run ------------------------------------------------------------------

def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    n_rt = 3000 if quick else 20000
    seconds = 1.0 if quick else 3.0
    try:
        import aiohttp  # noqa: F401  (imported once, before the forks)
        have_aiohttp = True
    except ImportError:
        have_aiohttp = False
    with private_registry():
        # The kinds take turns within each repeat, so that a noisy spell of
        # the machine hits both rather than one.
        def rtt() -> dict:
            runs: dict = {kind: [] for kind in KINDS}
            for _ in range(repeats):
                for kind in KINDS:
                    runs[kind].append(_stats(run_one(kind, "rtt", n_rt)["samples"]))
            return {kind: sorted(r, key=lambda x: x["median_us"])[len(r) // 2] for kind, r in runs.items()}

        def rps(test: str) -> dict:
            runs: dict = {kind: [] for kind in KINDS}
            for _ in range(repeats):
                for kind in KINDS:
                    runs[kind].append(run_one(kind, test, seconds)["rps"])
            return {kind: {"rps": statistics.median(r), "runs": r} for kind, r in runs.items()}

        # Other work on the machine distorts these figures (they were taken
        # on 2 cores): the load average at the start says whether there was any.
        res: dict = {"machine": machine(), "load_before": os.getloadavg()[0], "settings": {
            "rtt_rounds": n_rt, "seconds": seconds, "repeats": repeats, "echo_clients": ECHO_CLIENTS,
            "echo_bytes": ECHO_SIZE, "http_in_flight": list(HTTP_IN_FLIGHT)}}
        res["rtt_64B"] = rtt()
        res["echo_1KiB"] = {server: rps(f"echo-{server}") for server in ("protocol", "streams")}
        if have_aiohttp:
            for n in HTTP_IN_FLIGHT:
                res[f"aiohttp_{n}"] = rps(f"aiohttp-{n}")
    rt = res["rtt_64B"]
    ratios = {"rtt_uvloop_over_shrimpio": rt["uvloop"]["median_us"] / rt["shrimpio"]["median_us"]}
    for server, r in res["echo_1KiB"].items():
        ratios[f"echo_{server}_shrimpio_over_uvloop"] = r["shrimpio"]["rps"] / r["uvloop"]["rps"]
    for n in HTTP_IN_FLIGHT:
        ah = res.get(f"aiohttp_{n}")
        if ah:
            ratios[f"aiohttp_{n}_shrimpio_over_uvloop"] = ah["shrimpio"]["rps"] / ah["uvloop"]["rps"]
    res["ratios"] = ratios
    return res


LABELS = {"shrimpio": "shm", "uvloop": "uvloop TCP"}


def rate_figure(label: str, runs: list[float]) -> Figure:
    """A requests-per-second figure: the median of the repeats (a rate over
    a window has no p99)."""
    return Figure(label, statistics.median(runs), None, list(runs))


def echo_title(server: str, clients: int = ECHO_CLIENTS, nbytes: int = ECHO_SIZE) -> str:
    """The table title of the echo row for ``server`` (``protocol``, ``streams``)."""
    name = {"protocol": "Protocol"}.get(server, server)
    return f"asyncio echo {clients}x{nbytes // 1024} KiB, {name} server"


def aiohttp_title(in_flight: int) -> str:
    """The table title of the aiohttp row with ``in_flight`` requests."""
    return f"aiohttp hello world, {in_flight} in flight"


def rows(res: dict) -> list[Row]:
    """The result of :func:`run` as table rows (the shrimpio loop first,
    uvloop over TCP second)."""
    s = res["settings"]
    out = [Row("asyncio_rtt", "asyncio streams 64 B round trip", "us",
               [from_stats(LABELS[k], v) for k, v in res["rtt_64B"].items()])]
    for server, r in res["echo_1KiB"].items():
        out.append(Row(f"echo_{server}", echo_title(server, s["echo_clients"], s["echo_bytes"]), "req/s",
                       [rate_figure(LABELS[k], v.get("runs", [v["rps"]])) for k, v in r.items()]))
    for n in s.get("http_in_flight", ()):
        if f"aiohttp_{n}" in res:
            out.append(Row(f"aiohttp_{n}", aiohttp_title(n), "req/s",
                           [rate_figure(LABELS[k], v.get("runs", [v["rps"]])) for k, v in res[f"aiohttp_{n}"].items()]))
    return out


def report(res: dict) -> str:
    """The text table of :func:`run`'s result."""
    return "\n".join([machine_line(res["machine"], res.get("load_before")), "",
                      format_table(rows(res)), "",
                      "shm: the shrimpio loop over shared memory; uvloop TCP: uvloop over TCP loopback"])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    ap.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> None:
    res = run(quick=args.quick)
    print(json.dumps(res, indent=2) if args.json else report(res))


# --- the rows of ``shrimpio bench`` ---------------------------------------------

def _aio(kind: str, test: str) -> Measure:
    label = LABELS[kind]

    def m(s: Settings) -> Figure:
        if test == "rtt":                 # run_one checks each connection's path
            res = run_one(kind, test, s.async_rtt_rounds)
            return Figure.from_ns(label, res["samples"], paths=sorted(set(res["paths"])))
        res = run_one(kind, test, s.seconds)
        extra = {"paths": sorted(set(res["paths"]))}
        for k in ("client_cpu_percent", "client_cpu_us", "server_cpu_us"):
            if k in res:
                extra[k] = res[k]
        return Figure(label, res["rps"], None, [res["rps"]], extra)
    return m


def _loaded(measure: Measure) -> Measure:
    """``measure`` while a third process spins on core 1 (the server's)."""
    def m(s: Settings) -> Figure:
        with _busy_core(1):
            return measure(s)
    return m


class _busy_core:
    """A process of pure busy loop pinned to one core, for as long as the
    ``with`` lasts (a machine that is busy with something else)."""

    def __init__(self, core: int) -> None:
        self.core = core

    def __enter__(self) -> "_busy_core":
        import subprocess
        import sys
        code = (f"import os\ntry:\n    os.sched_setaffinity(0, {{{self.core}}})\n"
                "except OSError:\n    pass\nwhile True:\n    pass\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


def _streams_bound_figure(s: Settings) -> Figure:
    res = streams_bound(s.seconds)
    extra = {} if res["cpu_us"] is None else {"server_cpu_us": res["cpu_us"]}
    return Figure("asyncio alone", res["rps"], None, [res["rps"]], extra)


def specs() -> list[Spec]:
    """``asyncio_rtt``, the echo rows and the aiohttp rows."""
    return [
        Spec("asyncio_rtt", "asyncio streams 64 B round trip", "us",
             [(LABELS[k], _aio(k, "rtt")) for k in KINDS]),
        Spec("echo_protocol", echo_title("protocol"), "req/s",
             [(LABELS[k], _aio(k, "echo-protocol")) for k in KINDS]),
        Spec("echo_streams", echo_title("streams"), "req/s",
             [(LABELS[k], _aio(k, "echo-streams")) for k in KINDS] + [("asyncio alone", _streams_bound_figure)]),
    ] + [
        Spec(f"aiohttp_{n}", aiohttp_title(n), "req/s",
             [(LABELS[k], _aio(k, f"aiohttp-{n}")) for k in KINDS], needs="aiohttp")
        for n in HTTP_IN_FLIGHT
    ] + [
        Spec("aiohttp_4_load", aiohttp_title(4) + ", a core busy", "req/s",
             [(LABELS[k], _loaded(_aio(k, "aiohttp-4"))) for k in KINDS], needs="aiohttp"),
    ]
