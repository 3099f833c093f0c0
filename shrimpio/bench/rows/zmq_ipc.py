"""pyzmq over ``ipc://`` as a peer of the blocking-socket benchmark.

A REQ/REP pair in two forked processes pinned to two cores, the same
workload as ``sockets``: a 64-byte request answered with 64 bytes
(round trip), or 1 MiB answered with 8 bytes (bandwidth).  Each process
makes its own ``zmq.Context`` after the fork.  pyzmq is optional
(``pip install 'shrimpio[bench]'``): :func:`available` says whether it is
there.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import tempfile
import time
from typing import Any, Callable

from ..common import pin as _pin
from ..spec import Measure, NotInstalled, Settings
from ..table import Figure

__all__ = ["available", "bench_zmq", "measure", "version"]


def available() -> bool:
    """Whether pyzmq can be imported."""
    return importlib.util.find_spec("zmq") is not None


def version() -> str:
    """``pyzmq X (libzmq Y)``, or ``not installed``."""
    if not available():
        return "not installed"
    import zmq
    return f"{zmq.__version__} (libzmq {zmq.zmq_version()})"


def _rep(url: str, rounds: int, reply: int, pipe: Any) -> None:
    import zmq
    _pin(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(url)
        pipe.send("bound")
        out = b"r" * reply
        for _ in range(rounds):
            sock.recv(copy=False)
            sock.send(out)
    finally:
        sock.close()
        ctx.term()


def bench_zmq(rounds: int, size: int, reply: int) -> list[int]:
    """Round-trip times in ns of ``rounds`` REQ/REP exchanges: ``size``
    bytes out, ``reply`` bytes back, over an ``ipc://`` socket."""
    import zmq
    ctx_mp = mp.get_context("fork")
    here, there = ctx_mp.Pipe()
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-") as tmp:
        url = "ipc://" + os.path.join(tmp, "zmq")
        p = ctx_mp.Process(target=_rep, args=(url, rounds, reply, there))
        p.start()
        there.close()
        ctx = sock = None
        affinity = os.sched_getaffinity(0)
        try:
            if not here.poll(30):
                raise RuntimeError("pyzmq REP server did not start")
            here.recv()
            _pin(0)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(url)
            msg = b"p" * size
            clock = time.perf_counter_ns
            out = []
            for _ in range(rounds):
                t0 = clock()
                sock.send(msg)
                sock.recv(copy=False)
                out.append(clock() - t0)
            return out
        finally:
            os.sched_setaffinity(0, affinity)   # (pinned to measure: the caller's again)
            if sock is not None:
                sock.close()
            if ctx is not None:
                ctx.term()
            here.close()
            p.join(30)
            if p.exitcode is None:
                p.kill()
                p.join()


def measure(size: int, bw_rounds: Callable[[Settings], int] = lambda s: s.bw_rounds) -> Measure:
    """The ``zmq ipc`` peer of a socket row: 64 B answered with 64 (round
    trip), or ``size`` bytes answered with 8, ``bw_rounds`` times (bandwidth)."""
    def m(s: Settings) -> Figure:
        if not available():
            raise NotInstalled("pyzmq not installed")
        n, reply = (s.rtt_rounds, 64) if size == 64 else (bw_rounds(s), 8)
        return Figure.from_ns("zmq ipc", bench_zmq(n, size, reply), 0 if size == 64 else size)
    return m
