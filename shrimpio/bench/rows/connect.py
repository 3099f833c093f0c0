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
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket as _std
import tempfile
import time
from typing import Any, Sequence

from ._bench import _pin
from .socket import info, socket as ShmSocket

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
    from ._bench_asyncio import _loop_factory, _path_of

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
