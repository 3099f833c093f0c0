"""Blocking-socket benchmark: the same client/server code over shrimpio
shared memory, kernel TCP loopback and a Unix socket, in one run.

* 64-byte ping-pong round trip: ``sendall`` 64 bytes, ``recv_into`` 64 back;
* bandwidth: ``sendall`` of a 64 KiB, 1 MiB or 16 MiB message, the peer
  ``recv_into``s it all into one buffer and answers 8 bytes (``shrimpio
  bench`` adds one ``memcpy`` of the message as the floor: the data is
  copied into the ring and out of it);
* the 64-byte round trip again with both sides waiting in a selector
  (epoll) before each read, as RPC libraries and hand-written servers do
  (for shrimpio: the patched selector, as ``import shrimpio.patch`` gives).

The two processes are pinned to two different cores.  Each figure is the
median of three repeats (one with ``--quick``).

    python -m shrimpio bench-socket [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import socket as _std
import tempfile
import time
from typing import Any

from ..._epoll import epoll as _ShmEpoll
from ...socket import info, socket as ShmSocket
from ..common import machine, private_registry
from ..common import pin as _pin
from ..common import stats as _stats
from ..spec import Measure, Settings, Spec
from ..table import Figure, Row, format_table, from_stats, machine_line
from . import vmmc, zmq_ipc


class _ShmSelector(selectors.EpollSelector):
    """The epoll selector as the patch makes it: shrimpio's epoll."""
    _selector_cls = _ShmEpoll   # type: ignore[assignment]

MIB = 1 << 20


def _recv_exact(sock, view, n: int, sel=None) -> None:
    got = 0
    while got < n:
        if sel is not None:
            sel.select()
        k = sock.recv_into(view[got:n], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def _selector(sock, poll: bool):
    """A selector watching ``sock`` for reading, or None (``poll`` false)."""
    if not poll:
        return None
    sel = (_ShmSelector if isinstance(sock, ShmSocket) else selectors.EpollSelector)()
    sel.register(sock, selectors.EVENT_READ)
    return sel


def _serve(listener, rounds: int, size: int, reply: int, poll: bool = False, idle: int = 0) -> None:
    """The server: the same code whatever the transport.  ``idle``: after
    the busy connection, accept that many more and register them in the
    selector too (they stay silent)."""
    _pin(1)
    conn, _ = listener.accept()
    quiet = [listener.accept()[0] for _ in range(idle)]
    listener.close()
    sel = _selector(conn, poll)
    for q in quiet:
        sel.register(q, selectors.EVENT_READ)
    buf = memoryview(bytearray(max(size, reply)))
    out = b"r" * reply
    for _ in range(rounds):
        _recv_exact(conn, buf, size, sel)
        conn.sendall(out)
    if sel is not None:
        sel.close()
    for q in quiet:
        q.close()
    conn.close()


def _client(sock, rounds: int, size: int, reply: int, poll: bool = False) -> list[int]:
    _pin(0)
    sel = _selector(sock, poll)
    msg = b"p" * size
    buf = memoryview(bytearray(reply))
    clock = time.perf_counter_ns
    out = []
    for _ in range(rounds):
        t0 = clock()
        sock.sendall(msg)
        _recv_exact(sock, buf, reply, sel)
        out.append(clock() - t0)
    if sel is not None:
        sel.close()
    sock.close()
    return out


def _listener(kind: str, path: str):
    if kind == "unix":
        lst = _std.socket(_std.AF_UNIX, _std.SOCK_STREAM)
        lst.bind(path)
        lst.listen()
        return lst, path
    cls = ShmSocket if kind == "shrimpio" else _std.socket
    lst = cls(_std.AF_INET, _std.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    return lst, lst.getsockname()


def _connected(kind: str, addr: Any):
    if kind == "unix":
        sock = _std.socket(_std.AF_UNIX, _std.SOCK_STREAM)
    else:
        sock = (ShmSocket if kind == "shrimpio" else _std.socket)(_std.AF_INET, _std.SOCK_STREAM)
        sock.setsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY, 1)
    try:
        sock.connect(addr)
        if kind == "shrimpio" and info(sock)["path"] != "shm":
            raise RuntimeError(f"shrimpio connection took {info(sock)}, expected shared memory")
    except BaseException:
        sock.close()
        raise
    return sock


def run_one(kind: str, rounds: int, size: int, reply: int, poll: bool = False,
            idle: int = 0) -> list[int]:
    """Fork a server for ``kind`` (shrimpio, tcp, unix) and be its client:
    the round-trip times in ns.  ``poll``: both wait in a selector before
    each read; ``idle``: that many more connections stay silent, registered
    in the server's selector.  A shrimpio connection that did not take
    shared memory is an error."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if idle:
        # Each shared-memory connection holds two fds on each side (the
        # control socket and the space doorbell): the soft limit goes up
        # for the run, as far as the hard one allows.
        want = 2 * idle + 256
        if limits[1] != resource.RLIM_INFINITY and limits[1] < want:
            raise RuntimeError(f"{idle} idle connections need {want} fds; the hard limit is {limits[1]}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(limits[0], want), limits[1]))
    try:
        return _run_one(kind, rounds, size, reply, poll, idle)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def _run_one(kind: str, rounds: int, size: int, reply: int, poll: bool, idle: int) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-") as tmp:
        lst, addr = _listener(kind, os.path.join(tmp, "unix.sock"))
        p = mp.get_context("fork").Process(target=_serve, args=(lst, rounds, size, reply, poll, idle))
        p.start()
        lst.close()
        quiet: list = []
        sock = None
        try:
            sock = _connected(kind, addr)
            quiet = [_connected(kind, addr) for _ in range(idle)]
            return _client(sock, rounds, size, reply, poll)
        finally:
            for q in quiet:
                q.close()
            if sock is not None:
                sock.close()        # done, or failed: either way the server sees EOF
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()


KINDS = ("shrimpio", "tcp", "unix")


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    n_rt = 5000 if quick else 50000
    n_bw = 100 if quick else 1000
    with private_registry():
        def best(*args):
            runs = sorted((_stats(run_one(*args)) for _ in range(repeats)), key=lambda r: r["median_us"])
            return runs[len(runs) // 2]
        res = {"machine": machine(), "rtt_64B": {}, "bw_1MiB": {}}
        for kind in KINDS:
            res["rtt_64B"][kind] = best(kind, n_rt, 64, 64)
        for kind in KINDS:
            r = best(kind, n_bw, MIB, 8)
            r["MiB_per_s"] = 1e6 / r["median_us"]
            res["bw_1MiB"][kind] = r
    rt, bw = res["rtt_64B"], res["bw_1MiB"]
    res["ratios"] = {
        "tcp_rtt_over_shrimpio": rt["tcp"]["median_us"] / rt["shrimpio"]["median_us"],
        "unix_rtt_over_shrimpio": rt["unix"]["median_us"] / rt["shrimpio"]["median_us"],
        "shrimpio_bw_over_unix": bw["shrimpio"]["MiB_per_s"] / bw["unix"]["MiB_per_s"],
        "shrimpio_bw_over_tcp": bw["shrimpio"]["MiB_per_s"] / bw["tcp"]["MiB_per_s"],
    }
    return res


LABELS = {"shrimpio": "shm", "tcp": "TCP", "unix": "Unix"}


def rows(res: dict) -> list[Row]:
    """The result of :func:`run` as table rows (shrimpio first, then TCP, Unix)."""
    return [Row("socket_rtt", "socket 64 B round trip", "us",
                [from_stats(LABELS[k], v) for k, v in res["rtt_64B"].items()]),
            Row("socket_bw", "socket 1 MiB sendall + 8 B ack", "MiB/s",
                [from_stats(LABELS[k], v, MIB) for k, v in res["bw_1MiB"].items()])]


def report(res: dict) -> str:
    """The text table of :func:`run`'s result."""
    return "\n".join([machine_line(res["machine"]), "", format_table(rows(res))])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer iterations, one repeat")
    ap.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> None:
    res = run(quick=args.quick)
    print(json.dumps(res, indent=2) if args.json else report(res))


# --- the rows of ``shrimpio bench`` ---------------------------------------------

#: Bandwidth rows: key -> message size.  ``socket_bw`` (1 MiB) carries the goal.
BW_SIZES = {"socket_bw_64k": 64 << 10, "socket_bw": MIB, "socket_bw_16m": 16 * MIB}
_PATHS = {"shrimpio": "shm", "tcp": "tcp", "unix": "unix"}
_SOCK = [("shm", "shrimpio"), ("TCP", "tcp"), ("Unix", "unix")]


def bw_rounds(s: Settings, size: int) -> int:
    """Messages per bandwidth figure: about ``bw_rounds`` MiB whatever the
    size (each figure moves the same bytes), at least 10 messages."""
    return max(10, s.bw_rounds * MIB // size)


def _rtt(kind: str, label: str, poll: bool = False, idle: int = 0) -> Measure:
    def m(s: Settings) -> Figure:
        samples = run_one(kind, s.rtt_rounds, 64, 64, poll=poll, idle=idle)   # checks shrimpio took shm
        return Figure.from_ns(label, samples, paths=[_PATHS[kind]])
    return m


#: Silent connections beside the busy one in ``socket_idle_rtt``.
IDLE = 1000


def _bw(kind: str, label: str, size: int) -> Measure:
    def m(s: Settings) -> Figure:
        samples = run_one(kind, bw_rounds(s, size), size, 8)
        return Figure.from_ns(label, samples, size, paths=[_PATHS[kind]])
    return m


def _size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size >> 10} KiB"


def specs() -> list[Spec]:
    """``socket_rtt``, the bandwidth rows (64 KiB, 1 MiB, 16 MiB) and
    ``socket_poll_rtt``."""
    out = [Spec("socket_rtt", "socket 64 B round trip", "us",
                [(lb, _rtt(k, lb)) for lb, k in _SOCK] + [("zmq ipc", zmq_ipc.measure(64)), ("floor", vmmc.floor)])]
    for key, size in BW_SIZES.items():
        kinds = [(lb, _bw(k, lb, size)) for lb, k in _SOCK]
        if size == MIB:
            kinds.append(("zmq ipc", zmq_ipc.measure(size, lambda s: bw_rounds(s, MIB))))
        kinds.append(("memcpy", lambda s, size=size: vmmc.memcpy(size, bw_rounds(s, size))))
        out.append(Spec(key, f"socket {_size_name(size)} sendall + 8 B ack", "MiB/s", kinds))
    out.append(Spec("socket_poll_rtt", "socket 64 B round trip, epoll before each read", "us",
                    [(lb, _rtt(k, lb, poll=True)) for lb, k in _SOCK]))
    out.append(Spec("socket_idle_rtt",
                    f"socket 64 B round trip, epoll before each read, {IDLE} idle connections", "us",
                    [(lb, _rtt(k, lb, poll=True, idle=IDLE)) for lb, k in _SOCK]))
    return out
