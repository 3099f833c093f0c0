"""Tests for shrimpio.vmmc, part 2: notifications (wait() and handlers),
blocking, several importers, importers that die or write garbage into their
notification ring.

The exporter is this process; importers are forked children (see
vmmc_helpers.Child), forked before the export exists so that they hold none
of its sockets.  Waits have deadlines; every child is reaped.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from conftest import wait_for
from shrimpio._control import Registry
from shrimpio.vmmc import NOTIFY_CAPACITY, Endpoint
from vmmc_helpers import (
    DEADLINE, HEAD_AT, RING_DATA_AT, U64, Child, blocked_in_poll, gone,
)

RECORDS = NOTIFY_CAPACITY // 16         # notifications one importer's ring holds
NOT_DELIVERED = 0.2                     # how long a negative check waits


def _notifier(chan, name, plan):
    """Child importer: on "go", import exp/buf and report "imported"; then
    for each command ("send", n) run ``plan(imp, n)`` and report "sent";
    "exit" closes and exits.  ``plan`` is a module-level function."""
    chan.recv()
    with Endpoint(name) as ep:
        imp = ep.import_buffer("exp", "buf")
        chan.send("imported")
        while True:
            cmd = chan.recv()
            if cmd == "exit":
                return
            plan(imp, *cmd[1:])
            chan.send("sent")


def seq_plan(imp, n, slots=1000):
    """Notification i writes i (4 bytes) at slot i % slots, notifies (4*slot, 4)."""
    for i in range(n):
        off = 4 * (i % slots)
        imp.send(i.to_bytes(4, "little"), off, notify=True)


def tagged_plan(imp, n, tag):
    """Notification k (1..n) is (tag, k): k bytes at offset tag."""
    zeros = bytes(n)
    for k in range(1, n + 1):
        imp.send(zeros[:k], tag, notify=True)


def children(n, plan, name="imp"):
    return [Child(_notifier, f"{name}{j}", plan) for j in range(n)]


def start(kids):
    for c in kids:
        c.send("go")
    for c in kids:
        c.expect("imported")


def finish(kids):
    for c in kids:
        c.send("exit")
    for c in kids:
        c.finish()
        c.chan.close()


# --------------------------------------------------------------------------- wait()

def test_many_notifications_arrive_in_order_after_their_data():
    n = 100_000
    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            start([child])
            child.send(("send", n))
            deadline = time.monotonic() + 20
            bad = []
            with memoryview(exp) as mv:
                for i in range(n):
                    rec = exp.wait(max(0.0, deadline - time.monotonic()))
                    assert rec is not None, f"notification {i} of {n} did not arrive in time"
                    # The ring holds 256 records, so the sender cannot have
                    # overwritten slot i % 1000 yet: the data must be i.
                    off = 4 * (i % 1000)
                    if rec != (off, 4) or int.from_bytes(mv[off:off + 4], "little") != i:
                        bad.append((i, rec, bytes(mv[off:off + 4])))
                        break
            assert not bad, bad
            child.expect("sent")
            assert exp.wait(0) is None                          # nothing extra
            finish([child])


def test_wait_timeout_returns_none():
    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 64)
            assert exp.wait(0) is None                          # no importer at all
            t0 = time.monotonic()
            assert exp.wait(0.1) is None
            assert 0.09 <= time.monotonic() - t0 < 2
            with pytest.raises(ValueError):
                exp.wait(-1)
            start([child])
            assert exp.importers == 1                           # counted once import_buffer returned
            t0 = time.monotonic()
            assert exp.wait(0.1) is None                        # an importer that sends nothing
            assert 0.09 <= time.monotonic() - t0 < 2
            child.send(("send", 1))
            child.expect("sent")
            assert exp.wait(DEADLINE) == (0, 4)
            assert exp.wait(0) is None

            # While another thread waits, a second waiter times out (None)
            # like any other; each notification goes to exactly one of them.
            got = []
            t = threading.Thread(target=lambda: got.append(exp.wait(DEADLINE)))
            t.start()
            wait_for(lambda: blocked_in_poll(t.native_id), what="the first waiter to sleep")
            assert exp.wait(0) is None
            assert exp.wait(0.05) is None
            child.send(("send", 2))
            child.expect("sent")
            second = exp.wait(DEADLINE)
            t.join(DEADLINE)
            assert sorted(got + [second]) == [(0, 4), (4, 4)]
            assert exp.wait(0) is None
            finish([child])


def test_a_waiter_with_no_importer_gets_the_first_ones_notification():
    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 64)
            got = []

            def waiter():
                got.append(exp.wait(DEADLINE))
                got.append(time.monotonic())

            t = threading.Thread(target=waiter)
            t.start()
            wait_for(lambda: blocked_in_poll(t.native_id), what="the waiter to sleep")
            start([child])                                      # the importer arrives now
            child.send(("send", 1))
            child.expect("sent")
            sent = time.monotonic()
            t.join(DEADLINE)
            assert got[0] == (0, 4)
            # Woken by the doorbell of the new importer's ring, not found
            # by the 1 s re-check of a waiter that did not know the ring.
            assert got[1] - sent < 0.5
            finish([child])


def test_notifications_of_a_killed_importer_are_delivered_then_it_is_dropped():
    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            start([child])
            child.send(("send", 10))
            child.expect("sent")
            child.kill()
            assert [exp.wait(DEADLINE) for _ in range(10)] == [(4 * i, 4) for i in range(10)]
            wait_for(lambda: exp.wait(0.05) is None and exp.importers == 0,
                     what="the dead importer's link to be dropped")
            child.chan.close()
    assert Registry.open().sweep() == ["imp"]                   # its stale entry


def plain_plan(imp, n):
    """n sends without notification."""
    for i in range(n):
        imp.send(i.to_bytes(4, "little"), 0)


def test_gone_importers_are_released_without_a_waiter():
    """An exporter that never waits must not keep a socket and a segment for
    every importer that ever came: gone ones are released on the next import,
    unless they left notifications queued (those are kept for the waiter)."""
    with Endpoint("exp") as ep:
        exp = ep.export("buf", 64)
        fds = None
        for k in range(6):
            queues = k == 2                                     # leaves a notification queued
            with Child(_notifier, f"imp{k}", seq_plan if queues else plain_plan) as child:
                start([child])
                assert exp.importers == (2 if k > 2 else 1)     # gone ones were released
                child.send(("send", 1))
                child.expect("sent")
                finish([child])
            if k == 3:
                fds = len(os.listdir("/proc/self/fd"))
        assert len(os.listdir("/proc/self/fd")) <= fds          # no growth per importer
        assert exp.wait(0) == (0, 4)                            # imp2's notification
        wait_for(lambda: exp.wait(0.05) is None and exp.importers == 0,
                 what="the gone importers to be dropped")


# --------------------------------------------------------------------------- blocking

def test_blocking_nests_and_queued_notifications_survive():
    n = 1000                                                    # several ring-fulls
    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            start([child])
            exp.block_notifications()
            exp.block_notifications()
            assert exp.blocked == 2
            child.send(("send", n))                             # blocks after 256 queued
            assert exp.wait(NOT_DELIVERED) is None
            exp.unblock_notifications()
            assert exp.blocked == 1
            assert exp.wait(NOT_DELIVERED) is None              # still blocked
            got = []

            def waiter():
                got.append(exp.wait(DEADLINE))
                got.append(time.monotonic())

            t = threading.Thread(target=waiter)
            t.start()
            wait_for(lambda: blocked_in_poll(t.native_id), what="the waiter to sleep")
            assert not got
            unblocked = time.monotonic()
            exp.unblock_notifications()                         # wakes the sleeping waiter
            t.join(DEADLINE)
            assert got[0] == (0, 4)
            assert got[1] - unblocked < 0.5                     # woken, not found by a re-check
            assert exp.blocked == 0
            rest = [exp.wait(DEADLINE) for _ in range(n - 1)]
            assert rest == [(4 * (i % 1000), 4) for i in range(1, n)]
            child.expect("sent")
            assert exp.wait(0) is None
            with pytest.raises(RuntimeError):
                exp.unblock_notifications()
            finish([child])


# --------------------------------------------------------------------------- handlers

def test_handler_runs_for_each_notifying_send():
    n = 1000
    calls, seen, failures = [], [], []

    def handler(off, nbytes):
        seen.append((exp.blocked, threading.current_thread() is threading.main_thread()))
        with memoryview(exp) as mv:
            value = int.from_bytes(mv[off:off + 4], "little")
        calls.append((off, nbytes, value))
        if len(calls) % 100 == 1:
            failures.append(len(calls))
            raise RuntimeError("handler failure (expected by the test)")
        if len(calls) % 100 == 2:
            exp.unblock_notifications()                         # allowed: as in SHRIMP

    with Child(_notifier, "imp", seq_plan) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096, notify=handler)
            with pytest.raises(RuntimeError):
                exp.wait(0)
            start([child])
            child.send(("send", n))
            child.expect("sent")
            wait_for(lambda: len(calls) >= n, what=f"{n} handler calls")
            # Each call saw its own data in place (distinct slots: no overwrite).
            assert calls == [(4 * i, 4, i) for i in range(n)]
            assert set(seen) == {(1, False)}                    # blocked while it runs, in a thread
            assert len(failures) == 10                          # failing calls did not stop delivery,
            assert exp.blocked == 0                             # nor handlers that unblock themselves

            # Explicit blocking defers handlers too.
            exp.block_notifications()
            child.send(("send", 5))
            child.expect("sent")
            assert not wait_until(lambda: len(calls) > n, NOT_DELIVERED)
            exp.unblock_notifications()
            wait_for(lambda: len(calls) == n + 5, what="deferred handler calls")
            assert calls[n:] == [(4 * i, 4, i) for i in range(5)]
            finish([child])
        assert exp.closed


def wait_until(predicate, timeout):
    """Negative check helper: poll ``predicate`` for ``timeout`` seconds."""
    try:
        wait_for(predicate, timeout=timeout)
        return True
    except AssertionError:
        return False


# --------------------------------------------------------------------------- several importers

def _many_imports(chan, count):
    """Child: import exp/buf ``count`` times, report "ready"; then for each
    index received, a notifying send through that import, reported "sent";
    "done" ends it."""
    with Endpoint("imp") as ep:
        imps = [ep.import_buffer("exp", "buf") for _ in range(count)]
        chan.send("ready")
        while (cmd := chan.recv()) != "done":
            imps[cmd].send(b"x", 0, notify=True)
            chan.send("sent")
        for imp in imps:
            imp.close()


def test_a_sleeping_exporter_hears_every_importer_beyond_64():
    """An exporter asleep in wait() watches every importer's doorbell, not
    only the first 64 (the others used to be looked at on a 1 s re-check
    only): a notification through the 70th import ends a 0.8 s wait."""
    with Endpoint("exp") as ep:
        exp = ep.export("buf", 64)
        with Child(_many_imports, 70) as child:
            child.expect("ready")
            assert exp.importers == 70
            got = []
            t = threading.Thread(target=lambda: got.append(exp.wait(0.8)))
            t.start()
            wait_for(lambda: blocked_in_poll(t.native_id), what="the waiter to sleep")
            child.send(69)
            child.expect("sent")
            t.join(DEADLINE)
            assert got == [(0, 1)]
            child.send("done")
            child.finish()


def test_several_importers_round_robin_and_all_delivered():
    k, m = 3, RECORDS                   # m fills each importer's ring exactly
    kids = children(k, tagged_plan)
    try:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            start(kids)
            assert exp.importers == k
            # Phase 1: every importer's ring is full of queued notifications;
            # delivery must take one from each importer in turn.
            exp.block_notifications()
            for j, c in enumerate(kids):
                c.send(("send", m, j))
            for c in kids:
                c.expect("sent")
            exp.unblock_notifications()
            recs = [exp.wait(DEADLINE) for _ in range(k * m)]
            assert exp.wait(0) is None
            tags = [off for off, _ in recs]
            assert sorted(tags[:k]) == list(range(k))
            assert tags == tags[:k] * m, "delivery is not round robin"
            for j in range(k):
                assert [nb for off, nb in recs if off == j] == list(range(1, m + 1))

            # Phase 2: all stream at once; nothing lost, each in its own order.
            big = 3000
            for j, c in enumerate(kids):
                c.send(("send", big, j))
            per = {j: [] for j in range(k)}
            deadline = time.monotonic() + 20
            for _ in range(k * big):
                rec = exp.wait(max(0.0, deadline - time.monotonic()))
                assert rec is not None, "a notification did not arrive in time"
                per[rec[0]].append(rec[1])
            for c in kids:
                c.expect("sent")
            assert per == {j: list(range(1, big + 1)) for j in range(k)}
            finish(kids)
    finally:
        for c in kids:
            c.__exit__()


# --------------------------------------------------------------------------- hostile importer

def _corrupt(imp, how):
    """Scribble over this importer's notification ring, then ring the bell."""
    cap = NOTIFY_CAPACITY
    with memoryview(imp._notify_segment) as mv:
        if how == "huge_head":
            U64.pack_into(mv, HEAD_AT, 2**63)
        elif how == "head_behind_tail":
            U64.pack_into(mv, HEAD_AT, 2**64 - 16)
        elif how == "partial_record":
            U64.pack_into(mv, HEAD_AT, 8)
        elif how == "record_out_of_bounds":
            struct.pack_into("<QQ", mv, RING_DATA_AT, 2**64 - 16, 32)    # offset wraps
            U64.pack_into(mv, HEAD_AT, 16)
        elif how == "record_past_end":
            struct.pack_into("<QQ", mv, RING_DATA_AT, 4090, 16)
            U64.pack_into(mv, HEAD_AT, 16)
        elif how == "write_shut":
            # Importers never shut their notification ring; the flag set
            # made the exporter's wait ready for ever (end of stream) with
            # nothing to take: a core spun, wait(timeout) never returned.
            struct.pack_into("<I", mv, WRITE_SHUT_AT, 1)
        elif how == "write_shut_partial":
            struct.pack_into("<I", mv, WRITE_SHUT_AT, 0xDEADBEEF)
            U64.pack_into(mv, HEAD_AT, 8)
        elif how == "random":
            mv[:RING_DATA_AT + cap] = os.urandom(RING_DATA_AT + cap)
        else:
            raise ValueError(how)
    imp._sock.send(b"\x01")                                    # wake a sleeping exporter


def _hostile(chan, how):
    chan.recv()
    with Endpoint("evil") as ep:
        imp = ep.import_buffer("exp", "buf")
        _corrupt(imp, how)
        chan.send("corrupted")
        chan.recv()
        # The exporter drops this link: it sees the exporter gone.
        wait_for(lambda: gone(lambda: imp.send(b"x", 0)), timeout=DEADLINE,
                 what="the exporter to drop the hostile link")
        chan.send("reset")


HOSTILE = ["huge_head", "head_behind_tail", "partial_record", "record_out_of_bounds",
           "record_past_end", "write_shut", "write_shut_partial", "random"]
WRITE_SHUT_AT = 72


@pytest.mark.parametrize("how", HOSTILE)
def test_garbage_in_the_notification_ring_drops_only_that_importer(how):
    n = 50
    with Child(_hostile, how) as evil, Child(_notifier, "good", tagged_plan) as good:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            start([good])
            evil.send("go")
            evil.expect("corrupted")
            good.send(("send", n, 100))
            got = [exp.wait(DEADLINE) for _ in range(n)]
            assert got == [(100, k) for k in range(1, n + 1)]   # no garbage delivered
            assert exp.wait(0) is None
            assert exp.importers == 1
            evil.send("check")
            evil.expect("reset")
            evil.finish()
            good.send(("send", 3, 7))                           # the good one keeps working
            assert [exp.wait(DEADLINE) for _ in range(3)] == [(7, 1), (7, 2), (7, 3)]
            good.expect("sent")
            finish([good])


def test_garbage_while_a_handler_sleeps_drops_only_that_importer():
    calls = []
    with Child(_hostile, "huge_head") as evil, Child(_notifier, "good", tagged_plan) as good:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096, notify=lambda off, nb: calls.append((off, nb)))
            start([good])
            evil.send("go")
            evil.expect("corrupted")                            # it also rang the doorbell
            evil.send("check")
            evil.expect("reset")                                # dropped by the handler thread
            evil.finish()
            good.send(("send", 20, 5))
            good.expect("sent")
            wait_for(lambda: len(calls) >= 20, what="the good importer's notifications")
            assert calls == [(5, k) for k in range(1, 21)]
            assert exp.importers == 1
            finish([good])


def test_a_shut_notification_ring_does_not_make_the_exporter_spin():
    """Found by the chaos suite: garbage in a notification ring's
    write_shut flag kept the exporter's wait() returning to its loop at
    once (end of stream is "ready") with nothing to take: a core at 100 %
    and wait(timeout) never returning.  Now that importer is dropped."""
    import resource

    def cpu():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    with Child(_hostile, "write_shut") as evil:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 4096)
            evil.send("go")
            evil.expect("corrupted")
            t0, c0 = time.monotonic(), cpu()
            assert exp.wait(0.5) is None
            assert time.monotonic() - t0 < 5
            assert exp.importers == 0
            assert exp.wait(0.3) is None
            assert cpu() - c0 < 0.3
            evil.send("check")
            evil.expect("reset")
            evil.finish()
