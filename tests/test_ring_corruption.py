"""Data plane, part 3: a hostile peer.  It writes garbage into every field of
a ring header (through a memoryview of the shared segment, as another process
could); the victim raises ``RingCorruptedError`` (a ``ConnectionError``),
marks the ring broken, and never reads or writes outside the ring.

Header offsets (``_fastpath_core.h``) are in fastpath_helpers.FIELDS.
"""

import errno
import subprocess
import sys
import threading

import pytest

from children import child_env
from conftest import wait_for
from fastpath_helpers import RING_MAGIC, RING_VERSION, pair, pattern  # noqa: F401
from shrimpio._fastpath import Ring, RingCorruptedError


def assert_broken(ring, calls):
    assert ring.broken
    for call in calls:
        with pytest.raises(RingCorruptedError, match="broken"):
            call()


def reader_calls(r):
    return [lambda: r.read(1), lambda: r.peek(), lambda: r.readable(), lambda: r.consume(0),
            lambda: r.read_into(bytearray(4)), lambda: r.wait_readable(0), lambda: r.at_eof()]


def writer_calls(w):
    return [lambda: w.write(b"x"), lambda: w.free(), lambda: w.writev([b"y"]),
            lambda: w.write_all(b"z"), lambda: w.shutdown_write(), lambda: w.wait_writable(1, 0)]


def test_corrupted_error_is_a_connection_error():
    assert issubclass(RingCorruptedError, ConnectionError)


@pytest.mark.parametrize("evil", ["beyond_capacity", "far_beyond", "backwards", "below_tail", "max"])
def test_corrupted_head(pair, evil):
    p = pair(256)
    p.w.write(pattern(0, 100))
    assert p.r.read(10) == pattern(0, 10)       # tail 10, seen head 100
    head = {"beyond_capacity": 10 + 256 + 1, "far_beyond": 2 ** 40, "backwards": 50,
            "below_tail": 5, "max": 2 ** 64 - 1}[evil]
    p.hdr.set("head", head)
    with pytest.raises(RingCorruptedError, match="producer index %d" % head):
        p.r.read(1000)
    assert_broken(p.r, reader_calls(p.r))
    assert p.hdr.get("tail") == 10             # nothing consumed past what was valid


@pytest.mark.parametrize("evil", ["beyond_head", "backwards", "too_far_behind", "max"])
def test_corrupted_tail(pair, evil):
    p = pair(256)
    p.w.write(pattern(0, 200))
    p.r.read(150)
    assert p.w.free() == 206                    # the producer has seen tail 150
    tail = {"beyond_head": 201, "backwards": 100, "too_far_behind": 200 - 257,
            "max": 2 ** 64 - 1}[evil] % 2 ** 64
    p.hdr.set("tail", tail)
    with pytest.raises(RingCorruptedError, match="consumer index %d" % tail):
        p.w.free()
    assert_broken(p.w, writer_calls(p.w))
    assert p.hdr.get("head") == 200            # nothing published past what was valid


def test_corrupted_tail_caught_by_a_write_needing_room(pair):
    p = pair(64)
    p.w.write(b"x" * 64)                        # full: the next write must re-read tail
    p.hdr.set("tail", 2 ** 63)
    with pytest.raises(RingCorruptedError):
        p.w.write(b"y")
    assert p.w.broken


@pytest.mark.parametrize("field,value", [
    ("magic", 0), ("magic", RING_MAGIC ^ 1), ("version", 0), ("version", RING_VERSION + 1),
    ("capacity", 0), ("capacity", 100), ("capacity", 32), ("capacity", 2 ** 63),
    ("capacity", 512),                          # a power of two, but not what fits
    ("capacity", 2 ** 64 - 1),
])
def test_corrupted_header_refused_on_attach(pair, field, value):
    p = pair(256)
    p.hdr.set(field, value)
    with pytest.raises(RingCorruptedError):
        Ring(p.seg, 0)                          # capacity from the header
    with pytest.raises(RingCorruptedError):
        Ring(p.seg, 0, 256)                     # capacity announced elsewhere


@pytest.mark.parametrize("head,tail", [(300, 0), (0, 1), (2 ** 64 - 1, 0), (1000, 1000 + 2 ** 63)])
def test_inconsistent_indices_refused_on_attach(pair, head, tail):
    p = pair(256)
    p.hdr.set("head", head)
    p.hdr.set("tail", tail)
    with pytest.raises(RingCorruptedError, match="inconsistent"):
        Ring(p.seg, 0, 256)


def test_header_changes_after_attach_are_ignored(pair):
    """Magic, version and capacity are read once, at attach: a peer changing
    them later cannot make us index outside the ring."""
    p = pair(64)
    p.hdr.set("capacity", 2 ** 40)
    p.hdr.set("magic", 0)
    p.hdr.set("version", 99)
    for i in range(10):
        p.w.write_all(pattern(i * 50, 50), timeout=0)
        assert p.w.free() == 14
        assert p.r.read(64) == pattern(i * 50, 50)


def test_garbage_flags_are_read_as_set(pair):
    """Flags are booleans: any non-zero value is 'set'. Garbage never breaks
    the ring or reaches outside it."""
    p = pair(64)
    # A peer claiming the reader sleeps: the producer rings once and clears it.
    p.hdr.set("reader_sleeping", 0xDEADBEEF)
    p.w.write(b"a")
    assert p.hdr.get("reader_sleeping") == 0
    assert p.rsock.recv(10) == b"\x01"
    p.w.write(b"b")                             # flag clear: no system call, no ring
    p.rsock.setblocking(False)
    with pytest.raises(BlockingIOError):
        p.rsock.recv(10)
    p.hdr.set("writer_sleeping", 0xFFFFFFFF)
    assert p.r.read(10) == b"ab"
    assert p.hdr.get("writer_sleeping") == 0
    assert p.wsock.recv(10) == b"\x01"
    # Garbage shut flags: the producer's own state decides for itself, the
    # consumer sees end of stream (after any data).
    p.w.write(b"tail")
    p.hdr.set("write_shut", 0x80000000)
    assert p.r.read(10) == b"tail" and p.r.read(10) == b"" and p.r.at_eof()
    assert not p.w.write_shut
    p.hdr.set("read_shut", 7)
    with pytest.raises(BrokenPipeError):
        p.w.write(b"x")
    assert not p.r.broken and not p.w.broken


def test_blocked_reader_sees_corruption(pair):
    p = pair(64, busy_poll_us=0)
    errors = []

    def blocked():
        try:
            p.r.read(10, timeout=10)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    wait_for(lambda: p.hdr.get("reader_sleeping") == 1, what="reader asleep")
    p.hdr.set("head", 2 ** 63)
    p.wsock.send(b"\x01")                       # and ring, as a peer would
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RingCorruptedError)
    assert p.r.broken


def test_blocked_writer_sees_corruption(pair):
    p = pair(64, busy_poll_us=0)
    p.w.write(b"x" * 64)
    errors = []

    def blocked():
        try:
            p.w.write_all(b"y" * 10, timeout=10)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    wait_for(lambda: p.hdr.get("writer_sleeping") == 1, what="writer asleep")
    p.hdr.set("tail", 2 ** 64 - 5)
    p.rsock.send(b"\x01")
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RingCorruptedError)
    assert p.w.broken


# A victim in a child process: if validation had a hole, the worst case is a
# wild read or write, which would kill pytest itself; here it kills the child.
HOSTILE = r"""
import random, socket, struct, sys
from shrimpio._fastpath import Ring, RingCorruptedError, Segment

CAP, GUARD = 256, 4096
FIELDS = {"magic": (0, "<I"), "version": (4, "<I"), "capacity": (8, "<Q"), "head": (64, "<Q"),
          "write_shut": (72, "<I"), "tail": (128, "<Q"), "reader_sleeping": (192, "<I"),
          "writer_sleeping": (196, "<I"), "read_shut": (200, "<I")}
rng = random.Random(int(sys.argv[1]))
seg = Segment(GUARD + 256 + CAP + GUARD)
mv = memoryview(seg)
a, b = socket.socketpair()
a.setblocking(False); b.setblocking(False)
caught = ok = 0
for it in range(int(sys.argv[2])):
    mv[:GUARD] = b"\xa5" * GUARD
    mv[GUARD + 256 + CAP:] = b"\x5a" * GUARD
    w = Ring(seg, GUARD, CAP, create=True, data_bell=a.fileno(), space_bell=a.fileno(), busy_poll_us=0)
    r = Ring(seg, GUARD, CAP, data_bell=b.fileno(), space_bell=b.fileno(), busy_poll_us=0)
    w.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, CAP))))
    r.read(rng.randrange(CAP))
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(list(FIELDS))
        off, fmt = FIELDS[name]
        size = struct.calcsize(fmt) * 8
        val = rng.choice([0, 1, CAP - 1, CAP, CAP + 1, 2 ** (size - 1), 2 ** size - 1,
                          rng.randrange(2 ** size)])
        if name in ("head", "tail") and rng.random() < 0.5:   # near the real values
            cur = struct.unpack_from(fmt, mv, GUARD + off)[0]
            val = (cur + rng.randint(-2 * CAP, 2 * CAP)) % 2 ** 64
        struct.pack_into(fmt, mv, GUARD + off, val)
    try:
        for _ in range(20):
            op = rng.randrange(9)
            if op == 0: w.write(b"w" * rng.randrange(1, 2 * CAP), timeout=0)
            elif op == 1: r.read(rng.randrange(1, 2 * CAP), timeout=0)
            elif op == 2:
                v = r.peek(); v.tobytes(); v.release()
            elif op == 3: r.consume(min(r.readable(), rng.randrange(CAP)))
            elif op == 4: w.writev([b"a" * rng.randrange(CAP), b"b" * 7], timeout=0)
            elif op == 5: w.free(); r.readable()
            elif op == 6: r.read(CAP, timeout=0.001)
            elif op == 7: w.write_all(b"c" * rng.randrange(1, CAP), timeout=0.001)
            else: Ring(seg, GUARD).close()
        ok += 1
    except RingCorruptedError:
        caught += 1
    except (BlockingIOError, TimeoutError, BrokenPipeError, ValueError):
        ok += 1
    w.close(); r.close()
    for s in (a, b):
        try: s.recv(4096)
        except BlockingIOError: pass
    assert mv[:GUARD] == b"\xa5" * GUARD, "wrote before the ring"
    assert mv[GUARD + 256 + CAP:] == b"\x5a" * GUARD, "wrote after the ring"
mv.release(); seg.close(); a.close(); b.close()
print(caught, ok)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_header_fuzz_in_child(seed):
    res = subprocess.run([sys.executable, "-c", HOSTILE, str(seed), "3000"], env=child_env(),
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, f"victim died ({res.returncode}): {res.stderr[-2000:]}"
    caught, ok = map(int, res.stdout.split())
    assert caught > 500 and caught + ok == 3000


# The same victim, now with a hostile *process* scribbling over the header
# (and ringing the doorbell) all the time, concurrently with every operation,
# blocking waits included.
HAMMER = r"""
import mmap, os, random, socket, struct, sys, time
from shrimpio._fastpath import Ring, RingCorruptedError, Segment

CAP, GUARD = 256, 4096
seg = Segment(GUARD + 256 + CAP + GUARD)
mv = memoryview(seg)
mv[:GUARD] = b"\xa5" * GUARD
mv[GUARD + 256 + CAP:] = b"\x5a" * GUARD
stop = mmap.mmap(-1, 1)          # shared with the child: 1 = stop scribbling
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    rng = random.Random(7)
    fields = [(64, "<Q"), (128, "<Q"), (72, "<I"), (192, "<I"), (196, "<I"), (200, "<I"),
              (8, "<Q"), (0, "<I"), (4, "<I")]
    while stop[0] == 0:
        off, fmt = rng.choice(fields)
        bits = struct.calcsize(fmt) * 8
        val = rng.randrange(2 ** bits) if rng.random() < 0.5 else rng.randrange(4 * CAP)
        struct.pack_into(fmt, mv, GUARD + off, val)
        try:
            a.send(b"\1", socket.MSG_DONTWAIT)
        except OSError:
            pass
    os._exit(0)
rng = random.Random(8)
caught = rounds = 0
# At least argv[1] seconds of scribbling, then until the victim has met the
# scribbles (a corruption caught) in enough rounds: on a loaded host the
# child may get little CPU in a fixed time.  argv[2]: the deadline.
least, deadline = time.monotonic() + float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and not (
        time.monotonic() >= least and caught >= 1 and rounds > 50):
    rounds += 1
    try:
        w = Ring(seg, GUARD, CAP, create=True, data_bell=a.fileno(), space_bell=a.fileno(),
                 busy_poll_us=rng.choice([0, 5]))
        r = Ring(seg, GUARD, CAP, data_bell=b.fileno(), space_bell=b.fileno(), busy_poll_us=0)
    except RingCorruptedError:
        caught += 1
        continue
    try:
        for _ in range(50):
            w.write(b"w" * rng.randrange(1, 2 * CAP), timeout=rng.choice([0, 0.001]))
            r.read(rng.randrange(1, 2 * CAP), timeout=rng.choice([0, 0.001]))
            v = r.peek()
            v.tobytes()
            n = len(v)
            v.release()
            r.consume(n)
            w.writev([b"a" * rng.randrange(CAP), b"b"], timeout=0)
    except RingCorruptedError:
        caught += 1
    except (BlockingIOError, TimeoutError, BrokenPipeError, ConnectionResetError, ValueError):
        pass
    w.close()
    r.close()
    assert mv[:GUARD] == b"\xa5" * GUARD, "wrote before the ring"
    assert mv[GUARD + 256 + CAP:] == b"\x5a" * GUARD, "wrote after the ring"
stop[0] = 1
os.waitpid(pid, 0)
mv.release(); seg.close(); a.close(); b.close()
print(caught, rounds)
"""


@pytest.mark.timeout(60)
def test_concurrent_hostile_process():
    res = subprocess.run([sys.executable, "-c", HAMMER, "1.5", "40"], env=child_env(),
                         capture_output=True, text=True, timeout=55)
    assert res.returncode == 0, f"victim died ({res.returncode}): {res.stderr[-2000:]}"
    caught, rounds = map(int, res.stdout.split())
    assert rounds > 50 and caught >= 1   # (few on one CPU, where the two take turns)


# --------------------------------------------------------------------------- pollers
#
# One connection whose peer (a real process) scribbles over a ring header,
# beside a healthy one in the same poller: the poller never raises, reports
# the broken one ready as asked, and its own calls raise; the healthy one
# goes on as before.

import os  # noqa: E402
import select  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402

import shrimpio.patch  # noqa: E402
import shrimpio.socket as ss  # noqa: E402
from shrimpio._connection import Connection  # noqa: E402
from shrimpio._fdhooks import _real_write  # noqa: E402

shrimpio.patch.disable()

_HEAD, _TAIL = 64, 128


def _scribbler(addr, cmd_r, done_w):
    """Child: connect, then on each command scribble over a header field of
    our segment (the rings both sides use) and say so."""
    sock = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(addr)
    conn = sock._shm
    off2 = Connection.layout(conn.tx.capacity, conn.rx.capacity)[0]
    mv = memoryview(conn.segment)
    os.write(done_w, b"c")
    while True:
        cmd = os.read(cmd_r, 1)
        if not cmd:
            return
        if cmd == b"h":          # our producer index (the victim reads it)
            struct.pack_into("<Q", mv, _HEAD, 2 ** 40)
        elif cmd == b"t":        # our consumer index (the victim writes by it)
            struct.pack_into("<Q", mv, off2 + _TAIL, 2 ** 63)
        # ...and ring both doorbells, as a peer does after it moves an index.
        # (A peer that scribbles and stays silent is a silent peer: an epoll
        # sees it when it next rings or dies; select and poll look at every
        # ring on each call and see it at once.)
        # (The kernel's write: the patched os.write of a connection's fd
        # sends into the ring, which would rewrite the scribbled index.)
        _real_write(conn.bell_fd, b"\1")
        conn.space.send(b"\1")
        os.write(done_w, cmd)


class Scribbler:
    def __init__(self, lst):
        addr = lst.getsockname()
        cmd_r, self.cmd_w = os.pipe()
        self.done_r, done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                                   # pragma: no cover - child
            code = 1
            try:
                os.close(self.cmd_w)
                os.close(self.done_r)
                lst.close()                     # (the parent's: its entry goes with it)
                _scribbler(addr, cmd_r, done_w)
                code = 0
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(done_w)
        self._expect(b"c")

    def _expect(self, what):
        assert select.select([self.done_r], [], [], 10)[0], "scribbler silent"
        assert os.read(self.done_r, 1) == what

    def scribble(self, field):
        os.write(self.cmd_w, field)
        self._expect(field)

    def close(self):
        os.close(self.cmd_w)
        os.close(self.done_r)
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


class _Api:
    """One readiness API over {sock: (read, write)} interests (the patched
    module objects, looked up while the patch is on)."""

    def __init__(self, name, interests):
        self.name, self.interests = name, interests
        self.obj = None
        if name == "poll":
            self.obj = select.poll()
        elif name == "epoll":
            self.obj = select.epoll()
        elif name != "select":
            self.obj = getattr(selectors, name)()
        for s, (r, w) in interests.items():
            if name == "poll":
                self.obj.register(s, (select.POLLIN if r else 0) | (select.POLLOUT if w else 0))
            elif name == "epoll":
                self.obj.register(s, (select.EPOLLIN if r else 0) | (select.EPOLLOUT if w else 0))
            elif name != "select":
                self.obj.register(s, (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0))

    def ready(self, timeout):
        by_fd = {s.fileno(): s for s in self.interests}
        out = {}
        if self.name == "select":
            rl = [s for s, (r, _) in self.interests.items() if r]
            wl = [s for s, (_, w) in self.interests.items() if w]
            r, w, _ = select.select(rl, wl, [], timeout)
            for s in set(r) | set(w):
                out[s] = (s in r, s in w)
        elif self.name in ("poll", "epoll"):
            ev = self.obj.poll(timeout * 1000 if self.name == "poll" else timeout)
            rb, wb = ((select.POLLIN, select.POLLOUT) if self.name == "poll"
                      else (select.EPOLLIN, select.EPOLLOUT))
            for fd, e in ev:
                out[by_fd[fd]] = (bool(e & rb), bool(e & wb))
        else:
            for key, e in self.obj.select(timeout):
                out[key.fileobj] = (bool(e & selectors.EVENT_READ), bool(e & selectors.EVENT_WRITE))
        return out

    def close(self):
        if self.obj is not None and hasattr(self.obj, "close"):
            self.obj.close()


@pytest.fixture
def patched():
    shrimpio.patch.enable()
    try:
        yield
    finally:
        shrimpio.patch.disable()


@pytest.mark.parametrize("field", [b"h", b"t"], ids=["producer_index", "consumer_index"])
@pytest.mark.parametrize("api", ["select", "poll", "epoll", "DefaultSelector", "PollSelector",
                                 "SelectSelector"])
def test_a_corrupted_connection_is_ready_and_harms_no_other(patched, api, field):
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst.settimeout(10)
    evil = Scribbler(lst)
    victim, _ = lst.accept()
    good_cli = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    good_cli.connect(lst.getsockname())
    good, _ = lst.accept()
    api_obj = None
    try:
        assert ss.info(victim)["path"] == ss.info(good)["path"] == "shm"
        if field == b"t":
            # The victim's ring to the peer full, so its writes must read the
            # peer's (scribbled) consumer index.
            victim.setblocking(False)
            with pytest.raises(BlockingIOError):
                while True:
                    victim.send(b"f" * 65536)
        want = (True, field == b"t")
        api_obj = _Api(api, {victim: want, good: (True, False)})
        assert api_obj.ready(0) == {}
        evil.scribble(field)
        for _ in range(3):                       # level-triggered, and no exception
            got = api_obj.ready(5)
            assert got == {victim: want}, got
        with pytest.raises(RingCorruptedError) as e:
            if field == b"h":
                victim.recv(10)
            else:
                victim.send(b"x")
        assert isinstance(e.value, ConnectionResetError) and e.value.errno == errno.ECONNRESET
        assert api_obj.ready(0) == {victim: want}
        good_cli.sendall(b"still fine")
        assert api_obj.ready(5) == {victim: want, good: (True, False)}
        assert good.recv(100) == b"still fine"
    finally:
        if api_obj is not None:
            api_obj.close()
        for s in (victim, good, good_cli, lst):
            s.close()
        evil.close()
