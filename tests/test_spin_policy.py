"""When shrimpio spins and when it sleeps (the spin policy of the data plane
and of the asyncio poller), checked by what the waiter does, not by timing:

* every publish says which CPU its writer runs on (``peer_cpu``);
* a blocking wait whose peer was last seen on the waiter's own CPU sleeps
  at once, whatever its spin budget (spinning would only keep the peer off
  that CPU); a peer elsewhere is spun for;
* a ring watched for fd callbacks (``RingWatch``, tornado's ``add_reader``)
  stays on the loop's hot list after traffic while its peer may be running,
  so the peer's next message comes without a doorbell; it arms at once when
  the peer shares our CPU or the budget is 0;
* time the program spends working between the poller's turns does not use
  up the hot period; only polling with nothing else to do does.
"""

from __future__ import annotations

import asyncio
import os
import select
import time

import pytest

from fastpath_helpers import RingPair, nvcsw, pinned
from shrimpio._fastpath import LoopPoller, RingWatch, peer_cpu

pytestmark = pytest.mark.timeout(60)


def _cpu() -> int:
    return sorted(os.sched_getaffinity(0))[0]


def _bell_pending(p: RingPair) -> bool:
    """Did the producer ring the consumer's doorbell?"""
    return bool(select.select([p.rsock], [], [], 0)[0])


def test_publish_tells_where_the_writer_runs():
    with RingPair(256) as p:
        assert peer_cpu(p.r, False) is None and peer_cpu(p.w, True) is None    # nothing yet
        for cpu in sorted(os.sched_getaffinity(0))[:2]:
            with pinned(cpu):
                p.w.write(b"x")
                assert peer_cpu(p.r, False) == cpu            # the producer, as its reader sees it
                assert p.r.read(1) == b"x"
                assert peer_cpu(p.w, True) == cpu             # the consumer, as its writer sees it
        assert p.hdr.get("producer_cpu") == p.hdr.get("consumer_cpu") == cpu + 1


@pytest.mark.parametrize("peer_here", [True, False])
def test_blocking_wait_does_not_spin_for_a_peer_on_its_cpu(peer_here):
    """A 1 s spin budget and a 0.2 s timeout: with the producer last seen on
    our CPU the wait sleeps (a voluntary context switch); with it elsewhere
    it spins to the deadline and never sleeps."""
    cpu = _cpu()
    with RingPair(256, busy_poll_us=1_000_000) as p, pinned(cpu):
        p.hdr.set("producer_cpu", cpu + 1 if peer_here else cpu + 2)
        buf = bytearray(1)
        c0 = nvcsw()
        with pytest.raises(TimeoutError):
            p.r.read_into(buf, 1, 0.2)
        sleeps = nvcsw() - c0
    assert (sleeps >= 1) if peer_here else (sleeps == 0), sleeps


class _Watched:
    """A RingWatch over the receive ring of ``rx`` (the peer writes into
    ``rx.w``), sending on ``tx``, on a fresh asyncio loop's poller."""

    def __init__(self, busy_poll_us: float) -> None:
        self.rx = RingPair(4096, busy_poll_us=busy_poll_us)
        self.tx = RingPair(4096, busy_poll_us=busy_poll_us)
        self.loop = asyncio.new_event_loop()
        self.poller = LoopPoller(self.loop)
        self.fired = 0
        self.watch = RingWatch(self.rx.r, self.tx.w, self.poller, self._on_data)

    def _on_data(self) -> None:
        self.fired += 1

    def peer_at(self, cpu: int) -> None:
        self.rx.hdr.set("producer_cpu", cpu + 1)

    def turns(self, n: int = 3) -> None:
        async def yield_(n: int) -> None:
            for _ in range(n):
                await asyncio.sleep(0)
        self.loop.run_until_complete(yield_(n))

    def close(self) -> None:
        self.watch.stop()
        self.turns()
        self.loop.close()
        self.rx.close()
        self.tx.close()

    def __enter__(self) -> "_Watched":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_watch_stays_hot_after_traffic_and_catches_the_next_message_without_a_doorbell():
    cpu = _cpu()
    with _Watched(1_000_000) as w, pinned(cpu):
        w.peer_at(cpu + 2)                        # the peer runs elsewhere
        w.poller.activity_ns = time.monotonic_ns()    # the loop just moved data
        assert w.watch.ready() is False
        assert w.poller.hot_count() == 1 and w.rx.hdr.get("reader_sleeping") == 0
        w.turns()
        assert w.poller.hot_count() == 1 and w.fired == 0     # still polled, nothing came
        w.rx.w.write(b"request")
        w.turns()
        assert w.fired == 1 and not _bell_pending(w.rx)       # caught by polling: no doorbell
        assert w.watch.ready() is True                         # the callback has not read it yet
        assert w.rx.r.read(100) == b"request"


def test_watch_counts_our_writes_as_traffic():
    cpu = _cpu()
    with _Watched(1_000_000) as w, pinned(cpu):
        w.peer_at(cpu + 2)
        w.poller.activity_ns = time.monotonic_ns()
        assert w.watch.ready() is False
        w.poller.activity_ns = 0                  # long ago...
        w.tx.w.write(b"answer")                   # ... but we answer now
        w.turns(1)
        assert w.poller.activity_ns > 0 and w.poller.hot_count() == 1


@pytest.mark.parametrize("why", ["peer on our cpu", "no budget"])
def test_watch_arms_at_once(why):
    cpu = _cpu()
    with _Watched(0 if why == "no budget" else 1_000_000) as w, pinned(cpu):
        w.peer_at(cpu if why == "peer on our cpu" else cpu + 2)
        w.poller.activity_ns = time.monotonic_ns()
        assert w.watch.ready() is False
        assert w.poller.hot_count() == 0 and w.rx.hdr.get("reader_sleeping") == 1
        w.rx.w.write(b"x")
        assert _bell_pending(w.rx)                # the peer rang: the doorbell takes over
        w.watch.woke()
        assert w.watch.ready() is True


def test_work_between_turns_does_not_spend_the_hot_period():
    """Budget 50 ms; a callback that works 200 ms between two of the
    poller's turns leaves the ring hot; once the loop only polls, the
    budget runs out and the ring is armed."""
    cpu = _cpu()
    with _Watched(50_000) as w, pinned(cpu):
        w.peer_at(cpu + 2)
        w.poller.activity_ns = time.monotonic_ns()
        assert w.watch.ready() is False
        w.turns(2)                                # the poller's turns chain
        w.loop.call_soon(time.sleep, 0.2)         # the program works (blocks the loop) for 200 ms
        w.turns(3)
        assert w.poller.hot_count() == 1 and w.rx.hdr.get("reader_sleeping") == 0
        deadline = time.monotonic() + 30
        while w.poller.hot_count() and time.monotonic() < deadline:
            w.turns(100)
        assert w.poller.hot_count() == 0 and w.rx.hdr.get("reader_sleeping") == 1


# -- a CPU shared with busy tasks --------------------------------------------
#
# There a spin is paid from our share of the CPU, and the scheduler makes us
# wait for it again after; a task that sleeps is woken ahead of the busy
# ones.  A thread that was preempted (an involuntary context switch seen
# after a wait longer than its budget) marks the process's CPU contended for
# a while: blocking waits then do not grow their spin past the budget to
# cover a slow peer.

HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nprint(flush=True)\nwhile True: pass\n"


def _involuntary_switches() -> int:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no nonvoluntary_ctxt_switches in /proc/thread-self/status")


def _preempted_once() -> None:
    """Compute until the scheduler gives our CPU to another task once."""
    n0 = _involuntary_switches()
    deadline = time.monotonic() + 30
    while _involuntary_switches() == n0:
        assert time.monotonic() < deadline, "never preempted"
        sum(range(1000))


@pytest.fixture
def busy_task_on_our_cpu():
    """A process that only computes, pinned to the CPU the test runs on."""
    import subprocess
    import sys
    cpu = _cpu()
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(cpu)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout.readline() == b"\n"         # pinned, running
        yield cpu
    finally:
        hog.kill()
        hog.wait()
        hog.stdout.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_preempted_waiter_does_not_grow_its_spin_to_cover_a_slow_peer(busy_task_on_our_cpu):
    """Budget 50 us; the peer (a thread on another CPU) answers 4 budgets
    after the reader went to sleep, as a web server computing its answer.
    The reader shares its CPU with a busy task and is preempted between its
    waits: its second long wait marks the CPU contended, and its spin stays
    within the budget (without the rule it grows to cover the wait: 5
    budgets, spun on the busy CPU at every request)."""
    import threading
    from shrimpio._fastpath import _set_contended, preempts
    cpu = busy_task_on_our_cpu
    other = next(c for c in sorted(os.sched_getaffinity(0)) if c != cpu)
    top = 50.0

    def answer(p: RingPair, n: int) -> None:
        os.sched_setaffinity(0, {other})
        for _ in range(n):
            deadline = time.monotonic() + 30
            while p.hdr.get("reader_sleeping") != 1:          # the reader sleeps: it asked
                assert time.monotonic() < deadline
            t = time.perf_counter_ns() + int(4 * top * 1000)
            while time.perf_counter_ns() < t:                  # the peer's work
                pass
            p.w.write(b"x")

    with RingPair(256, busy_poll_us=top) as p, pinned(cpu):
        _set_contended(False)
        peer = threading.Thread(target=answer, args=(p, 2))
        peer.start()
        try:
            n0 = preempts()[0]
            assert p.r.read_into(bytearray(1), 1, 30) == 1     # the first long wait: its thread's count
            _preempted_once()
            assert p.r.read_into(bytearray(1), 1, 30) == 1
            n1, contended = preempts()
            assert n1 > n0 and contended
            assert p.r.spin_us <= top
        finally:
            peer.join()
            _set_contended(False)


def test_spin_does_not_grow_past_its_budget_on_a_contended_cpu():
    """The rule of the blocking waits, without the scheduler: a peer that
    answers after 4 budgets.  Uncontended the spin grows to cover the wait;
    contended it halves (down to 1/16), a wait within the budget still
    grows it to cover that wait, and a catch brings it back to the budget."""
    from shrimpio._fastpath import _set_contended, adapt_wait_spin
    top = 50e-6
    try:
        _set_contended(False)
        assert adapt_wait_spin(top, top, False, 4 * top) == pytest.approx(5 * top)
        _set_contended(True)
        cur = top
        for _ in range(8):
            cur = adapt_wait_spin(cur, top, False, 4 * top)
            assert cur <= top
        assert cur == pytest.approx(top / 16)
        assert adapt_wait_spin(cur, top, False, top / 2) == pytest.approx(top * 5 / 8)
        for _ in range(10):
            cur = adapt_wait_spin(cur, top, True, 0)
        assert cur == pytest.approx(top)
    finally:
        _set_contended(False)

