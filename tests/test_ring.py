"""Data plane, part 2: ``Ring`` semantics (wrap-around, full/empty, gather
writes, zero-copy peek, EOF, close, capacity, timeouts).  A hostile peer is in
test_ring_corruption.py.

Each ring has a producer end and a consumer end (two Ring objects on one
segment, as two processes would have) and a socketpair doorbell.
"""

import errno
import os
import random
import threading
import time

import pytest

from conftest import wait_for
from fastpath_helpers import HEADER, pair, pattern  # noqa: F401 (pair: a fixture)
from shrimpio._fastpath import Ring, Segment


# --------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("capacity", [64, 256, 4096])
def test_wrap_around_odd_sizes(pair, capacity):
    """Thousands of writes and reads of odd sizes, crossing the end of the ring
    many times; the byte stream comes out exactly as it went in."""
    p = pair(capacity)
    rng = random.Random(capacity)
    written = read = 0
    while read < 50 * capacity:
        free = p.w.free()
        assert free == capacity - (written - read) and p.r.readable() == written - read
        n = rng.randint(1, capacity)
        if n <= free:
            assert p.w.write(pattern(written, n)) == n
            written += n
        m = rng.choice([1, 3, 7, rng.randint(1, capacity)])
        if written - read:
            got = p.r.read(m)
            assert got == pattern(read, min(m, written - read))
            read += len(got)
    assert p.hdr.get("head") == written and p.hdr.get("tail") == read
    assert written > 40 * capacity  # wrapped many times


def test_indices_wrap_at_2_64(pair):
    """Indices are free-running u64 counters: a stream crossing 2**64 is seamless."""
    p = pair(64)
    p.w.close()
    p.r.close()
    start = 2 ** 64 - 150
    p.hdr.set("head", start)
    p.hdr.set("tail", start)
    p.w = Ring(p.seg, 0, 64, data_bell=p.wsock.fileno(), space_bell=p.wsock.fileno())
    p.r = Ring(p.seg, 0, 64, data_bell=p.rsock.fileno(), space_bell=p.rsock.fileno())
    sent = 0
    for n in [13, 50, 64, 1, 33, 60, 41, 64]:
        p.w.write_all(pattern(sent, n), timeout=0)
        assert p.r.read(100) == pattern(sent, n)
        sent += n
    assert p.hdr.get("head") == (start + sent) % 2 ** 64 < start


def test_full_ring(pair):
    p = pair(64)
    assert p.w.write(b"x" * 40) == 40
    # write(): as much as fits, like socket.send
    assert p.w.write(b"y" * 40, timeout=0) == 24
    assert p.w.free() == 0 and p.r.readable() == 64
    with pytest.raises(BlockingIOError) as e:
        p.w.write(b"z", timeout=0)
    assert e.value.errno == errno.EAGAIN
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        p.w.write(b"z", timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert p.r.read(100) == b"x" * 40 + b"y" * 24


def test_large_copies_move_all_that_fits_across_the_wrap(pair):
    """Copies of 32 KiB and more are published (and released) in pieces, so
    the peer copies one while this side copies the next; a call still moves
    all that fits (or all that is there), as ``socket.send``/``recv`` do,
    and a copy crossing the end of the ring comes out in order."""
    cap = 256 * 1024
    p = pair(cap)
    assert p.w.write(pattern(0, 250_001), timeout=0) == 250_001
    assert p.w.write(pattern(250_001, 50_000), timeout=0) == cap - 250_001
    buf = bytearray(300_000)
    assert p.r.read_into(buf) == cap and bytes(buf[:cap]) == pattern(0, cap)
    assert p.w.writev([pattern(cap, 70_000), pattern(cap + 70_000, 33)], timeout=0) == 70_033
    assert p.r.read_into(buf) == 70_033 and bytes(buf[:70_033]) == pattern(cap, 70_033)
    assert p.hdr.get("head") == p.hdr.get("tail") == cap + 70_033


def test_write_all_timeout_zero_is_never_silently_short(pair):
    p = pair(64)
    p.w.write(b"a" * 50)
    with pytest.raises(BlockingIOError) as e:
        p.w.write_all(b"b" * 30, timeout=0)
    assert e.value.characters_written == 14  # what went in, so nothing is lost unseen
    with pytest.raises(BlockingIOError) as e:
        p.w.writev([b"c"], timeout=0, all=True)
    assert e.value.characters_written == 0
    assert p.r.read(100) == b"a" * 50 + b"b" * 14
    assert p.w.write_all(b"d" * 64, timeout=0) is None
    assert p.r.read(100) == b"d" * 64


def test_empty_ring(pair):
    p = pair(64)
    with pytest.raises(BlockingIOError) as e:
        p.r.read(10)                       # the default timeout is 0
    assert e.value.errno == errno.EAGAIN
    with pytest.raises(BlockingIOError):
        p.r.read_into(bytearray(5), timeout=0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        p.r.read(10, timeout=0.1)
    assert 0.1 <= time.monotonic() - t0 < 5
    assert p.r.wait_readable(timeout=0) is False
    assert p.r.wait_readable(timeout=0.01) is False
    assert p.r.peek().nbytes == 0
    assert p.r.readable() == 0 and p.w.free() == 64


def test_read_into_and_partial_reads(pair):
    p = pair(256)
    p.w.write(b"0123456789")
    buf = bytearray(4)
    assert p.r.read_into(buf) == 4 and buf == b"0123"
    assert p.r.read_into(buf, 2) == 2 and buf[:2] == b"45"
    big = bytearray(100)
    assert p.r.read_into(memoryview(big)[10:], timeout=None) == 4
    assert big[10:14] == b"6789"
    assert p.r.read(0) == b""


def test_writev_gathers(pair):
    p = pair(64)
    p.w.write(b"." * 50)
    p.r.read(50)                                   # next write crosses the end
    parts = [b"ab", bytearray(b"cdefg"), memoryview(b"__hijk__")[2:6], b"", pattern(0, 20)]
    total = sum(len(x) for x in parts)
    assert p.w.writev(parts) == total
    assert p.r.read(100) == b"".join(bytes(x) for x in parts)
    # Partial: as much as fits, stopping mid-buffer.
    assert p.w.writev([b"1" * 40, b"2" * 40], timeout=0) == 64
    assert p.r.read(100) == b"1" * 40 + b"2" * 24
    assert p.w.writev([]) == 0 and p.w.writev(iter([b"", b""])) == 0
    with pytest.raises(TypeError):
        p.w.writev([b"ok", 12])
    with pytest.raises(TypeError):
        p.w.writev(5)
    assert p.r.readable() == 0  # a refused writev wrote nothing


def test_writev_all_waits_for_space(pair):
    p = pair(64, busy_poll_us=0)
    parts = [pattern(i * 50, 50) for i in range(20)]
    got = bytearray()

    def reader():
        while len(got) < 1000:
            got.extend(p.r.read(37, timeout=10))

    t = threading.Thread(target=reader)
    t.start()
    assert p.w.writev(parts, timeout=10, all=True) == 1000
    t.join(10)
    assert not t.is_alive() and bytes(got) == pattern(0, 1000)


def test_peek_is_zero_copy_and_consume_advances(pair):
    p = pair(64)
    p.w.write(b"abcdefgh")
    view = p.r.peek()
    assert isinstance(view, memoryview) and view.readonly
    assert view.obj is p.seg                    # a view of the segment, not a copy
    assert bytes(view) == b"abcdefgh"
    # Change the ring memory underneath: the view shows it.
    data = p.hdr.data(64)
    data[0:3] = b"XYZ"
    assert bytes(view) == b"XYZdefgh"
    data.release()
    assert bytes(p.r.peek(3)) == b"XYZ"         # peek does not consume
    assert p.r.readable() == 8
    p.r.consume(3)
    assert p.r.readable() == 5 and p.w.free() == 64 - 5
    assert bytes(p.r.peek()) == b"defgh"
    with pytest.raises(ValueError, match="only 5 readable"):
        p.r.consume(6)
    with pytest.raises(ValueError):
        p.r.consume(-1)
    p.r.consume(0)
    p.r.consume(5)
    assert p.r.readable() == 0 and p.r.peek().nbytes == 0
    view.release()


def test_peek_stops_at_the_wrap_point(pair):
    p = pair(64)
    p.w.write(b"-" * 60)
    p.r.consume(60)
    p.w.write(b"0123456789")                   # 4 bytes at the end, 6 at the start
    first = p.r.peek()
    assert bytes(first) == b"0123"
    p.r.consume(len(first))
    assert bytes(p.r.peek()) == b"456789"
    p.r.consume(6)
    first.release()


def test_peek_view_keeps_segment_mapped(pair):
    p = pair(64)
    p.w.write(b"keep")
    view = p.r.peek()
    p.r.close()
    assert bytes(view) == b"keep"               # still valid memory
    p.w.close()
    p.hdr.release()
    with pytest.raises(BufferError):
        p.seg.close()
    view.release()


def test_shutdown_write_gives_eof_after_the_data(pair):
    p = pair(64)
    p.w.write(b"last words")
    assert not p.w.write_shut
    p.w.shutdown_write()
    p.w.shutdown_write()                        # idempotent
    assert p.w.write_shut and p.hdr.get("write_shut") == 1
    assert not p.r.at_eof()                     # data still unread
    assert p.r.read(4) == b"last"
    assert p.r.read(100) == b" words"
    assert p.r.at_eof()
    assert p.r.read(100) == b"" and p.r.read(100, timeout=None) == b""
    assert p.r.read_into(bytearray(3), timeout=0) == 0
    assert p.r.wait_readable(timeout=0) is True
    with pytest.raises(BrokenPipeError):
        p.w.write(b"more")
    with pytest.raises(BrokenPipeError):
        p.w.write_all(b"")
    with pytest.raises(BrokenPipeError):
        p.w.writev([b"x"])


def test_close_read_stops_the_writer(pair):
    p = pair(64)
    assert not p.w.read_shut
    p.r.close_read()
    assert p.w.read_shut and p.hdr.get("read_shut") == 1
    with pytest.raises(BrokenPipeError) as e:
        p.w.write(b"x")
    assert e.value.errno == errno.EPIPE
    assert p.w.wait_writable(timeout=0) is True  # "writable": the write fails at once


def test_close_semantics(pair):
    p = pair(64)
    p.w.write(b"abc")
    p.r.close()
    p.r.close()                                  # idempotent
    assert p.r.closed and "closed" in repr(p.r)
    for call in (lambda: p.r.read(1), lambda: p.r.peek(), lambda: p.r.readable(),
                 lambda: p.r.consume(1), lambda: p.r.at_eof(), lambda: p.r.wait_readable(0),
                 lambda: p.r.read_into(bytearray(1)), lambda: p.r.close_read()):
        with pytest.raises(ValueError, match="closed"):
            call()
    # The other end is independent.
    assert p.w.write(b"def") == 3 and p.w.free() == 58
    with Ring(p.seg, 0, 64) as again:            # a new consumer end picks up the stream
        assert again.read(10) == b"abcdef"
    assert again.closed


def test_close_waits_for_a_blocked_thread(pair):
    p = pair(64, busy_poll_us=0)
    errors = []

    def blocked():
        try:
            p.r.read(1, timeout=10)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
    t0 = time.monotonic()
    p.r.close()                                  # returns once the reader has left
    assert time.monotonic() - t0 < 5
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "closed" in str(errors[0])


@pytest.mark.parametrize("capacity", [0, 1, 32, 63, 65, 100, 3 << 10, -64, 2 ** 41, 2 ** 64])
def test_capacity_must_be_a_power_of_two(capacity):
    with Segment(8192) as seg:
        with pytest.raises(ValueError, match="power of two"):
            Ring(seg, 0, capacity, create=True)


def test_ring_argument_checks():
    with Segment(Ring.footprint(1024) + 64) as seg:
        for bad in (64.0, "64", [64]):
            with pytest.raises(TypeError):
                Ring(seg, 0, bad, create=True)
        with pytest.raises(ValueError, match="multiple of 64"):
            Ring(seg, 8, 64, create=True)
        with pytest.raises(ValueError, match="multiple of 64"):
            Ring(seg, -64, 64, create=True)
        with pytest.raises(ValueError, match="does not fit"):
            Ring(seg, 128, 1024, create=True)
        with pytest.raises(ValueError, match="no room"):
            Ring(seg, 2048, 64, create=True)
        with pytest.raises(ValueError, match="capacity is required"):
            Ring(seg, 0, create=True)
        with pytest.raises(ValueError, match="bell"):
            Ring(seg, 0, 64, create=True, bell="pipe")
        with pytest.raises(TypeError):
            Ring(bytearray(4096), 0, 64, create=True)
        with pytest.raises(TypeError):
            Ring(None, 0, 64, create=True)
        with Ring(seg, 0, 1024, create=True) as r:
            assert r.capacity == 1024 and Ring.footprint(1024) == HEADER + 1024
            with pytest.raises(TypeError):
                r.write(123)
            with pytest.raises(TypeError):
                r.write("text")
            with pytest.raises((TypeError, BufferError)):
                r.read_into(b"immutable")
            with pytest.raises(ValueError):
                r.read(-1)
            with pytest.raises(ValueError):
                r.wait_writable(0)
            with pytest.raises(ValueError):
                r.wait_writable(2048)
            # No doorbell: blocking waits are refused, non-blocking calls work.
            with pytest.raises(ValueError, match="no doorbell"):
                r.read(1, timeout=1)
            with pytest.raises(BlockingIOError):
                r.read(1, timeout=0)


@pytest.mark.parametrize("timeout,exc", [(-1, ValueError), (float("nan"), ValueError),
                                         ("1", TypeError), (-0.5, ValueError)])
def test_bad_timeouts(pair, timeout, exc):
    p = pair(64)
    with pytest.raises(exc):
        p.r.read(1, timeout=timeout)
    with pytest.raises(exc):
        p.w.write(b"x", timeout=timeout)
    with pytest.raises(exc):
        p.r.wait_readable(timeout)
    assert p.r.readable() == 0


@pytest.mark.parametrize("timeout", [None, float("inf"), 1e300])
def test_forever_timeouts_block_until_data(pair, timeout):
    p = pair(64, busy_poll_us=0)
    out = []
    t = threading.Thread(target=lambda: out.append(p.r.read(10, timeout=timeout)))
    t.start()
    wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
    assert t.is_alive() and not out
    p.w.write(b"wake")
    t.join(10)
    assert out == [b"wake"]


def test_eventfd_doorbell():
    seg = Segment(Ring.footprint(64))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        w = Ring(seg, 0, 64, create=True, data_bell=efd, bell="eventfd", busy_poll_us=0)
        r = Ring(seg, 0, 64, data_bell=efd, bell="eventfd", busy_poll_us=0)
        out = []
        t = threading.Thread(target=lambda: out.append(r.read(10, timeout=10)))
        t.start()
        wait_for(lambda: memoryview(seg)[192] == 1, what="reader asleep")
        w.write(b"efd")
        t.join(10)
        assert out == [b"efd"]
        w.close()
        r.close()
    finally:
        seg.close()
        os.close(efd)


def test_ring_siblings_never_form_a_cycle():
    """Rings are not tracked by the garbage collector, so trim_with refuses
    what would make a cycle of siblings (a ring itself, or one that has a
    sibling of its own); a connection's pair (reader -> writer) is fine."""
    import gc
    seg = Segment(1 << 16)
    a = Ring(seg, 0, 4096, create=True)
    b = Ring(seg, 8192, 4096, create=True)
    try:
        assert not gc.is_tracked(a)
        a.trim_with(b)
        for x, y in ((b, a), (a, a), (b, b)):
            with pytest.raises(ValueError):
                x.trim_with(y)
        a.trim_with(None)
        b.trim_with(a)
    finally:
        a.close()
        b.close()
        seg.close()
