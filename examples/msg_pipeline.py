"""A producer -> workers -> collector pipeline moving numpy arrays over shrimpio.msg.

    python examples/msg_pipeline.py [workers] [arrays] [MiB per array]

The producer listens; each worker asks it for work (tag READY), gets an
array (tag WORK) or the end (tag STOP), computes, and sends its result to
the collector, which listens too and takes results from every worker in one
receive loop (one receiver, many senders).  Arrays are never pickled: the
producer's arrays land in the worker's posted buffer (``recv_into``) by one
cross-memory copy, the workers' results likewise in the collector.
"""

import os
import sys
import time

import numpy as np

from shrimpio import msg

READY, WORK, STOP, RESULT = 1, 2, 3, 4


def producer(lst: msg.MsgListener, arrays: int, n: int, workers: int) -> None:
    rng = np.random.default_rng(1)
    data = rng.random(n)
    sent = stopped = 0
    while stopped < workers:
        m = lst.recv(tag=READY)                  # any worker that is ready
        if sent < arrays:
            data[0] = sent                       # the array's number
            m.source.send(data, tag=WORK)
            sent += 1
        else:
            m.source.send(None, tag=STOP)
            stopped += 1


def worker(producer_addr, collector_addr, n: int) -> None:
    work = msg.connect(producer_addr)
    out = msg.connect(collector_addr)
    buf = np.empty(n)                            # posted for every array
    result = np.empty(n)
    while True:
        work.send(None, tag=READY)
        m = work.recv_into(buf)                  # WORK (into buf) or STOP
        if m.tag == STOP:
            break
        np.multiply(buf, 2.0, out=result)        # the "work"
        out.send(result, tag=RESULT)
    out.send(None, tag=STOP)
    work.close()
    out.close()


def collector(lst: msg.MsgListener, workers: int, n: int) -> tuple[int, float]:
    buf = np.empty(n)
    done = count = 0
    checksum = 0.0
    while done < workers:
        m = lst.recv_into(buf)
        if m.tag == STOP:
            done += 1
            continue
        count += 1
        checksum += buf[0]                       # 2 x the array's number
    return count, checksum


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    arrays = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    mib = float(sys.argv[3]) if len(sys.argv) > 3 else 8
    n = int(mib * (1 << 20)) // 8
    prod = msg.listen()
    coll = msg.listen()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            prod.close()
            coll.close()
            try:
                worker(prod.address, coll.address, n)
            finally:
                os._exit(0)
        pids.append(pid)
    t0 = time.perf_counter()
    cpid = os.fork()
    if cpid == 0:
        prod.close()
        count, checksum = collector(coll, workers, n)
        assert count == arrays and checksum == 2 * sum(range(arrays)), (count, checksum)
        print(f"collector: {count} results, checksum ok", flush=True)
        os._exit(0)
    coll.close()
    producer(prod, arrays, n, workers)
    for pid in pids + [cpid]:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    dt = time.perf_counter() - t0
    prod.close()
    moved = 2 * arrays * n * 8 / (1 << 20)
    print(f"{arrays} arrays of {mib:g} MiB through {workers} workers in {dt:.2f} s: "
          f"{moved / dt:.0f} MiB/s moved (producer -> worker -> collector)")


if __name__ == "__main__":
    main()
