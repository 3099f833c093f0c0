"""VMMC benchmark: put + polled reply round trip, and 1 MiB put bandwidth.

Measured in one run, each pair of processes pinned to two different cores:

* ``reference``  - the floor: a minimal two-call Cython spin loop (one call
  stores a word into shared memory, one spins until the peer's word changes);
* ``vmmc``       - ``ImportedBuffer.send(..., notify=True)`` + ``ExportedBuffer.wait()``;
* ``unix``       - a Unix stream socketpair, ``send`` + ``recv_into``.

Bandwidth: the sender puts 1 MiB (one ``send`` / ``sendall``), the receiver
takes it (VMMC: the data is already in its buffer; Unix: ``recv_into`` until
1 MiB arrived) and answers with 8 bytes.

Doorbells: the same two-process ping-pong over a pair of ``Ring``s with
``busy_poll_us=0`` (every wait sleeps, every hand-off rings), once with the
connection's Unix socket as the doorbell and once with eventfds.  This is
the measurement behind the doorbell choice (docs/data-plane.md).

    python -m shrimpio pingpong [--quick] [--json] [--doorbells]
    python -m shrimpio.bench.rows.vmmc [--quick] [--json] [--doorbells]  (the same)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import time

from ... import _fastpath
from ..._fastpath import Ring, Segment
from ...vmmc import Endpoint
from ..common import MIB, machine, private_registry
from ..common import pin as _pin
from ..common import stats as _stats
from ..spec import Measure, Settings, Spec
from ..table import Figure, Row, format_table, from_stats, machine_line


# --- reference: two calls per half trip, nothing else -----------------------

def _ref_peer(seg: Segment, n: int, ready) -> None:
    _pin(1)
    ready.wait()
    store, wait = _fastpath._ref_store, _fastpath._ref_wait
    for i in range(1, n + 1):
        wait(seg, 0, i)
        store(seg, 64, i)


def bench_reference(n: int) -> list[int]:
    seg = Segment(4096)
    ready = mp.get_context("fork").Event()
    p = mp.get_context("fork").Process(target=_ref_peer, args=(seg, n, ready))
    p.start()
    _pin(0)
    store, wait, clock = _fastpath._ref_store, _fastpath._ref_wait, time.perf_counter_ns
    out = []
    ready.set()
    for i in range(1, n + 1):
        t0 = clock()
        store(seg, 0, i)
        wait(seg, 64, i)
        out.append(clock() - t0)
    p.join()
    seg.close()
    return out


# --- VMMC ---------------------------------------------------------------------

def _vmmc_peer(n: int, size: int, ready) -> None:
    _pin(1)
    with Endpoint("bench-b") as ep:
        inbox = ep.export("in", size)
        ready.wait()
        out = ep.import_buffer("bench-a", "in")
        reply = b"r" * 8 if size > 64 else b"r" * 64
        wait, send = inbox.wait, out.send
        for _ in range(n):
            wait()
            send(reply, 0, notify=True)
        out.close()
        inbox.close()


def bench_vmmc(n: int, size: int) -> list[int]:
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    with Endpoint("bench-a") as ep:
        inbox = ep.export("in", 4096)
        p = ctx.Process(target=_vmmc_peer, args=(n, size, ready))
        p.start()
        _pin(0)
        out = None
        deadline = time.monotonic() + 10
        ready.set()
        while out is None:
            try:
                out = ep.import_buffer("bench-b", "in")
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)   # waiting for the peer's export to appear
        msg = b"p" * size
        wait, send, clock = inbox.wait, out.send, time.perf_counter_ns
        res = []
        for _ in range(n):
            t0 = clock()
            send(msg, 0, notify=True)
            wait()
            res.append(clock() - t0)
        p.join()
        out.close()
        inbox.close()
    return res


# --- Unix socket --------------------------------------------------------------

def _unix_peer(sock: socket.socket, n: int, size: int) -> None:
    _pin(1)
    buf = bytearray(size)
    view = memoryview(buf)
    reply = b"r" * 8 if size > 64 else b"r" * 64
    for _ in range(n):
        got = 0
        while got < size:
            got += sock.recv_into(view[got:])
        sock.sendall(reply)


def bench_unix(n: int, size: int) -> list[int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    p = mp.get_context("fork").Process(target=_unix_peer, args=(b, n, size))
    p.start()
    b.close()
    _pin(0)
    msg = b"p" * size
    rsize = 8 if size > 64 else 64
    buf = bytearray(rsize)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    res = []
    for _ in range(n):
        t0 = clock()
        a.sendall(msg)
        got = 0
        while got < rsize:
            got += a.recv_into(view[got:])
        res.append(clock() - t0)
    p.join()
    a.close()
    return res


def bench_memcpy(n: int, size: int = MIB) -> list[int]:
    """One copy of the same ``size``-byte message into a mapped segment:
    the floor for a put."""
    src = b"p" * size
    seg = Segment(size)
    dst = memoryview(seg)
    clock = time.perf_counter_ns
    res = []
    for _ in range(n):
        t0 = clock()
        dst[:] = src
        res.append(clock() - t0)
    dst.release()
    seg.close()
    return res


# --- doorbells: socket vs eventfd, every wait sleeps ------------------------

def _bell_rings(seg: Segment, bell: str, fds: tuple, create: bool, side: int):
    """Two rings in ``seg``: ring 0 carries side 0 -> 1, ring 1 side 1 -> 0.
    ``fds`` gives, per ring, the fd this side sleeps on or rings."""
    cap = 4096
    off1 = Ring.footprint(cap)
    r0 = Ring(seg, 0, cap, create=create, data_bell=fds[0], space_bell=fds[0], bell=bell,
              busy_poll_us=0)
    r1 = Ring(seg, off1, cap, create=create, data_bell=fds[1], space_bell=fds[1], bell=bell,
              busy_poll_us=0)
    return (r0, r1) if side == 0 else (r1, r0)   # (outgoing, incoming)


def _bell_peer(seg: Segment, bell: str, fds: tuple, n: int) -> None:
    _pin(1)
    out, inc = _bell_rings(seg, bell, fds, False, 1)
    buf = bytearray(1)
    for _ in range(n):
        inc.read_into(buf, 1, None)
        out.write(buf)
    out.close()
    inc.close()


def bench_doorbell(n: int, bell: str) -> list[int]:
    seg = Segment(2 * Ring.footprint(4096))
    if bell == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine, theirs, keep = (a.fileno(), a.fileno()), (b.fileno(), b.fileno()), (a, b)
    else:
        e0 = os.eventfd(0, os.EFD_NONBLOCK)
        e1 = os.eventfd(0, os.EFD_NONBLOCK)
        mine = theirs = (e0, e1)
        keep = ()
    out, inc = _bell_rings(seg, bell, mine, True, 0)
    p = mp.get_context("fork").Process(target=_bell_peer, args=(seg, bell, theirs, n))
    p.start()
    _pin(0)
    buf = bytearray(1)
    clock = time.perf_counter_ns
    res = []
    for _ in range(n):
        t0 = clock()
        out.write(b"x")
        inc.read_into(buf, 1, 10.0)
        res.append(clock() - t0)
    p.join()
    out.close()
    inc.close()
    for s in keep:
        s.close()
    if bell != "socket":
        os.close(mine[0])
        os.close(mine[1])
    seg.close()
    return res


def run(quick: bool = False, repeats: int = 3, doorbells: bool = False) -> dict:
    """Run everything in a private registry; see :func:`_run`."""
    with private_registry():
        return _run(quick, repeats, doorbells)


def _run(quick: bool, repeats: int, doorbells: bool) -> dict:
    """Run everything; each measurement is repeated and the run with the
    median median is kept (the machine is noisy)."""
    n_rt = 5000 if quick else 50000
    n_bw = 100 if quick else 1000
    if quick:
        repeats = 1

    def best(fn, *args):
        runs = [_stats(fn(*args)) for _ in range(repeats)]
        runs.sort(key=lambda r: r["median_us"])
        return runs[len(runs) // 2]

    res = {"machine": machine(), "rtt_64B": {}, "put_1MiB": {}}
    res["rtt_64B"]["reference"] = best(bench_reference, n_rt)
    res["rtt_64B"]["vmmc"] = best(bench_vmmc, n_rt, 64)
    res["rtt_64B"]["unix"] = best(bench_unix, n_rt, 64)
    for name, fn in (("vmmc", bench_vmmc), ("unix", bench_unix)):
        r = best(fn, n_bw, MIB)
        r["MiB_per_s"] = 1e6 / r["median_us"]
        res["put_1MiB"][name] = r
    r = best(bench_memcpy, n_bw)
    r["MiB_per_s"] = 1e6 / r["median_us"]
    res["put_1MiB"]["memcpy"] = r
    if doorbells:
        res["doorbell_rtt_1B"] = {bell: best(bench_doorbell, n_rt // 5, bell)
                                  for bell in ("socket", "eventfd")}
    rt = res["rtt_64B"]
    res["ratios"] = {
        "vmmc_rtt_over_reference": rt["vmmc"]["median_us"] / rt["reference"]["median_us"],
        "unix_rtt_over_vmmc": rt["unix"]["median_us"] / rt["vmmc"]["median_us"],
        "vmmc_bw_over_unix": res["put_1MiB"]["vmmc"]["MiB_per_s"] / res["put_1MiB"]["unix"]["MiB_per_s"],
        "vmmc_bw_over_memcpy": res["put_1MiB"]["vmmc"]["MiB_per_s"] / res["put_1MiB"]["memcpy"]["MiB_per_s"],
    }
    return res


def rows(res: dict) -> list[Row]:
    """The result of :func:`run` as table rows (VMMC first, its peers after)."""
    rt, bw = res["rtt_64B"], res["put_1MiB"]
    out = [Row("vmmc_rtt", "VMMC 64 B put+notify round trip", "us",
               [from_stats("VMMC", rt["vmmc"]), from_stats("Unix", rt["unix"]),
                from_stats("floor", rt["reference"])]),
           Row("vmmc_bw", "VMMC 1 MiB put + 8 B ack", "MiB/s",
               [from_stats(label, bw[k], MIB) for label, k in
                (("VMMC", "vmmc"), ("Unix", "unix"), ("memcpy", "memcpy"))])]
    if "doorbell_rtt_1B" in res:
        db = res["doorbell_rtt_1B"]
        out.append(Row("doorbell_rtt", "1 B ring round trip, every wait sleeps", "us",
                       [from_stats("socket bell", db["socket"]), from_stats("eventfd", db["eventfd"])]))
    return out


def report(res: dict) -> str:
    """The text table of :func:`run`'s result."""
    return "\n".join([machine_line(res["machine"]), "", format_table(rows(res)), "",
                      "floor: a minimal two-call Cython spin loop; memcpy: one copy of 1 MiB"])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer iterations, one repeat")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--doorbells", action="store_true",
                    help="also compare socket and eventfd doorbells")


def main(args: argparse.Namespace) -> None:
    res = run(quick=args.quick, doorbells=args.doorbells)
    print(json.dumps(res, indent=2) if args.json else report(res))



# --- the rows of ``shrimpio bench`` ---------------------------------------------

def _vmmc(size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n = s.rtt_rounds if size == 64 else s.bw_rounds
        return Figure.from_ns("VMMC", bench_vmmc(n, size), 0 if size == 64 else MIB)
    return m


def _unix_pair(size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n = s.rtt_rounds if size == 64 else s.bw_rounds
        return Figure.from_ns("Unix", bench_unix(n, size), 0 if size == 64 else MIB)
    return m


def floor(s: Settings) -> Figure:
    """The Cython spin loop's round trip: the floor of every 64-byte row."""
    return Figure.from_ns("floor", bench_reference(s.rtt_rounds))


def memcpy(size: int, rounds: int) -> Figure:
    """One copy of ``size`` bytes, ``rounds`` times: the floor of a bandwidth row."""
    return Figure.from_ns("memcpy", bench_memcpy(rounds, size), size)


def specs() -> list[Spec]:
    """``vmmc_rtt`` and ``vmmc_bw``."""
    return [
        Spec("vmmc_rtt", "VMMC 64 B put+notify round trip", "us",
             [("VMMC", _vmmc(64)), ("Unix", _unix_pair(64)), ("floor", floor)]),
        Spec("vmmc_bw", "VMMC 1 MiB put + 8 B ack", "MiB/s",
             [("VMMC", _vmmc(MIB)), ("Unix", _unix_pair(MIB)), ("memcpy", lambda s: memcpy(MIB, s.bw_rounds))]),
    ]


if __name__ == "__main__":
    _ap = argparse.ArgumentParser(prog="python -m shrimpio.bench.rows.vmmc",
                                  description=(__doc__ or "").splitlines()[0])
    add_arguments(_ap)
    main(_ap.parse_args())
