"""A hostile client of a listener's registry entry: hellos and fds that are
wrong in random ways (fields, JSON, header, datagram, the fds themselves,
the ring headers in the segment), clients that say nothing, or go away
half-way; and, when a hello passes, a connection whose rings it then
abuses.  It checks nothing of its own: the victim is the listener.

Also the good parts of a hello (:func:`good_hello`), which the fuzz
targets use as seeds.
"""

from __future__ import annotations

import array
import json
import os
import random
import socket
import struct
import time
from typing import Any

from .common import HOSTILE_START, Channel, addr_of, header, make_rng

HDR = struct.Struct("!4sHHI")
#: The client address a hostile hello claims (mutated hellos claim others):
#: the victim checks the bytes of connections from honest clients only
#: (streams.HONEST_HOST; a hostile peer may send what it likes, even zeros;
#: it must only not harm the victim).
HOSTILE_HOST = "127.0.0.66"
CAP = 4096


def good_body(c2s: int = CAP, s2c: int = CAP) -> dict:
    from shrimpio._connection import Connection
    return {"kind": "stream", "v": 1, "c2s": c2s, "s2c": s2c,
            "size": Connection.layout(c2s, s2c)[1],
            "client": [HOSTILE_HOST, 4242], "server": [HOSTILE_HOST, 1]}


def datagram(payload: bytes, *, magic: bytes = b"SHRM", version: int = 1,
             length: "int | None" = None) -> bytes:
    return HDR.pack(magic, version, 0, len(payload) if length is None else length) + payload


def good_segment(body: dict):
    from shrimpio._connection import Connection
    from shrimpio._fastpath import Ring, Segment
    seg = Segment(body["size"])
    Ring(seg, 0, body["c2s"], create=True).close()
    Ring(seg, Connection.layout(body["c2s"], body["s2c"])[0], body["s2c"], create=True).close()
    return seg


# -- mutations ------------------------------------------------------------------------

_ODD = [None, True, False, -1, 0, 1, 4095, 4097, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -(2 ** 63),
        1.5, 4096.0, "4096", "", [], {}, [4096], {"a": 1}, "x" * 300, "\u00e9\u4e2d", "\ud800"]


def mutate_body(rng: random.Random, body: dict) -> dict:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["kind", "v", "c2s", "s2c", "size", "client", "server", "extra", "drop"])
        if key == "drop":
            body.pop(rng.choice(list(body)), None)
        elif key in ("client", "server"):
            body[key] = rng.choice([
                [HOSTILE_HOST, rng.choice(_ODD)], [rng.choice(_ODD), 80], [HOSTILE_HOST], [],
                [HOSTILE_HOST, 80, "x"], HOSTILE_HOST, 80, None, ["a" * 5000, 1],
                ["::1", 65536], [HOSTILE_HOST, -1]])
        elif key in ("c2s", "s2c", "size") and rng.random() < 0.5:
            size = good_body()["size"]
            body[key] = rng.choice([CAP * 2, CAP // 2, 1 << 26, 1 << 27, CAP + 1, size - 4096,
                                    size + 4096, size, CAP])
        else:
            body[key] = rng.choice(_ODD)
    return body


def payload_of(rng: random.Random, body: dict) -> bytes:
    """The body as JSON, often as our clients write it, sometimes not."""
    try:
        text = json.dumps(body, separators=(",", ":") if rng.random() < 0.7 else (", ", ": "),
                          ensure_ascii=rng.random() < 0.5)
    except ValueError:
        text = "{}"
    data = text.encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.15:                                  # bit flips
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        data = bytes(b)
    elif r < 0.22:
        data = data[:rng.randrange(len(data) + 1)]
    elif r < 0.27:
        data = rng.choice([b"[" * 5000 + b"]" * 5000, b'{"kind":"stream","v":1e999}', b"NaN",
                           b'{"kind":"stream","c2s":NaN}', b"\xff\xfe", b"", b"null",
                           b'{"kind":"stream","v":1,"c2s":0' + b"0" * 4000 + b"}",
                           b'{"kind":"stream","kind":"x"}'])
    return data


def make_fd(rng: random.Random, body: dict, keep: list) -> int:
    """An fd of a random kind (closed later through ``keep``)."""
    from shrimpio._fastpath import Segment
    kind = rng.randrange(14)
    if kind == 0:
        seg = good_segment(good_body())
        keep.append(seg)
        return seg.fileno()
    if kind == 1:                                  # unsealed memfd
        fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        size = body.get("size")
        os.ftruncate(fd, size if type(size) is int and 0 < size < 1 << 24 else CAP)
        keep.append(fd)
        return fd
    if kind == 2:                                  # sealed but small
        seg = Segment(4096)
        keep.append(seg)
        return seg.fileno()
    if kind == 3:
        seg = Segment(8192, kind="shm")
        keep.append(seg)
        return seg.fileno()
    if kind == 4:
        r, w = os.pipe()
        keep += [r, w]
        return rng.choice([r, w])
    if kind == 5:
        fd = os.eventfd(0)
        keep.append(fd)
        return fd
    if kind == 6:
        fd = os.open("/dev/null", os.O_RDWR)
        keep.append(fd)
        return fd
    if kind == 7:
        fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
        keep.append(fd)
        return fd
    if kind in (8, 9):                             # a good space doorbell, or its other end
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep += [a, b]
        return b.fileno()
    if kind == 10:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep.append(s)
        return s.fileno()
    if kind == 11:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep += [a, b]
        return a.fileno()
    if kind == 12:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(f"\0chaos-{os.getpid()}-{rng.randrange(1 << 30)}")
        s.listen(1)
        knock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        knock.connect(s.getsockname())
        keep += [s, knock]
        return s.fileno()
    import select
    ep = select.epoll()
    keep.append(ep)
    return ep.fileno()


def scribble_segment(rng: random.Random, seg, body: dict) -> None:
    from shrimpio._connection import Connection
    from .scribble import scribble_once
    rings = [(0, body["c2s"]), (Connection.layout(body["c2s"], body["s2c"])[0], body["s2c"])]
    with memoryview(seg) as mv:
        for _ in range(rng.randint(1, 3)):
            scribble_once(rng, mv, rings)


# -- one hostile client ------------------------------------------------------------------

def one(rng: random.Random, entry: str, deadline: float) -> str:
    """One hostile client; returns what it did."""
    body = seg_body = good_body(*rng.choice([(CAP, CAP), (CAP, 2 * CAP), (1 << 16, CAP)]))
    keep: list = []
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            ctl.connect(entry)
        except OSError:
            return "no entry"
        plan = rng.random()
        if plan < 0.08:                                 # silent, then gone (or not yet)
            time.sleep(rng.choice([0, 0.001, 0.05]))
            return "silent"
        seg = good_segment(seg_body)
        keep.append(seg)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep += [mine, theirs]
        fds = [seg.fileno(), theirs.fileno()]
        what = "good-looking"
        if plan < 0.35:
            body = mutate_body(rng, body)
            what = "fields"
        if rng.random() < 0.3:
            fds = [make_fd(rng, body, keep) if rng.random() < 0.6 else rng.choice(fds)
                   for _ in range(rng.choice([0, 1, 2, 2, 2, 3, 4, 5]))]
            what += "+fds"
        if rng.random() < 0.2:
            scribble_segment(rng, seg, seg_body)
            what += "+rings"
        payload = payload_of(rng, body)
        r = rng.random()
        if r < 0.05:
            data = datagram(payload, magic=b"SHRN")
        elif r < 0.1:
            data = datagram(payload, version=rng.choice([0, 2, 65535]))
        elif r < 0.15:
            data = datagram(payload, length=rng.choice([0, len(payload) + 1, 2 ** 32 - 1]))
        elif r < 0.18:
            data = datagram(payload) + b"x" * rng.choice([1, 5000])
        elif r < 0.2:
            data = datagram(payload)[:rng.randrange(12)]
        else:
            data = datagram(payload)
        fds = fds[:253]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            ctl.sendmsg([data], anc)
            if rng.random() < 0.1:                    # a second datagram
                ctl.send(data)
        except OSError:
            return what + " (send failed)"
        for obj in keep:                              # the listener has its own copies now
            if obj is not seg and obj is not mine:
                _close(obj)
        if rng.random() < 0.5 and what == "good-looking":
            _abuse(rng, ctl, seg, mine, body, deadline)
            what += "+abuse"
        return what
    finally:
        for obj in keep:
            _close(obj)
        ctl.close()


def _abuse(rng: random.Random, ctl, seg, mine, body: dict, deadline: float) -> None:
    """Our hello may have been taken: write a hostile stream header, then
    garbage, scribble, ring, and go."""
    from shrimpio._fastpath import Ring
    try:
        w = Ring(seg, 0, body["c2s"], data_bell=ctl.fileno(), space_bell=mine.fileno(),
                 busy_poll_us=0)
    except (OSError, ValueError):
        return
    try:
        w.write(header(HOSTILE_START, 1 << 40), timeout=0)
        for _ in range(rng.randint(0, 20)):
            if time.monotonic() > deadline:
                break
            w.write(os.urandom(rng.randrange(1, 3 * CAP)), timeout=rng.choice([0, 0.001]))
            if rng.random() < 0.3:
                scribble_segment(rng, seg, body)
            if rng.random() < 0.3:
                ctl.send(b"\x01" * rng.randint(1, 4))
    except (OSError, ValueError, TimeoutError):
        pass
    finally:
        w.close()


def _close(obj: Any) -> None:
    try:
        if isinstance(obj, int):
            os.close(obj)
        else:
            obj.close()
    except (OSError, BufferError):
        pass


def hostile_hellos(args: dict) -> None:
    """Role: send hostile hellos to the listener at ``addr`` until told to finish."""
    from shrimpio import _handshake, _route
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "hello")
    host, port = addr_of(args)
    entry = _handshake.registry()._entry_path(_route.entry_name(socket.AF_INET, host, port))
    counts: dict[str, int] = {}
    ch.report("ready")
    while not ch.finish.is_set():
        what = one(rng, entry, time.monotonic() + 1)
        counts[what] = counts.get(what, 0) + 1
        if rng.random() < 0.2:
            ch.finish.wait(rng.choice([0.001, 0.01]))
    ch.report("finished", stats=counts)

