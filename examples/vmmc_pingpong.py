"""VMMC ping-pong between two processes, beside a Unix socket.

Process A exports an inbox and imports B's; each round trip is one
deliberate update with a notification each way (``send(..., notify=True)``
then ``wait()``).  The same exchange then runs over a Unix stream socket.
Then each side puts 1 MiB into the other's buffer and waits for an 8-byte
acknowledgement.  Run it:

    python examples/vmmc_pingpong.py [rounds]

For medians, p99 and the spin-loop reference, use ``python -m shrimpio
pingpong``.
"""

import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time

from shrimpio import Endpoint

MSG = 64
BIG = 1 << 20


CPUS = sorted(os.sched_getaffinity(0))   # read before anyone pins itself


def pin(cpu):
    """Each process on its own core: spinning peers must not share one."""
    if len(CPUS) > 1:
        os.sched_setaffinity(0, {CPUS[cpu]})


def import_when_ready(ep, peer, name, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ep.import_buffer(peer, name)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)   # the peer has not exported yet


def vmmc_side(me, peer, rounds, first, result=None):
    """One side of the VMMC exchange; ``first`` sends first and times."""
    pin(0 if first else 1)
    with Endpoint(me) as ep:
        inbox = ep.export("inbox", BIG)
        outbox = import_when_ready(ep, peer, "inbox")
        small, big, ack = b"p" * MSG, b"b" * BIG, b"a" * 8
        times = []
        for size, data, reps in ((MSG, small, rounds), (BIG, big, max(rounds // 100, 20))):
            for _ in range(reps):
                t0 = time.perf_counter()
                if first:
                    outbox.send(data, notify=True)
                    inbox.wait()
                else:
                    inbox.wait()
                    outbox.send(data if size == MSG else ack, notify=True)
                times.append((size, time.perf_counter() - t0))
        if result is not None:
            result.put(times)
        outbox.close()
        inbox.close()


def unix_side(sock, rounds, first, result=None):
    pin(0 if first else 1)
    buf = memoryview(bytearray(BIG))
    times = []
    for size, reps in ((MSG, rounds), (BIG, max(rounds // 100, 20))):
        data = b"p" * size
        for _ in range(reps):
            t0 = time.perf_counter()
            if first:
                sock.sendall(data)
                want = MSG if size == MSG else 8
            else:
                want = size
            got = 0
            while got < want:
                got += sock.recv_into(buf[got:want])
            if not first:
                sock.sendall(data if size == MSG else b"a" * 8)
            times.append((size, time.perf_counter() - t0))
    if result is not None:
        result.put(times)
    sock.close()


def summarise(name, times):
    rtt = statistics.median(t for s, t in times if s == MSG) * 1e6
    put = statistics.median(t for s, t in times if s == BIG)
    print(f"{name:12} round trip {rtt:8.2f} us    1 MiB bandwidth {BIG / put / 1e6:8.0f} MB/s")
    return rtt, BIG / put


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory(prefix="shrimpio-example-") as registry:
        os.environ.setdefault("SHRIMPIO_REGISTRY", registry)
        run(rounds)


def run(rounds):
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()

    peer = ctx.Process(target=vmmc_side, args=(f"pong-{os.getpid()}", f"ping-{os.getpid()}", rounds, False))
    peer.start()
    vmmc_side(f"ping-{os.getpid()}", f"pong-{os.getpid()}", rounds, True, result)
    peer.join()
    vmmc = summarise("VMMC", result.get())

    a, b = socket.socketpair()
    peer = ctx.Process(target=unix_side, args=(b, rounds, False))
    peer.start()
    b.close()
    unix_side(a, rounds, True, result)
    peer.join()
    unix = summarise("Unix socket", result.get())

    print(f"VMMC round trip is {unix[0] / vmmc[0]:.0f}x faster, "
          f"its bandwidth {vmmc[1] / unix[1]:.1f}x the Unix socket's")


if __name__ == "__main__":
    main()
