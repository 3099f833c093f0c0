"""VMMC roles: an exporter, importers (honest, doomed or hostile), and a
fake endpoint that answers import requests with hostile replies.

The exporter exports two buffers: ``honest`` (one honest importer, whose
records it checks exactly) and ``open`` (anyone, hostile included: its
notifications are counted, never trusted).  An honest importer writes
record ``k`` into slot ``k % SLOTS`` of ``honest`` (keyed pattern bytes),
then notifies ``(slot offset, length)``; the notification ring holds 256
records, fewer than SLOTS, so a slot is not rewritten before the
exporter has looked at it.
"""

from __future__ import annotations

import array
import errno
import os
import random
import socket
import struct
import threading
import time
from collections import Counter

from .common import Channel, DataError, Deadline, HangError, Pattern, key_of, make_rng

SLOT = 256
SLOTS = 1024
HONEST_SIZE = SLOT * SLOTS


def _record(pattern: Pattern, k: int, rng: random.Random) -> tuple[int, bytes]:
    n = rng.randint(1, SLOT)
    return (k % SLOTS) * SLOT, pattern.chunk(k * SLOT, n)


# -- exporter ------------------------------------------------------------------------

class _Checker:
    """Checks the honest buffer's notifications in order."""

    def __init__(self, pattern: Pattern, exp) -> None:
        self.pattern, self.exp = pattern, exp
        self.k = 0
        self.errors: list[str] = []

    def __call__(self, off: int, n: int) -> None:
        try:
            want_off = (self.k % SLOTS) * SLOT
            if off != want_off or not 1 <= n <= SLOT:
                raise DataError(f"honest notification {self.k}: ({off}, {n}), slot at {want_off}")
            with memoryview(self.exp) as mv:
                self.pattern.check(self.k * SLOT, mv[off:off + n], f"record {self.k}")
            self.k += 1
        except DataError as exc:
            self.errors.append(str(exc))


def exporter(args: dict) -> None:
    from shrimpio.vmmc import Endpoint
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "exporter")
    stats: Counter = Counter()
    handler = args.get("handler", rng.random() < 0.5)
    ep = Endpoint(args["name"])
    checker = None
    opened = Counter()

    def open_note(off: int, n: int) -> None:
        opened["notes"] += 1

    checker_box: list = []

    def honest_note(off: int, n: int) -> None:
        checker_box[0](off, n)

    honest = ep.export("honest", HONEST_SIZE, notify=honest_note if handler else None,
                       readable=True)
    checker = _Checker(Pattern(key_of(args)), honest)
    checker_box.append(checker)
    opn = ep.export("open", rng.choice([4096, 65536, 1 << 20]),
                    notify=open_note if handler else None, readable=rng.random() < 0.5)
    threads = []
    stop = threading.Event()
    if not handler:
        def drain(buf, fn):
            while not stop.is_set():
                got = buf.wait(0.05)
                if got is not None:
                    fn(*got)
        threads = [threading.Thread(target=drain, args=(honest, checker), name="drain-honest"),
                   threading.Thread(target=drain, args=(opn, open_note), name="drain-open")]
        for t in threads:
            t.start()
    ch.when_idle(lambda: honest.importers + opn.importers == 0)
    ch.report("ready", handler=handler)
    # The harness says how many records the honest importer sent: each
    # must arrive (the last ones may still be queued in its ring).
    expected = int(ch.value("honest", 120))
    ch.finish.wait()
    deadline = Deadline(10)
    while checker.k < expected and not checker.errors and not deadline.expired():
        time.sleep(0.005)           # (the handler or drain thread counts: polled)
    stop.set()
    for t in threads:
        t.join(deadline.left())
        if t.is_alive():
            raise HangError(f"{t.name} did not stop")
    stats.update(honest=checker.k, open=opened["notes"], importers=honest.importers + opn.importers)
    ep.close()
    if checker.errors:
        raise DataError(checker.errors[0])
    ch.report("finished", stats=dict(stats))
    from .streams import _quiesce
    _quiesce(ch, stats)


# -- importers ------------------------------------------------------------------------

def importer(args: dict) -> None:
    """Honest (``honest`` buffer, records checked by the exporter and read
    back with ``fetch``) or hostile (``scribble``: the ``open`` buffer,
    garbage notification records, its notification ring's header
    scribbled).  Runs until told to finish, or ``records`` are sent, or
    the exporter is gone."""
    from shrimpio.vmmc import Endpoint
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "importer")
    stats: Counter = Counter()
    hostile = args.get("scribble", False)
    buffer = args.get("buffer", "honest")
    pattern = Pattern(key_of(args))
    ep = Endpoint(args["name"])
    ch.report("ready")
    imp = None

    def connect():
        deadline = Deadline(10)
        while True:
            try:
                return ep.import_buffer(args["exporter"], buffer)
            except FileNotFoundError:
                if deadline.expired():
                    stats["refused"] += 1
                    return None
                time.sleep(0.01)           # the exporter is starting (a bounded poll)

    try:
        imp = connect()
        k = 0
        limit = args.get("records", 0)
        while imp is not None and not ch.finish.is_set() and not (limit and k >= limit):
            try:
                if hostile:
                    _abuse(rng, imp)
                else:
                    off, data = _record(pattern, k, rng)
                    imp.send(data, off, notify=True)
                    if rng.random() < 0.05:
                        back = imp.fetch(off, len(data))
                        # (the exporter never writes: what we wrote is there)
                        if back != data:
                            raise DataError(f"fetch of record {k} differs")
                k += 1
                stats["sent"] += 1
            except ConnectionResetError as exc:
                if hostile:
                    imp.close()
                    imp = None
                    imp = connect()
                    stats["relinked"] += 1
                    continue
                stats["cut"] += 1
                stats["cut:" + type(exc).__name__] += 1
                break
            except (ValueError, OSError) as exc:
                if not hostile:
                    raise
                stats["own:" + type(exc).__name__] += 1
                if isinstance(exc, ConnectionError):      # dropped: come again
                    imp.close()
                    imp = None
                    imp = connect()
    finally:
        if imp is not None:
            imp.close()
        ep.close()
    ch.report("finished", stats=dict(stats))
    ch.wait("finish")
    from .streams import _quiesce
    _quiesce(ch, stats)


def _abuse(rng: random.Random, imp) -> None:
    """One hostile act of an importer."""
    from .scribble import scribble_once
    act = rng.random()
    ring = imp._notify_ring
    if act < 0.4:
        off = rng.choice([0, imp.size, imp.size - 1, 1 << 63, (1 << 64) - 1, rng.randrange(1 << 64)])
        n = rng.choice([0, 1, imp.size, imp.size + 1, (1 << 64) - 1, rng.randrange(1 << 64)])
        ring.write(struct.pack("<QQ", off, n), timeout=0.01)
    elif act < 0.5:
        ring.write(os.urandom(rng.choice([1, 8, 15, 17])), timeout=0.01)   # a partial record
    elif act < 0.7:
        with memoryview(imp._notify_segment) as mv:
            scribble_once(rng, mv, [(0, ring.capacity)])
    else:
        n = rng.randrange(0, min(imp.size, 4096) + 1)
        imp.send(os.urandom(n), rng.randrange(0, imp.size - n + 1), notify=rng.random() < 0.8)
    if rng.random() < 0.1:
        time.sleep(0.001)


# -- a fake endpoint with hostile import replies ------------------------------------------

def fake_endpoint(args: dict) -> None:
    """Answers every import request with something wrong."""
    from shrimpio._control import Registry, recv_message, send_message
    from shrimpio._fastpath import Ring, Segment
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "fake")
    reg = Registry.open()
    lst = reg.listen(args["name"])
    lst.settimeout(0.05)
    ch.report("ready")
    done = Counter()
    while not ch.finish.is_set():
        try:
            conn, _ = lst.accept()
        except (TimeoutError, BlockingIOError):
            continue
        keep: list = []
        try:
            conn.settimeout(2)
            try:
                recv_message(conn, timeout=2)
            except OSError:
                continue
            what = _hostile_reply(rng, conn, keep, Ring, Segment, send_message)
            done[what] += 1
            if rng.random() < 0.3:
                time.sleep(rng.choice([0.001, 0.05]))
        except OSError:
            done["asker gone"] += 1
        finally:
            for obj in keep:
                try:
                    obj.close() if not isinstance(obj, int) else os.close(obj)
                except (OSError, BufferError):
                    pass
            conn.close()
    reg.remove(args["name"], lst)
    lst.close()
    ch.report("finished", stats=dict(done))


def _hostile_reply(rng, conn, keep, Ring, Segment, send_message) -> str:
    size = rng.choice([4096, 65536])
    cap = 4096
    body = {"size": size, "readable": rng.random() < 0.5, "notify_capacity": cap}
    buf = Segment(size)
    notes = Segment(Ring.footprint(cap))
    Ring(notes, 0, cap, create=True).close()
    keep += [buf, notes]
    fds = [buf.fileno(), notes.fileno()]
    act = rng.randrange(10)
    if act == 0:
        body[rng.choice(list(body))] = rng.choice([None, -1, 0, 2 ** 64, "x", 1.5, True, [], 3])
        what = "fields"
    elif act == 1:
        body["size"] = size * 4                       # more than the segment holds
        what = "size"
    elif act == 2:
        body["notify_capacity"] = rng.choice([32, 4095, 8192, 1 << 21])
        what = "capacity"
    elif act == 3:
        fds = [rng.choice(fds)] * rng.choice([0, 1, 3])
        what = "fd count"
    elif act == 4:
        fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)  # unsealed
        os.ftruncate(fd, size)
        keep.append(fd)
        fds[rng.randrange(2)] = fd
        what = "unsealed"
    elif act == 5:
        r, w = os.pipe()
        keep += [r, w]
        fds[rng.randrange(2)] = r
        what = "pipe"
    elif act == 6:
        with memoryview(notes) as mv:
            from .scribble import scribble_once
            scribble_once(rng, mv, [(0, cap)])
        what = "notify ring"
    elif act == 7:
        send_message(conn, "error", {"errno": rng.choice([0, -1, 2 ** 40, "x", errno.EPERM]),
                                     "message": rng.choice(["", 5, "m"])})
        return "error reply"
    elif act == 8:
        conn.sendmsg([rng.choice([b"", b"SHRM", os.urandom(40), b"SHRM\x00\x01\x00\x00\x00\x00\x00\x05[1,2"])],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        return "garbage"
    else:
        send_message(conn, rng.choice(["ok", "okay", "import"]), body, fds=fds)
        return "kind"
    send_message(conn, "ok", body, fds=fds)
    return what


def hostile_importer_victim(args: dict) -> None:
    """An importer that keeps asking a fake endpoint: each import must fail
    cleanly (an OSError or ValueError), leaving nothing behind."""
    from shrimpio.vmmc import Endpoint
    ch = Channel()
    ch.checkpoint("base")
    stats: Counter = Counter()
    ep = Endpoint(args["name"])
    ch.report("ready")
    n = 0
    while not ch.finish.is_set() and n < args.get("imports", 50):
        n += 1
        try:
            imp = ep.import_buffer(args["exporter"], "x", timeout=2)
        except (OSError, ValueError) as exc:
            stats["refused:" + type(exc).__name__] += 1
            continue
        stats["imported"] += 1          # a reply that happened to be valid
        try:
            imp.send(b"x", 0, notify=True)
            imp.fetch(0, 1) if imp.readable else None
        except (OSError, ValueError) as exc:
            stats["after:" + type(exc).__name__] += 1
        imp.close()
    ep.close()
    ch.report("finished", stats=dict(stats))
    ch.wait("finish")
    from .streams import _quiesce
    _quiesce(ch, stats)


ROLES = {"vmmc_exporter": exporter, "vmmc_importer": importer, "vmmc_fake": fake_endpoint,
         "vmmc_asker": hostile_importer_victim}
