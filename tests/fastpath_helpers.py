"""Helpers for the data-plane tests (test_fastpath.py, test_ring.py, test_wait.py).

Ring header layout, from ``shrimpio/_fastpath_core.h`` (``shr_ring_hdr``, 256 bytes):
line 0 magic (u32 @0), version (u32 @4), capacity (u64 @8), small (u32 @16, version 2);
line 1 head (u64 @64), write_shut (u32 @72), producer_cpu (u32 @76), base (u64 @80) and
area (u32 @88), sbase (u64 @96, version 2); line 2 tail (u64 @128), consumer_cpu
(u32 @136); line 3 reader_sleeping (u32 @192),
writer_sleeping (u32 @196), read_shut (u32 @200).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
from contextlib import contextmanager

import pytest

from shrimpio._fastpath import Ring, Segment

DEADLINE = 10.0

RING_MAGIC = 0x52524853
RING_VERSION = 1
HEADER = 256
FIELDS = {  # name: (offset, struct format)
    "magic": (0, "<I"),
    "version": (4, "<I"),
    "capacity": (8, "<Q"),
    "small": (16, "<I"),
    "head": (64, "<Q"),
    "write_shut": (72, "<I"),
    "producer_cpu": (76, "<I"),
    "base": (80, "<Q"),
    "area": (88, "<I"),
    "sbase": (96, "<Q"),
    "tail": (128, "<Q"),
    "consumer_cpu": (136, "<I"),
    "reader_sleeping": (192, "<I"),
    "writer_sleeping": (196, "<I"),
    "read_shut": (200, "<I"),
}


class Header:
    """Raw access to a ring header through a memoryview of its segment: this is
    what a misbehaving peer can do."""

    def __init__(self, seg: Segment, offset: int = 0):
        self.mv = memoryview(seg)
        self.offset = offset

    def get(self, field: str) -> int:
        off, fmt = FIELDS[field]
        return struct.unpack_from(fmt, self.mv, self.offset + off)[0]

    def set(self, field: str, value: int) -> None:
        off, fmt = FIELDS[field]
        struct.pack_into(fmt, self.mv, self.offset + off, value)

    def data(self, capacity: int) -> memoryview:
        """The ring's data area (a view: writes land in the ring)."""
        start = self.offset + HEADER
        return self.mv[start:start + capacity]

    def release(self) -> None:
        self.mv.release()


class RingPair:
    """A ring in its own segment, with a producer end and a consumer end (two
    Ring objects, as two processes would have) and a socketpair doorbell: the
    producer rings/sleeps on ``wsock``, the consumer on ``rsock``."""

    def __init__(self, capacity: int = 256, *, busy_poll_us: float = 0, offset: int = 0,
                 seg_size: int | None = None, kind: str | None = None):
        self.capacity = capacity
        self.seg = Segment(seg_size or offset + Ring.footprint(capacity), kind=kind)
        self.wsock, self.rsock = socket.socketpair()
        self.w = Ring(self.seg, offset, capacity, create=True, data_bell=self.wsock.fileno(),
                      space_bell=self.wsock.fileno(), busy_poll_us=busy_poll_us)
        self.r = Ring(self.seg, offset, capacity, data_bell=self.rsock.fileno(),
                      space_bell=self.rsock.fileno(), busy_poll_us=busy_poll_us)
        self.hdr = Header(self.seg, offset)

    def close(self) -> None:
        self.w.close()
        self.r.close()
        self.hdr.release()
        self.seg.close()
        self.wsock.close()
        self.rsock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def pair():
    """Factory fixture: ``pair(capacity, **kw)`` makes a RingPair, closed after the test."""
    made = []

    def make(capacity=256, **kw):
        p = RingPair(capacity, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def pattern(start: int, n: int) -> bytes:
    """Bytes ``start .. start+n`` of a deterministic stream (period 251)."""
    return bytes((start + i) % 251 for i in range(n))


# --------------------------------------------------------------------------- CPUs

def cpu_pair():
    """Two distinct CPUs of ours, or (None, None) on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return None, None


@contextmanager
def pinned(cpu):
    """Pin the calling thread to ``cpu`` (None: leave it), restoring afterwards."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def nvcsw() -> int:
    """Voluntary context switches of this process so far (each sleep is one)."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------- children

class Child:
    """A forked child running ``fn(*args)``; its return value (or traceback)
    comes back over a pipe.  The parent always reaps it, with a deadline."""

    def __init__(self, fn, *args, cpu=None):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                os.close(r)
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                try:
                    out = ("ok", fn(*args))
                except BaseException:
                    out = ("error", traceback.format_exc())
                data = pickle.dumps(out)
                while data:
                    data = data[os.write(w, data):]
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid = pid
        self._pipe = r
        self.pidfd = os.pidfd_open(pid)
        self.status = None

    def result(self, timeout: float = DEADLINE):
        """The child's return value; raises if it failed or overran ``timeout``."""
        deadline = time.monotonic() + timeout
        chunks = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._pipe], [], [], left)[0]:
                    self.kill()
                    raise AssertionError(f"child {self.pid} did not finish in {timeout}s")
                chunk = os.read(self._pipe, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            self.reap(max(0.0, deadline - time.monotonic()) + 1)
        assert self.status == 0, f"child exited with status {self.status}"
        kind, value = pickle.loads(b"".join(chunks))
        if kind != "ok":
            raise AssertionError("child failed:\n" + value)
        return value

    def kill(self) -> None:
        if self.status is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self, timeout: float = DEADLINE) -> int:
        """Wait for the child to exit (SIGKILL after ``timeout``); its wait status."""
        if self.status is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                self.kill()
                select.select([self.pidfd], [], [], DEADLINE)
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)
            os.close(self._pipe)
        return self.status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        self.reap()
