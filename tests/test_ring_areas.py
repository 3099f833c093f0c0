"""Two-area rings (header version 2), the rings of every shared-memory
connection: bytes go to a small area in the segment's first page while they
fit there, to a large area when they do not, and back; the producer changes
area only while the ring is empty and says so in the header (``area``,
``base``), which the consumer checks before it reads.  An idle connection
maps one page; the large area's pages go back to the system.

Header offsets are in fastpath_helpers.FIELDS (small @16, base @80, area @88).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading

import pytest

import shrimpio.socket as ss
from shrimpio import _connection
from shrimpio._fastpath import Ring, RingCorruptedError, Segment, _set_trim_interval

from children import child_env
from fastpath_helpers import FIELDS, pattern

SMALL, BIG, HOT = 1024, 64 * 1024, 4096


class AreaPair:
    """A two-area ring in a segment mapped hot (its first page only, at
    first), a producer end and a consumer end, and a socketpair doorbell."""

    def __init__(self, big: int = BIG) -> None:
        self.seg = Segment(HOT + big, hot=HOT)
        self.wsock, self.rsock = socket.socketpair()
        kw = dict(small=SMALL, big_offset=HOT, busy_poll_us=0)
        self.w = Ring(self.seg, 0, big, create=True, data_bell=self.wsock.fileno(),
                      space_bell=self.wsock.fileno(), **kw)
        self.r = Ring(self.seg, 0, big, data_bell=self.rsock.fileno(),
                      space_bell=self.rsock.fileno(), **kw)

    def field(self, name: str, value: "int | None" = None) -> int:
        """Read (or write, as a hostile peer would) a header field, through
        a view of the first page only."""
        off, fmt = FIELDS[name]
        mv = memoryview(self.seg)
        try:
            if value is not None:
                struct.pack_into(fmt, mv, off, value)
            return struct.unpack_from(fmt, mv, off)[0]
        finally:
            mv.release()

    def close(self) -> None:
        self.w.close()
        self.r.close()
        self.seg.close()
        self.wsock.close()
        self.rsock.close()


@pytest.fixture
def areas():
    made = []

    def make(**kw):
        p = AreaPair(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_small_messages_stay_in_the_first_page(areas):
    p = areas()
    assert (p.w.capacity, p.w.small, p.seg.hot) == (BIG, SMALL, HOT)
    for i in range(500):
        msg = pattern(i, 64)
        assert p.w.write(msg) == 64
        assert p.r.read(100) == msg
    assert not p.w.large and not p.r.large
    assert p.seg.hot == HOT                   # the large area was never mapped
    assert p.field("version") == 2 and p.field("small") == SMALL


def test_bytes_that_do_not_fit_go_to_the_large_area_and_back(areas):
    p = areas()
    assert p.w.write(pattern(0, 5000)) == 5000      # empty: all of it fits the large area
    assert p.w.large and p.field("area") == 1 and p.field("base") == 0
    assert p.r.read(10000) == pattern(0, 5000)
    assert p.r.large and p.seg.hot == HOT + BIG
    assert p.w.write(b"small") == 5                 # empty again: the small area, from its start
    assert not p.w.large and p.field("base") == 5000
    assert p.r.read(100) == b"small" and not p.r.large


def test_bytes_that_do_not_fit_beside_unread_ones_go_on_in_the_large_area(areas):
    """A write that the small area has too little room for, beside unread
    bytes, goes on in the large area at once, from the current position
    (a non-blocking send takes all of it, as a kernel socket's buffer
    would); the reader reads the small area up to there, then the large."""
    p = areas()
    assert p.w.write(pattern(0, 100)) == 100
    assert p.w.write(pattern(100, 3000)) == 3000 and p.w.large
    assert (p.field("area"), p.field("base")) == (1, 100)
    assert p.r.read(50) == pattern(0, 50)
    assert p.r.read(10_000) == pattern(50, 50)          # the small area's rest first
    assert p.r.read(10_000) == pattern(100, 3000) and p.r.large
    total = 300_000
    got = bytearray()
    assert p.w.write(pattern(0, 200)) == 200           # empty: the small area again
    t = threading.Thread(target=p.w.write_all, args=(pattern(200, total - 200), 30))
    t.start()
    while len(got) < total:
        got += p.r.read(7919, 30)            # odd pieces, across both areas and wraps
    t.join()
    assert bytes(got) == pattern(0, total)


def test_a_reader_that_missed_a_restart_of_the_small_area_still_finds_its_bytes(areas):
    """The writer restarts the small area at the reader's position (the ring
    was empty), writes, then goes on in the large area, all before the reader
    looks: the header's sbase says where the small area's bytes are."""
    p = areas()
    p.w.write(pattern(0, 100))
    assert p.r.read(1000) == pattern(0, 100)
    p.w.write(pattern(100, 1000))          # past the room known: empty, the small area from 100
    p.w.write(pattern(1100, 900))          # on in the large area from 1100
    assert (p.field("area"), p.field("base"), p.field("sbase")) == (1, 1100, 100)
    got = p.r.read(10_000) + p.r.read(10_000)
    assert got == pattern(100, 1900)


@pytest.mark.parametrize("sizes", [(100,), (100, 900), (3000,), (100, 900, 40_000)])
def test_a_reader_that_attaches_late_follows_what_the_writer_did(sizes):
    """A new connection's client writes at once, maybe before the listener
    attached its rings: in the small area, the large one, or on from one to
    the other.  The late reader finds every byte where it is."""
    p = AreaPair.__new__(AreaPair)
    p.seg = Segment(HOT + BIG, hot=HOT)
    p.wsock, p.rsock = socket.socketpair()
    kw = dict(small=SMALL, big_offset=HOT, busy_poll_us=0)
    p.w = Ring(p.seg, 0, BIG, create=True, data_bell=p.wsock.fileno(), space_bell=p.wsock.fileno(), **kw)
    p.r = None
    try:
        total = 0
        for n in sizes:
            assert p.w.write(pattern(total, n)) == n
            total += n
        p.r = Ring(p.seg, 0, BIG, data_bell=p.rsock.fileno(), space_bell=p.rsock.fileno(), **kw)
        got = bytearray()
        while len(got) < total:
            got += p.r.read(1 << 20)
        assert bytes(got) == pattern(0, total)
    finally:
        if p.r is None:
            p.r = p.w
        p.close()


def test_a_non_blocking_send_never_comes_up_short_for_want_of_the_small_area():
    """The selectors echo server of the Python docs sends each read with one
    non-blocking send(): with a kernel socket's buffer it all goes; so it
    must over shared memory, whatever the small area holds."""
    c, s = _connected_pair()
    try:
        s.setblocking(False)
        for n in (1000, 1000, 1000, 600, 3000):
            assert s.send(pattern(n, n)) == n
        want = b"".join(pattern(n, n) for n in (1000, 1000, 1000, 600, 3000))
        c.settimeout(30)
        assert c.recv(len(want), socket.MSG_WAITALL) == want
    finally:
        c.close()
        s.close()


def test_a_stream_of_small_writes_stays_in_the_large_area(areas):
    """Small writes that come faster than they are read go on in the large
    area and, from the next empty ring on, start there, however small, for
    a second after the small area last had too little room (or until the
    connection idles): a stream does not go through the small area."""
    p = areas()
    assert p.w.write(pattern(0, 600)) == 600 and not p.w.large
    assert p.w.write(pattern(600, 600)) == 600 and p.w.large    # pressed
    assert p.r.read(10_000) == pattern(0, 600)
    assert p.r.read(10_000) == pattern(600, 600)
    assert p.w.write(pattern(1200, 100)) == 100 and p.w.large   # small, but a stream
    for k in range(50):
        assert p.w.write(pattern(k, 100)) == 100
    assert p.w.large and p.r.read(10_000)[:100] == pattern(1200, 100)
    assert p.w.trim() is True                                   # idle: back to small
    assert p.w.write(b"ping") == 4 and not p.w.large
    assert p.r.read(10) == b"ping"


def test_a_random_stream_survives_every_change_of_area(areas):
    rng = random.Random(11)
    p = areas()
    wpos = rpos = 0
    for _ in range(3000):
        n = rng.choice([1, 63, 700, SMALL, SMALL + 1, 3000, 40_000, 70_000])
        wpos += p.w.write(pattern(wpos, n))
        k = rng.choice([1, 100, 5000, 1 << 20])
        data = p.r.read(k)
        assert data == pattern(rpos, len(data))
        rpos += len(data)
    rest = p.r.read(1 << 20)
    assert rest == pattern(rpos, wpos - rpos)


def test_a_concurrent_stream_of_every_size_arrives_whole(areas):
    """A writer thread and a reader racing through every change of area
    (small, large, on in the large one beside unread small bytes, restarts
    at an empty ring, trims): every byte arrives, in order."""
    rng = random.Random(23)
    sizes = [rng.choice([1, 50, 600, SMALL - 1, SMALL, SMALL + 1, 2000, 30_000, 70_000])
             for _ in range(1500)]
    total = sum(sizes)
    p = areas()

    def writer():
        pos = 0
        for i, n in enumerate(sizes):
            p.w.write_all(pattern(pos, n), 30)
            pos += n
            if i % 97 == 0:
                p.w.trim()

    t = threading.Thread(target=writer)
    t.start()
    got = bytearray()
    while len(got) < total:
        got += p.r.read(rng.choice([1, 100, 1500, 1 << 20]), 30)
    t.join()
    assert bytes(got) == pattern(0, total)


def test_large_area_pages_go_back_to_the_system(areas):
    """Back to small messages after large ones: the producer gives the
    large area's pages back (MADV_REMOVE): the segment's file holds the
    first page again."""
    old = _set_trim_interval(0)
    try:
        p = areas(big=256 * 1024)
        blocks = lambda: os.fstat(p.seg.fileno()).st_blocks * 512     # noqa: E731
        first = blocks()
        for k in range(4):
            p.w.write_all(pattern(k, 200_000), 10)
            assert p.r.read(1 << 20) == pattern(k, 200_000)
        assert blocks() >= 200_000
        p.w.write(b"ping")
        assert p.r.read(10) == b"ping" and not p.w.large
        assert blocks() <= first
    finally:
        _set_trim_interval(old)


# --- a hostile producer ------------------------------------------------------

def test_an_area_change_with_bytes_unread_is_corruption(areas):
    p = areas()
    p.w.write(pattern(0, 10))
    assert p.r.read(5) == pattern(0, 5)
    p.field("area", 1)                    # "switched" at 0, where the reader was not
    p.w.write(b"more")
    with pytest.raises(RingCorruptedError, match="area 1 from position 0 with the consumer at 5"):
        p.r.read(100)
    assert p.r.broken
    with pytest.raises(RingCorruptedError):
        p.r.readable()


def test_going_on_in_the_large_area_too_far_ahead_is_corruption(areas):
    """A move to the large area ahead of the reader is valid only within
    the small area's capacity of the reader."""
    p = areas()
    p.w.write(pattern(0, 10))
    p.field("area", 1)
    p.field("base", 10 + SMALL)            # past what the small area can hold
    p.field("head", 10 + SMALL + 1)
    with pytest.raises(RingCorruptedError, match="area 1 from position 1034"):
        p.r.read(1)


def test_a_second_move_before_the_reader_caught_up_is_corruption(areas):
    p = areas()
    p.w.write(pattern(0, 500))
    p.w.write(pattern(500, 900))           # on in the large area from 500
    assert p.r.read(100) == pattern(0, 100)
    p.field("base", 300)                   # moved again, elsewhere
    p.w.write(b"z")
    with pytest.raises(RingCorruptedError, match="moving to 500"):
        p.r.read(1000)


def test_a_hostile_writer_cannot_make_the_reader_leave_its_areas():
    """Whatever a writer stores in head, area and base, the reader stays in
    bounds: it either reads bytes of its two areas or says the ring is
    corrupted."""
    rng = random.Random(5)
    for _ in range(300):
        p = AreaPair()
        n = rng.choice([1, 10, 700, 3000])
        p.w.write(pattern(0, n))
        p.r.read(rng.choice([0, 5, 2000]))
        for name in rng.sample(["head", "area", "base"], rng.randint(1, 3)):
            p.field(name, rng.choice([0, 1, 2, 5, 700, 1024, 1025, 3000, BIG, BIG + 1, 2 ** 63, 2 ** 64 - 1])
                    if name != "area" else rng.choice([0, 1, 2, 2 ** 32 - 1]))
        try:
            for _ in range(3):
                p.r.read(rng.choice([1, 100, 1 << 20]))
        except (RingCorruptedError, BlockingIOError):
            pass
        finally:
            p.close()


def test_a_move_seen_before_its_bytes_or_its_area_is_followed(areas):
    """The producer's header stores are not ordered with its later index
    stores, and it stores ``area`` last: a reader may see the new ``base``
    ahead of the published index, with ``area`` still 0.  The bytes before
    ``base`` are the small area's."""
    p = areas()
    p.w.write(pattern(0, 100))
    p.field("sbase", 0)
    p.field("base", 600)                 # a move under way, as seen from here
    assert p.r.read(10_000) == pattern(0, 100)
    assert not p.r.broken and not p.r.large


@pytest.mark.parametrize("area", [2, 7, 2 ** 32 - 1])
def test_an_impossible_area_is_corruption(areas, area):
    p = areas()
    p.field("area", area)
    p.w.write(b"x")
    with pytest.raises(RingCorruptedError, match=f"area {area}"):
        p.r.read(1)


def test_a_base_moved_elsewhere_is_corruption(areas):
    p = areas()
    p.w.write(pattern(0, 10))
    assert p.r.read(10) == pattern(0, 10)
    p.field("base", 3)                    # the same area, from a position that is not ours
    p.w.write(b"y")
    with pytest.raises(RingCorruptedError, match="position 3 with the consumer at 10"):
        p.r.read(1)


def test_a_huge_head_after_a_change_of_area_is_corruption(areas):
    p = areas()
    p.w.write(pattern(0, 5000))
    assert p.r.read(100) == pattern(0, 100)
    p.field("head", 100 + BIG + 1)
    with pytest.raises(RingCorruptedError, match="producer index"):
        p.r.read(1)


@pytest.mark.parametrize("field,value", [("area", 2), ("small", 2048), ("small", 0), ("version", 1)])
def test_attaching_to_a_bad_two_area_header_is_refused(field, value):
    seg = Segment(HOT + BIG, hot=HOT)
    try:
        Ring(seg, 0, BIG, create=True, small=SMALL, big_offset=HOT).close()
        off, fmt = FIELDS[field]
        mv = memoryview(seg)
        struct.pack_into(fmt, mv, off, value)
        mv.release()
        with pytest.raises(RingCorruptedError):
            Ring(seg, 0, BIG, small=SMALL, big_offset=HOT)
    finally:
        seg.close()


def test_two_area_arguments_are_checked():
    seg = Segment(HOT + BIG, hot=HOT)
    try:
        for kw in (dict(small=1000, big_offset=HOT), dict(small=SMALL, big_offset=-64),
                   dict(small=SMALL, big_offset=HOT + 8), dict(small=SMALL, big_offset=HOT + 64),
                   dict(small=8192, big_offset=HOT)):
            with pytest.raises(ValueError):
                Ring(seg, 0, BIG, create=True, **kw)
        with pytest.raises(ValueError, match="small area"):
            Ring(seg, 3072, BIG, create=True, small=SMALL, big_offset=HOT)   # past the hot page
    finally:
        seg.close()


# --- two processes -----------------------------------------------------------

ECHO = """
import json, socket, struct, sys
import shrimpio.socket as ss
lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
lst.bind(("127.0.0.1", 0))
lst.listen()
print(lst.getsockname()[1], flush=True)
c, _ = lst.accept()
lst.close()

def exactly(n):
    buf = bytearray()
    while len(buf) < n:
        part = c.recv(n - len(buf))
        if not part:
            raise SystemExit(0)
        buf += part
    return bytes(buf)

while True:
    n, = struct.unpack("!I", exactly(4))
    msg = exactly(n)
    if msg == b"state?":
        conn = c._shm
        msg = json.dumps({"tx": conn.tx.large, "rx": conn.rx.large, "hot": conn.segment.hot}).encode()
    c.sendall(struct.pack("!I", len(msg)) + msg)
"""


def test_mixed_messages_between_two_processes():
    """Messages of every size both ways through a child's echo: each comes
    back whole; after small ones, both ends use their small areas again."""
    child = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, env=child_env())
    try:
        port = int(child.stdout.readline())
        c = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(("127.0.0.1", port))
        assert c._shm is not None

        def call(msg):
            c.sendall(struct.pack("!I", len(msg)) + msg)
            n, = struct.unpack("!I", c.recv(4, socket.MSG_WAITALL))
            return c.recv(n, socket.MSG_WAITALL) if n else b""

        for i, n in enumerate([10, 1000, 1020, 1021, 5000, 300_000, 64, 1 << 20, 1, 2048, 70_000]):
            assert call(pattern(i, n)) == pattern(i, n)
        for i in range(20):
            assert call(pattern(i, 100)) == pattern(i, 100)
        state = json.loads(call(b"state?"))
        conn = c._shm
        assert not state["tx"] and not conn.tx.large            # the last bytes were small
        assert conn.segment.hot == state["hot"] == _connection.Connection.layout(
            _connection.DEFAULT_RING, _connection.DEFAULT_RING)[1]
        c.close()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_an_idle_connection_maps_one_page():
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    try:
        c = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(lst.getsockname())
        s, _ = lst.accept()
        c.sendall(b"p" * 64)
        assert s.recv(64) == b"p" * 64
        s.sendall(b"q" * 64)
        assert c.recv(64) == b"q" * 64
        for x in (c, s):
            assert x._shm.segment.hot == _connection.HOT
            assert not x._shm.tx.large and not x._shm.rx.large
        c.close()
        s.close()
    finally:
        lst.close()


# --- idle connections give their pages back ------------------------------------

def test_trim_gives_the_pages_of_an_empty_large_area_back(areas):
    p = areas(big=256 * 1024)
    blocks = lambda: os.fstat(p.seg.fileno()).st_blocks * 512     # noqa: E731
    first = blocks()
    assert p.w.trim() is False                      # nothing to give back
    p.w.write_all(pattern(0, 200_000), 10)
    assert p.r.read(100_000) == pattern(0, 100_000)
    assert p.w.trim() is False and p.w.large        # bytes unread: nothing happens
    assert p.r.read(1 << 20) == pattern(100_000, 100_000)
    assert blocks() >= 200_000
    assert p.w.trim() is True                       # all read: the pages go back
    assert blocks() <= first and not p.w.large
    assert p.w.trim() is False
    p.w.write(b"after")                             # the small area from here on
    assert p.r.read(10) == b"after" and not p.r.large
    p.w.write_all(pattern(1, 100_000), 10)          # and the large one again, refaulted
    assert p.r.read(1 << 20) == pattern(1, 100_000)


def _connected_pair():
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    c = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect(lst.getsockname())
    s, _ = lst.accept()
    lst.close()
    return c, s


def test_a_blocked_read_gives_back_what_its_peer_read():
    """A server thread answers with a large message, then blocks reading
    the next request: once the client read the answer, the server's ring
    gives its large area's pages back (within a sleep slice)."""
    from conftest import wait_for
    c, s = _connected_pair()
    try:
        s.sendall(pattern(0, 200_000))                # fits the ring: returns at once
        assert s._shm.tx.large
        got = threading.Thread(target=lambda: s.recv(10))
        got.start()                                   # blocks: the client says nothing yet
        assert c.recv(200_000, socket.MSG_WAITALL) == pattern(0, 200_000)
        wait_for(lambda: not s._shm.tx.large, what="the idle server's ring trimmed")
        c.sendall(b"next")
        got.join(10)
        assert not got.is_alive()
    finally:
        c.close()
        s.close()


@pytest.fixture(autouse=True, scope="module")
def _uvloop_pipe():
    """uvloop opens a process-wide pipe with its first loop (kept for the
    life of the process): open it before the leak check counts fds."""
    import uvloop

    async def nothing():
        pass
    uvloop.run(nothing())


def test_an_asyncio_transport_gives_back_what_its_peer_read():
    import asyncio
    from shrimpio.transport import new_event_loop

    async def main():
        got = asyncio.get_running_loop().create_future()
        server_conn = []

        async def handle(reader, writer):
            writer.write(pattern(0, 300_000))
            server_conn.append(writer.transport._conn)
            await reader.read(10)
            writer.close()
            got.set_result(None)

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*srv.sockets[0].getsockname())
        assert await reader.readexactly(300_000) == pattern(0, 300_000)
        conn = server_conn[0]
        deadline = asyncio.get_running_loop().time() + 10
        while conn.tx.large:                          # the loop's next look (1 s)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        writer.write(b"bye")
        await got
        writer.close()
        await writer.wait_closed()
        srv.close()
        await srv.wait_closed()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
