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
