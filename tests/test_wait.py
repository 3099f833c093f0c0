"""Data plane, part 4: the wait protocol (spin, arm the sleeping flag, fence,
re-check, sleep on the doorbell; the peer rings only when the flag is set).

Over a million hand-offs between two real processes (pinned to different
cores when there are two) and between two threads, with ``busy_poll_us=0``
(every wait that finds nothing sleeps at once: the flag/doorbell path) and with
spinning.  Every message is checked, in order.  Every wait has a deadline, and
the worst gap between two messages is bounded: the wait loop re-checks its
condition once per one-second sleep slice, so a lost wake-up would show as a
stall of up to a second rather than as a hang.

Then: wake-ups by consume and by shutdown, peer death (SIGKILL) while we wait,
the GIL released while spinning and while sleeping, signals.
"""

import signal
import threading
import time
from time import perf_counter

import pytest

from conftest import wait_for
from fastpath_helpers import DEADLINE, Child, RingPair, cpu_pair, pattern, pinned
from result_thread import ResultThread
from shrimpio._fastpath import unarmed_count

#: A lost wake-up stalls a waiter until the end of its 1 s sleep slice.
MAX_GAP = 0.8


#: Every FORCE messages each side of a stream stops until the other side has
#: gone to sleep: the consumer until the producer sleeps on the full ring, the
#: producer (half a period later) until the consumer sleeps on the empty one.
#: So each run takes the sleeping path at least 2 * n // FORCE times however
#: the machine schedules the two; between those points they race freely.  The
#: two stops never overlap: the producer is at most 64 bytes ahead.
FORCE = 4096


def wait_flag(hdr, flag):
    """Wait until the peer has armed its sleeping flag."""
    wait_for(lambda: hdr.get(flag), timeout=DEADLINE, what=f"{flag} (the peer to go to sleep)")


def consume_stream(ring, n, cpu=None, hdr=None):
    """Read ``n`` one-byte messages, one per call; check each; time the gaps."""
    with pinned(cpu):
        buf = bytearray(1)
        a0 = unarmed_count()
        if ring.read_into(buf, 1, timeout=DEADLINE) != 1 or buf[0] != 0:
            return {"bad": 0, "got": bytes(buf)}
        worst, last = 0.0, perf_counter()
        for i in range(1, n):
            if hdr is not None and i % FORCE == 0:
                wait_flag(hdr, "writer_sleeping")
                last = perf_counter()
            if ring.read_into(buf, 1, timeout=DEADLINE) != 1 or buf[0] != i % 251:
                return {"bad": i, "got": bytes(buf)}
            now = perf_counter()
            if now - last > worst:
                worst = now - last
            last = now
        return {"count": n, "worst": worst, "armed": unarmed_count() - a0}


def produce_stream(ring, n, cpu=None, hdr=None):
    with pinned(cpu):
        msgs = [bytes([i]) for i in range(251)]
        a0 = unarmed_count()
        for i in range(n):
            if hdr is not None and i % FORCE == FORCE // 2:
                wait_flag(hdr, "reader_sleeping")
            if ring.write(msgs[i % 251], timeout=DEADLINE) != 1:
                raise AssertionError(f"short write at message {i}")
        return unarmed_count() - a0


def echo(rin, rout, n, cpu=None):
    """The passive side of a ping-pong: return every message."""
    with pinned(cpu):
        buf = bytearray(4)
        for i in range(n):
            if rin.read_into(buf, 4, timeout=DEADLINE) != 4 or int.from_bytes(buf, "little") != i:
                return {"bad": i, "got": bytes(buf)}
            for _ in range(i & 15):    # jitter: sweep the echo across the pinger's way to sleep
                pass
            rout.write_all(buf, timeout=DEADLINE)
        return {"count": n}


def ping(rout, rin, n):
    """The active side: send a 4-byte counter, wait for it back; worst round trip."""
    buf = bytearray(4)
    worst = 0.0
    for i in range(n):
        t0 = perf_counter()
        rout.write_all(i.to_bytes(4, "little"), timeout=DEADLINE)
        if rin.read_into(buf, 4, timeout=DEADLINE) != 4 or int.from_bytes(buf, "little") != i:
            raise AssertionError(f"round trip {i} came back as {bytes(buf)!r}")
        worst = max(worst, perf_counter() - t0)
    return worst


# --------------------------------------------------------------------------- a million hand-offs

STREAM = {("process", 0): 400_000, ("process", 50): 400_000,
          ("thread", 0): 200_000, ("thread", 50): 200_000}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where,spin", list(STREAM))
def test_stream_no_lost_wakeup(where, spin):
    """Byte-sized messages through a 64-byte ring: the producer fills it and
    sleeps, the consumer empties it and sleeps, over and over."""
    n = STREAM[where, spin]
    mine, theirs = cpu_pair()
    with RingPair(64, busy_poll_us=spin) as p:
        if where == "process":
            with Child(consume_stream, p.r, n, theirs, p.hdr) as child:
                producer_armed = produce_stream(p.w, n, mine, p.hdr)
                res = child.result(timeout=50)
        else:
            t = ResultThread(consume_stream, p.r, n, theirs, p.hdr)
            t.start()
            produce_stream(p.w, n, mine, p.hdr)
            res = t.result(timeout=50)
            producer_armed = 0      # the consumer's count is per process: it has both
        assert res.get("count") == n, f"message {res.get('bad')} arrived as {res.get('got')!r}"
        assert res["worst"] < MAX_GAP, f"a wait stalled for {res['worst']:.3f}s (lost wake-up?)"
        assert p.hdr.get("head") == p.hdr.get("tail") == n   # all published, all consumed
        # The sleeping path really ran, at least at every forced stop: the
        # waits armed their flag, fenced, re-checked and slept (counted by the
        # data plane; a pure spin never arms).
        assert res["armed"] + producer_armed >= 2 * (n // FORCE)


# spin: the busy-poll budget of both sides, or "asym": the pinging side sleeps
# at once, the echoing side spins (50 us), so each echo lands within a few
# microseconds of the pinger going to sleep: the race that the re-check after
# arming the flag closes.
PINGPONG = {("process", 0): 30_000, ("process", 50): 50_000, ("process", "asym"): 40_000,
            ("thread", 0): 10_000, ("thread", 50): 10_000}
# Hand-offs in all: 1.2 M streamed + 2 x 100 k ping-pong messages.
assert sum(STREAM.values()) + 2 * sum(PINGPONG.values()) >= 1_000_000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where,spin", list(PINGPONG))
def test_ping_pong_no_lost_wakeup(where, spin):
    """Strict alternation over two rings: with busy_poll_us=0 every single
    hand-off is a sleep and a doorbell."""
    n = PINGPONG[where, spin]
    mine, theirs = cpu_pair()
    with RingPair(64, busy_poll_us=0) as there, RingPair(64, busy_poll_us=0) as back:
        if spin:
            there.r.busy_poll_us = back.w.busy_poll_us = 50         # the echoing side
            if spin != "asym":
                there.w.busy_poll_us = back.r.busy_poll_us = spin   # the pinging side
        a0 = unarmed_count()
        if where == "process":
            with Child(echo, there.r, back.w, n, theirs) as child, pinned(mine):
                worst = ping(there.w, back.r, n)
                res = child.result(timeout=50)
        else:
            t = ResultThread(echo, there.r, back.w, n, theirs)
            t.start()
            with pinned(mine):
                worst = ping(there.w, back.r, n)
            res = t.result()
        assert res.get("count") == n, f"message {res.get('bad')} arrived as {res.get('got')!r}"
        assert worst < MAX_GAP, f"a round trip took {worst:.3f}s (lost wake-up?)"
        assert there.hdr.get("tail") == back.hdr.get("head") == 4 * n
        if spin == 0:
            # The pinger armed its flag and slept on nearly every round trip
            # (the count is per process: with threads it has the echo's too).
            assert unarmed_count() - a0 > n // 2


# --------------------------------------------------------------------------- wake-ups

def test_consume_wakes_a_blocked_writer():
    with RingPair(64, busy_poll_us=0) as p:
        data = pattern(0, 1000)
        t = ResultThread(p.w.write_all, data, 10)
        t.start()
        got = bytearray()
        while len(got) < len(data):
            wait_for(lambda: p.hdr.get("writer_sleeping") == 1 or not t.is_alive(),
                     what="writer asleep on a full ring")
            if t.is_alive():
                assert p.w.free() == 0 and t.is_alive()  # full, and the writer waits
            view = p.r.peek()
            got += view
            n = len(view)
            view.release()
            p.r.consume(n)            # releasing space rings the writer's doorbell
        assert t.result() is None
        assert bytes(got) == data


def test_read_wakes_a_blocked_writer_in_another_process():
    with RingPair(64, busy_poll_us=0) as p:
        def writer(ring):
            ring.write_all(pattern(0, 5000), timeout=DEADLINE)
            return ring.free()

        with Child(writer, p.w) as child:
            got = bytearray()
            while len(got) < 5000:
                got += p.r.read(100, timeout=DEADLINE)
            child.result()
        assert bytes(got) == pattern(0, 5000)


def test_shutdown_wakes_a_blocked_reader_in_another_process():
    with RingPair(64, busy_poll_us=0) as p:
        def closer(ring, hdr):
            # Wait (in the child) until the parent sleeps, then write and shut.
            deadline = time.monotonic() + DEADLINE
            while hdr.get("reader_sleeping") != 1:
                if time.monotonic() > deadline:
                    raise AssertionError("parent never slept")
                time.sleep(0.001)
            ring.write(b"bye")
            ring.shutdown_write()

        with Child(closer, p.w, p.hdr) as child:
            assert p.r.read(100, timeout=DEADLINE) == b"bye"
            t0 = time.monotonic()
            assert p.r.read(100, timeout=DEADLINE) == b""        # EOF, not a timeout
            assert time.monotonic() - t0 < 5
            assert p.r.at_eof()
            child.result()


def test_shutdown_wakes_a_blocked_reader_thread():
    with RingPair(64, busy_poll_us=0) as p:
        t = ResultThread(p.r.read, 10, 10)
        t.start()
        wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
        p.w.shutdown_write()
        assert t.result() == b""


def test_close_read_wakes_a_blocked_writer():
    with RingPair(64, busy_poll_us=0) as p:
        p.w.write(b"x" * 64)
        t = ResultThread(p.w.write_all, b"more", 10)
        t.start()
        wait_for(lambda: p.hdr.get("writer_sleeping") == 1, what="writer asleep")
        p.r.close_read()
        with pytest.raises(BrokenPipeError):
            t.result()


# --------------------------------------------------------------------------- peer death

def sleep_forever(ring, data):
    if data:
        ring.write_all(data, timeout=DEADLINE)
    signal.pause()


def kill_when(child, predicate):
    """A thread that SIGKILLs ``child`` once ``predicate()`` holds."""
    def run():
        wait_for(predicate, what="the condition to kill the child")
        child.kill()
    t = ResultThread(run)
    t.start()
    return t


@pytest.mark.timeout(30)
def test_writer_killed_while_reader_sleeps():
    with RingPair(64, busy_poll_us=0) as p:
        with Child(sleep_forever, p.w, b"partial") as child:
            p.wsock.close()          # the child holds the only other end now
            assert p.r.read(7, timeout=DEADLINE) == b"partial"   # data before death arrives
            killer = kill_when(child, lambda: p.hdr.get("reader_sleeping") == 1)
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):
                p.r.read(10, timeout=DEADLINE)
            assert time.monotonic() - t0 < 5
            killer.result()
            assert child.reap() == -signal.SIGKILL
            with pytest.raises(ConnectionResetError):  # and again: the peer stays gone
                p.r.read(10, timeout=DEADLINE)
            assert p.r.wait_readable(timeout=DEADLINE) is True
            assert not p.r.broken


@pytest.mark.timeout(30)
def test_writer_killed_after_shutdown_gives_eof_not_reset():
    with RingPair(64, busy_poll_us=0) as p:
        def write_shut_sleep(ring):
            ring.write(b"done")
            ring.shutdown_write()
            signal.pause()

        with Child(write_shut_sleep, p.w) as child:
            p.wsock.close()
            assert p.r.read(10, timeout=DEADLINE) == b"done"
            wait_for(lambda: p.hdr.get("write_shut") == 1, what="the child to shut down")
            child.kill()
            assert child.reap() == -signal.SIGKILL
            assert p.r.read(10, timeout=DEADLINE) == b""


@pytest.mark.timeout(30)
def test_reader_killed_while_writer_sleeps():
    with RingPair(64, busy_poll_us=0) as p:
        def read_some(ring):
            ring.read(10, timeout=DEADLINE)
            signal.pause()

        with Child(read_some, p.r) as child:
            p.rsock.close()
            p.w.write_all(b"x" * 10, timeout=DEADLINE)
            wait_for(lambda: p.hdr.get("tail") == 10, what="the child to read")
            p.w.write_all(b"y" * 64, timeout=DEADLINE)  # full again
            killer = kill_when(child, lambda: p.hdr.get("writer_sleeping") == 1)
            t0 = time.monotonic()
            with pytest.raises(BrokenPipeError):
                p.w.write(b"z", timeout=DEADLINE)
            assert time.monotonic() - t0 < 5
            killer.result()
            assert child.reap() == -signal.SIGKILL


# --------------------------------------------------------------------------- the GIL, signals

def test_gil_released_while_sleeping():
    with RingPair(64, busy_poll_us=0) as p:
        t = ResultThread(p.r.read, 10, DEADLINE)
        t.start()
        # wait_for runs Python code: it can only see the flag while the reader
        # is inside its wait if that wait released the GIL.
        wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
        count, end = 0, perf_counter() + 0.05
        while perf_counter() < end:
            count += 1
        assert count > 1000 and t.is_alive() and p.hdr.get("reader_sleeping") == 1
        p.w.write(b"now")
        assert t.result() == b"now"


def test_gil_released_while_spinning():
    """A 1 s spin budget and a 0.9 s timeout: the reader spins the whole time
    and never arms its flag.  We still run Python code and send it data."""
    with RingPair(64, busy_poll_us=1_000_000) as p:
        started = threading.Event()
        times = []

        def reader():
            started.set()
            t0 = perf_counter()
            try:
                return p.r.read(10, timeout=0.9)
            finally:
                times.append(perf_counter() - t0)

        t = ResultThread(reader)
        t.start()
        started.wait(DEADLINE)
        count, armed, end = 0, 0, perf_counter() + 0.1
        while perf_counter() < end:
            armed |= p.hdr.get("reader_sleeping")
            count += 1
        p.w.write(b"spun")
        assert t.result() == b"spun"     # a GIL-holding spin would have timed out instead
        assert count > 1000 and not armed
        assert 0.05 < times[0] < 0.9     # it did wait, spinning, for our write


def test_signal_interrupts_a_blocking_wait():
    """A signal handler runs while we sleep, and its exception ends the wait
    (this is also how pytest-timeout gets out of a hung wait)."""
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        with RingPair(64, busy_poll_us=0) as p:
            main = threading.get_ident()

            def interrupt():
                wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
                signal.pthread_kill(main, signal.SIGUSR1)

            t = ResultThread(interrupt)
            t.start()
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                p.r.read(10, timeout=DEADLINE)
            assert time.monotonic() - t0 < 5
            t.result()
            assert p.hdr.get("reader_sleeping") == 0   # disarmed on the way out
            p.w.write(b"still fine")                  # the ring is intact
            assert p.r.read(100, timeout=DEADLINE) == b"still fine"
    finally:
        signal.signal(signal.SIGUSR1, old)


def flood(sock, seconds):
    """A peer ringing the doorbell as fast as it can, for no reason."""
    sock.setblocking(False)
    chunk = b"\1" * (1 << 16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.send(chunk)
        except BlockingIOError:
            pass


@pytest.mark.timeout(30)
def test_flooded_doorbell_does_not_stall_the_waiter():
    """Two processes flood our doorbell: every read still ends at its own
    deadline (it used to drain without bound and only time out on a quiet
    doorbell), and data still gets through."""
    with RingPair(64, busy_poll_us=0) as p:
        with Child(flood, p.wsock, 1.0) as c1, Child(flood, p.wsock, 1.0) as c2:
            worst = 0.0
            for _ in range(8):
                t0 = time.monotonic()
                with pytest.raises(TimeoutError):
                    p.r.read(10, timeout=0.05)
                worst = max(worst, time.monotonic() - t0)
            p.w.write(b"through the noise")
            assert p.r.read(100, timeout=DEADLINE) == b"through the noise"
            c1.result()
            c2.result()
        assert worst < 0.5, f"a 50 ms wait took {worst:.3f}s"
