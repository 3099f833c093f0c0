"""Connection benchmarks: connect+accept time and the CPU an idle pair uses.

* :func:`bench_connect` - per connection, one whole short-lived connection
  as a one-request-per-connection client makes them: ``socket()`` +
  ``connect()``, one byte there, the server's ``accept()``, one byte back,
  both ``close()``\\ s (connections do not overlap), for shrimpio over shared
  memory, kernel TCP loopback and a Unix socket.  Both sides check every
  connection's path (``shrimpio.socket.info``), outside the timed part.
* :func:`idle_pair` - two processes connected through shrimpio (blocking
  sockets, or the shrimpio asyncio loop) exchange one message, then each
  blocks in ``recv`` / awaits a read; :func:`cpu_percent` reads their CPU
  time (``/proc/<pid>/stat`` utime + stime) over a window.

Each pair is pinned to two cores (server 1, client 0).

Run as a program, it measures :func:`bench_connect` alone, in interleaved
rounds, each in a fresh interpreter (the machine is noisy), and prints the
median of the rounds' medians beside the pooled percentiles; ``--tree DIR``
measures the ``shrimpio`` kind of another checkout as well (built in
place), labelled ``shrimpio@DIR``: a before/after comparison in one run.

    python -m shrimpio.bench.rows.connect [--rounds 5] [-n 3000] [--tree ../old] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import socket as _std
import tempfile
import time
from typing import Any, Sequence

from ..common import pin as _pin
from ...socket import info, socket as ShmSocket
from ..spec import Measure, Settings, Spec
from ..table import Figure

__all__ = ["CONNECT_KINDS", "bench_connect", "cpu_percent", "cpu_seconds", "idle_pair"]

CONNECT_KINDS = ("shrimpio", "tcp", "unix")
HOST = "127.0.0.1"
_TICK = os.sysconf("SC_CLK_TCK")


def _path(sock: Any) -> str:
    """``shm`` / ``tcp`` for an inet stream socket (shrimpio's or the
    stdlib's), ``unix`` for a Unix one."""
    if sock.family == _std.AF_UNIX:
        return "unix"
    return info(sock)["path"] or "?"


def _reap(p: mp.process.BaseProcess, timeout: float = 30) -> None:
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()


# --- connect + accept ---------------------------------------------------------

def _acceptor(lst: Any, n: int, pipe: Any) -> None:
    _pin(1)
    paths = set()
    for _ in range(n):
        conn, _ = lst.accept()
        if not conn.recv(1):
            raise ConnectionError("client closed before its byte")
        conn.sendall(b"s")
        paths.add(_path(conn))
        conn.close()
    lst.close()
    pipe.send(sorted(paths))


def bench_connect(kind: str, n: int) -> dict[str, Any]:
    """``n`` connections (after ``n // 10`` of warm-up) to a forked server
    that accepts each, reads a byte, answers one and closes: ``{"samples":
    ns per connection, "paths": the paths the client and the server saw}``."""
    if kind not in CONNECT_KINDS:
        raise ValueError(f"kind must be one of {CONNECT_KINDS}, not {kind!r}")
    warm = n // 10
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-") as tmp:
        if kind == "unix":
            family, addr = _std.AF_UNIX, os.path.join(tmp, "s")
            lst = _std.socket(family, _std.SOCK_STREAM)
            lst.bind(addr)
        else:
            family = _std.AF_INET
            lst = (ShmSocket if kind == "shrimpio" else _std.socket)(family, _std.SOCK_STREAM)
            lst.bind((HOST, 0))
            addr = lst.getsockname()
        lst.listen(128)
        p = ctx.Process(target=_acceptor, args=(lst, n + warm, there))
        p.start()
        lst.close()
        there.close()
        cls = ShmSocket if kind == "shrimpio" else _std.socket
        clock = time.perf_counter_ns
        samples, paths = [], set()
        buf = bytearray(1)
        try:
            _pin(0)
            for i in range(n + warm):
                t0 = clock()
                s = cls(family, _std.SOCK_STREAM)
                try:
                    s.connect(addr)
                    t1 = clock()
                    paths.add(_path(s))      # not timed
                    t2 = clock()
                    s.sendall(b"c")
                    if s.recv_into(buf, 1) != 1:
                        raise ConnectionError("server closed before its byte")
                finally:
                    s.close()
                t3 = clock()
                if i >= warm:
                    samples.append(t3 - t0 - (t2 - t1))
            served = here.recv() if here.poll(30) else ["?"]
        finally:
            here.close()
            _reap(p)
    return {"samples": samples, "paths": sorted(paths | set(served))}


# --- CPU time of other processes ----------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK     # utime, stime (fields 14, 15)


def cpu_percent(pids: Sequence[int], seconds: float) -> list[float]:
    """Each process's CPU use over the next ``seconds``, in percent of one
    core (clock-tick resolution: 1 % over 1 s)."""
    before = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(seconds)                   # the measurement window
    after = [cpu_seconds(p) for p in pids]
    wall = time.monotonic() - t0
    return [100 * (b - a) / wall for a, b in zip(before, after)]


# --- an idle connected pair ------------------------------------------------------

class _Stop(Exception):
    pass


def _raise_stop(*_: Any) -> None:
    raise _Stop


def _idle_socket_side(lst: Any, server: bool, pipe: Any) -> None:
    _pin(1 if server else 0)
    if server:
        conn, _ = lst.accept()
        lst.close()
    else:
        lst.close()                     # the client's copy of the listener
        conn = ShmSocket(_std.AF_INET, _std.SOCK_STREAM)
        conn.connect(pipe.recv())
        signal.signal(signal.SIGUSR1, _raise_stop)
    try:
        if server:
            conn.sendall(conn.recv(64))
        else:
            conn.sendall(b"p" * 64)
            conn.recv(64)
        pipe.send(_path(conn))
        conn.recv(1)                    # idle: the server until EOF, the client until SIGUSR1
    except _Stop:
        pass
    finally:
        conn.close()


def _idle_asyncio_side(server: bool, pipe: Any) -> None:
    _pin(1 if server else 0)
    from .aio import _loop_factory, _path_of

    async def serve() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(64))
            pipe.send(_path_of(writer.transport))
            await reader.read(1)                       # idle until EOF
            writer.close()
            done.set_result(None)

        srv = await asyncio.start_server(handle, HOST, 0)
        pipe.send(srv.sockets[0].getsockname())
        await done
        srv.close()
        await srv.wait_closed()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(*pipe.recv())
        writer.write(b"p" * 64)
        await reader.readexactly(64)
        idle = asyncio.ensure_future(reader.read(1))  # idle until SIGUSR1
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, idle.cancel)
        pipe.send(_path_of(writer.transport))
        try:
            await idle
        except asyncio.CancelledError:
            pass
        writer.close()
        await writer.wait_closed()

    with asyncio.Runner(loop_factory=_loop_factory("shrimpio")) as runner:
        runner.run(serve() if server else client())


def idle_pair(kind: str, seconds: float) -> dict[str, Any]:
    """Connect two forked processes through shrimpio (``kind``: ``socket``
    for blocking sockets, ``asyncio`` for the shrimpio loop), let them go
    idle and measure them for ``seconds``: ``{"percent": the pair's CPU in
    percent of one core, "per_process": [server, client], "paths": [...]}``."""
    ctx = mp.get_context("fork")
    s_here, s_there = ctx.Pipe()
    c_here, c_there = ctx.Pipe()
    procs = []
    try:
        if kind == "socket":
            lst = ShmSocket(_std.AF_INET, _std.SOCK_STREAM)
            lst.bind((HOST, 0))
            lst.listen()
            addr = lst.getsockname()
            procs = [ctx.Process(target=_idle_socket_side, args=(lst, True, s_there)),
                     ctx.Process(target=_idle_socket_side, args=(lst, False, c_there))]
            for p in procs:
                p.start()
            lst.close()
        else:
            procs = [ctx.Process(target=_idle_asyncio_side, args=(True, s_there)),
                     ctx.Process(target=_idle_asyncio_side, args=(False, c_there))]
            procs[0].start()
            if not s_here.poll(30):
                raise RuntimeError("idle asyncio server did not start")
            addr = s_here.recv()
            procs[1].start()
        s_there.close()
        c_there.close()
        c_here.send(addr)
        paths = []
        for pipe in (s_here, c_here):
            if not pipe.poll(30):
                raise RuntimeError(f"idle {kind} pair did not connect")
            paths.append(pipe.recv())
        per_process = cpu_percent([p.pid for p in procs], seconds)
        os.kill(procs[1].pid, signal.SIGUSR1)
    finally:
        for p in reversed(procs):
            if p.pid is not None:
                _reap(p, 10)
        for pipe in (s_here, c_here, s_there, c_there):
            pipe.close()
    return {"percent": sum(per_process), "per_process": per_process, "paths": paths}


# --- the rows of ``shrimpio bench`` ---------------------------------------------

_LABELS = {"shrimpio": "shm", "tcp": "TCP", "unix": "Unix"}


def _connect(kind: str) -> Measure:
    def m(s: Settings) -> Figure:
        res = bench_connect(kind, s.connects)
        want = {"shrimpio": "shm"}.get(kind, kind)
        if res["paths"] != [want]:
            raise RuntimeError(f"{kind} connections took {res['paths']}, expected {want}")
        return Figure.from_ns(_LABELS[kind], res["samples"], paths=res["paths"])
    return m


def _idle(kind: str) -> Measure:
    def m(s: Settings) -> Figure:
        res = idle_pair(kind, s.idle_seconds)
        if set(res["paths"]) != {"shm"}:
            raise RuntimeError(f"idle {kind} pair took {res['paths']}, expected shm")
        return Figure("shm", res["percent"], None, [res["percent"]],
                      {"per_process": res["per_process"], "paths": res["paths"], "seconds": s.idle_seconds})
    return m


def specs() -> list[Spec]:
    """``connect``."""
    return [Spec("connect", "connect+accept+close", "us", [(_LABELS[k], _connect(k)) for k in CONNECT_KINDS])]


def idle_specs() -> list[Spec]:
    """``idle_socket`` and ``idle_asyncio``: one measurement each (it lasts
    ``idle_seconds``)."""
    return [Spec("idle_socket", "idle CPU, blocking socket pair", "%", [("shm", _idle("socket"))], repeat=False),
            Spec("idle_asyncio", "idle CPU, asyncio pair", "%", [("shm", _idle("asyncio"))], repeat=False)]


# --- ``python -m shrimpio.bench.rows.connect``: rounds in fresh interpreters ----------

#: One round of one kind, in a fresh interpreter; argv: tree (or ""), kind, n.
#: An older checkout has the benchmark at ``shrimpio._bench_conn``.
_ROUND = ("import sys, json\n"
          "if sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
          "try:\n    from shrimpio.bench.rows.connect import bench_connect\n"
          "except ImportError:\n    from shrimpio._bench_conn import bench_connect\n"
          "print(json.dumps(bench_connect(sys.argv[2], int(sys.argv[3]))['samples']))\n")


def _pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))] / 1000


def rounds(n: int, nrounds: int, trees: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per label (each kind, and ``shrimpio@TREE`` per other checkout), the
    median of the rounds' medians, each round's median and the pooled
    percentiles, in microseconds."""
    runs = [(f"shrimpio@{t}", os.path.abspath(t), "shrimpio") for t in trees]
    runs += [(kind, "", kind) for kind in CONNECT_KINDS]
    res: dict[str, list[list[int]]] = {label: [] for label, _, _ in runs}
    for _ in range(nrounds):
        for label, tree, kind in runs:
            out = subprocess.run([sys.executable, "-c", _ROUND, tree, kind, str(n)],
                                 capture_output=True, text=True, check=True, cwd="/").stdout
            res[label].append(json.loads(out))
    table = {}
    for label, rs in res.items():
        pooled = [v for r in rs for v in r]
        medians = [statistics.median(r) / 1000 for r in rs]
        table[label] = {"median_of_medians_us": statistics.median(medians), "round_medians_us": medians,
                        "p50_us": _pct(pooled, 0.5), "p90_us": _pct(pooled, 0.9),
                        "p99_us": _pct(pooled, 0.99), "n": len(pooled)}
    return table


def _main() -> None:
    ap = argparse.ArgumentParser(prog="python -m shrimpio.bench.rows.connect",
                                 description="connect+accept+close: shrimpio vs TCP vs Unix, in rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=3000, help="connections per kind and round")
    ap.add_argument("--tree", action="append", default=[],
                    help="another checkout whose shrimpio kind to measure too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = rounds(args.n, args.rounds, args.tree)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'':24s}{'median*':>9s}{'p50':>9s}{'p90':>9s}{'p99':>9s}   round medians (us)")
    for label, t in table.items():
        print(f"{label:24s}{t['median_of_medians_us']:9.1f}{t['p50_us']:9.1f}{t['p90_us']:9.1f}"
              f"{t['p99_us']:9.1f}   " + " ".join(f"{m:.0f}" for m in t["round_medians_us"]))
    print("* median of the rounds' medians; p50/p90/p99 of all samples pooled")


if __name__ == "__main__":
    _main()
