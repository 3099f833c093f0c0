"""Fuzz targets for the parsers that read peer input, their seeds, and a
replayer.  Each target takes one input (bytes) and raises
:class:`FuzzFailure` (or dies) on a bug; the errors a peer's garbage may
cause (``OSError``, ``ValueError``: a refusal) are expected.

* ``hello``: a listener's check of a stream hello
  (:func:`shrimpio._accept.accept_hello`: the datagram header, the
  ``HELLO_RE`` fast form and the generic JSON form, the fields, the fds, the
  segment and its ring headers).  The first byte picks the message flags
  and the fds that come with it; the rest is the datagram.
* ``control``: any control message (:func:`shrimpio._control.datagram_payload`,
  ``decode_payload``, ``expect``, an import reply's fields).
* ``ring``: a ring attached to a segment whose header is the input's first
  256 bytes, then a program of calls (read, write, peek, consume, ...,
  all with ``timeout=0``) and header scribbles from the rest; guard pages
  around the ring must stay untouched.
* ``notes``: a VMMC exporter taking notification records from a ring whose
  header and contents come from the input.

Coverage guidance (atheris) sees the Python code; the Cython ring code is
exercised by the same inputs (guards, sanitiser-free: a wild access is a
crash of the fuzzing process, which atheris reports with its input).

``python -m shrimpio._chaos.fuzz replay DIR...`` runs every file of the
given corpus directories (named after their target) through its target.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Callable

HDR = struct.Struct("!4sHHI")
GUARD = 4096


class FuzzFailure(AssertionError):
    """A target found a bug (not a refusal of bad input)."""


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- hello ------------------------------------------------------------------------------

def target_hello(data: bytes) -> None:
    from shrimpio import _accept
    from shrimpio._fastpath import RingCorruptedError
    from .hello import good_body, good_segment
    if not data:
        return
    sel, data = data[0], data[1:]
    before = _fd_count()
    msg_flags = (socket.MSG_TRUNC if sel & 1 else 0) | (socket.MSG_CTRUNC if sel & 2 else 0)
    keep = []
    fds: list[int] = []
    seg = good_segment(good_body())
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keep += [seg, mine, theirs]
    kinds = (sel >> 2) & 7                           # which fds come with it
    if kinds in (0, 1, 2):
        fds = [os.dup(seg.fileno()), os.dup(theirs.fileno())]
    elif kinds == 3:
        fds = [os.dup(seg.fileno())]
    elif kinds == 4:
        r, w = os.pipe()
        os.close(w)
        fds = [r, os.dup(theirs.fileno())]
    elif kinds == 5:
        fds = [os.dup(theirs.fileno()), os.dup(seg.fileno())]
    elif kinds == 6:
        fds = [os.dup(seg.fileno()), os.dup(theirs.fileno()), os.dup(seg.fileno())]
    space_ok = not (sel & 0x20)
    bell = os.dup(mine.fileno())
    try:
        try:
            conn, client, server = _accept.accept_hello(bell, data, msg_flags, fds, space_ok)
        except (OSError, ValueError, RingCorruptedError):
            pass                                      # refused: fine
        except Exception as exc:
            raise FuzzFailure(f"accept_hello raised {type(exc).__name__}: {exc}") from exc
        else:
            if not (isinstance(client, tuple) and isinstance(server, tuple)):
                raise FuzzFailure(f"accepted with addresses {client!r}, {server!r}")
            conn.close()
            from shrimpio import _connection
            _connection.reap()
    finally:
        os.close(bell)                  # the caller's fd: the connection does not own it
        for obj in keep:
            obj.close()
    after = _fd_count()
    if after != before:
        raise FuzzFailure(f"fds: {before} before, {after} after")


def seeds_hello() -> list[bytes]:
    import json
    from .hello import datagram, good_body
    body = good_body()
    good = json.dumps(body, separators=(",", ":")).encode()
    spaced = json.dumps(body).encode()
    out = [b"\x00" + datagram(good), b"\x00" + datagram(spaced), b"\x0c" + datagram(good),
           b"\x10" + datagram(good), b"\x01" + datagram(good), b"\x00" + datagram(good)[:20],
           b"\x00" + datagram(good.replace(b"4096", b"8192", 1))]
    return out


# -- control messages -----------------------------------------------------------------------

def target_control(data: bytes) -> None:
    from shrimpio import _control
    from shrimpio.vmmc import _field
    if not data:
        return
    sel, data = data[0], data[1:]
    fds = [os.dup(0) for _ in range(sel & 7 if sel & 7 <= 5 else 0)]
    before = _fd_count() - len(fds)
    msg_flags = (socket.MSG_TRUNC if sel & 8 else 0) | (socket.MSG_CTRUNC if sel & 16 else 0)
    try:
        try:
            payload = _control.datagram_payload(data, msg_flags, fds)
            msg = _control.decode_payload(payload, fds)
            try:
                ok = _control.expect(msg, "ok")
                for key, kind in (("size", int), ("readable", bool), ("notify_capacity", int)):
                    _field(ok.body, key, kind)
            except OSError:
                pass
            if not isinstance(msg.kind, str) or not isinstance(msg.body, dict):
                raise FuzzFailure(f"message {msg!r}")
        except FuzzFailure:
            raise
        except (OSError, ValueError):
            pass
        except Exception as exc:
            raise FuzzFailure(f"control parsing raised {type(exc).__name__}: {exc}") from exc
    finally:
        _control._close_fds(fds)
    if _fd_count() != before:
        raise FuzzFailure("fds leaked")


def seeds_control() -> list[bytes]:
    from .hello import datagram
    msgs = [b'{"kind":"ok","size":4096,"readable":true,"notify_capacity":4096}',
            b'{"kind":"error","errno":2,"message":"no such buffer"}',
            b'{"kind":"import","buffer":"buf","pid":1}', b'{"kind":"ok"}', b"[]", b"{}"]
    return [bytes([2]) + datagram(m) for m in msgs] + [b"\x00SHRM\x00\x01\x00\x00\x00\x00\x00\x00"]


# -- ring headers -------------------------------------------------------------------------

_FIELDS = [(0, "<I"), (4, "<I"), (8, "<Q"), (64, "<Q"), (72, "<I"), (128, "<Q"), (192, "<I"),
           (196, "<I"), (200, "<I")]


def target_ring(data: bytes) -> None:
    from shrimpio._fastpath import Ring, RingCorruptedError, Segment
    if len(data) < 258:
        return
    cap = 64 << (data[0] % 4)                          # 64 .. 512
    announce = data[1] % 3                              # the capacity: as in the header, given, wrong
    header, prog = data[2:258], data[258:]
    seg = Segment(GUARD + Ring.footprint(cap) + GUARD)
    mv = memoryview(seg)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    rings = []
    try:
        mv[:GUARD] = b"\xa5" * GUARD
        mv[GUARD + Ring.footprint(cap):] = b"\x5a" * GUARD
        try:
            w = Ring(seg, GUARD, cap, create=True, data_bell=a.fileno(), space_bell=a.fileno(),
                     busy_poll_us=0)
            rings.append(w)
            mv[GUARD:GUARD + 256] = header
            r = Ring(seg, GUARD, None if announce == 0 else cap if announce == 1 else cap * 2,
                     data_bell=b.fileno(), space_bell=b.fileno(), busy_poll_us=0)
            rings.append(r)
        except (RingCorruptedError, ValueError):
            return
        _run_program(prog, w, r, mv, cap)
    finally:
        for ring in rings:
            ring.close()
        a.close()
        b.close()
        if mv[:GUARD] != b"\xa5" * GUARD or mv[GUARD + Ring.footprint(cap):] != b"\x5a" * GUARD:
            raise FuzzFailure("a ring call wrote outside the ring")
        mv.release()
        seg.close()


def _run_program(prog: bytes, w, r, mv, cap: int) -> None:
    from shrimpio._fastpath import RingCorruptedError
    i = 0
    while i + 1 < len(prog):
        op, arg = prog[i], prog[i + 1]
        i += 2
        try:
            k = op % 12
            if k == 0:
                w.write(bytes([arg]) * (arg % (2 * cap) + 1), timeout=0)
            elif k == 1:
                got = r.read(arg % (2 * cap) + 1, timeout=0)
                # (The reader's capacity: attached by the header, it may be
                # what the peer wrote there, within the segment.)
                if len(got) > r.capacity:
                    raise FuzzFailure(f"read {len(got)} bytes from a {r.capacity}-byte ring")
            elif k == 2:
                v = r.peek()
                n = len(v)
                v.tobytes()
                v.release()
                r.consume(min(n, arg))
            elif k == 3:
                w.writev([b"a" * (arg % cap), b"b" * (arg % 7)], timeout=0)
            elif k == 4:
                if not 0 <= w.free() <= w.capacity or not 0 <= r.readable() <= r.capacity:
                    raise FuzzFailure("free/readable outside the capacity")
            elif k == 5:
                r.at_eof()
                w.wait_writable(1, 0)
                r.wait_readable(0)
            elif k == 6:
                buf = bytearray(arg + 1)
                r.read_into(buf, timeout=0)
            elif k == 7:
                w.write_all(b"c" * (arg % cap + 1), timeout=0)
            elif k == 8 and i + 8 <= len(prog):        # a peer's scribble
                off, fmt = _FIELDS[arg % len(_FIELDS)]
                size = struct.calcsize(fmt)
                mv[GUARD + off:GUARD + off + size] = prog[i:i + size]
                i += size
            elif k == 9:
                w.shutdown_write()
            elif k == 10:
                r.close_read()
            else:
                from shrimpio._fastpath import Ring
                Ring(mv.obj, GUARD).close()               # another attach, header as it is
        except FuzzFailure:
            raise
        except (RingCorruptedError, OSError, ValueError):
            pass
        except Exception as exc:
            raise FuzzFailure(f"ring call {op % 12} raised {type(exc).__name__}: {exc}") from exc


def seeds_ring() -> list[bytes]:
    from shrimpio._fastpath import Ring, Segment
    out = []
    for cap_sel, prog in [(0, b"\x00\x10\x01\x20\x02\x05\x04\x00"), (2, b"\x03\x40\x06\x30\x07\x10"),
                          (1, b"\x08\x03" + struct.pack("<Q", 10 ** 6) + b"\x01\x01"),
                          (3, b"\x09\x00\x01\x50\x05\x00\x0a\x00\x00\x01")]:
        cap = 64 << cap_sel
        seg = Segment(Ring.footprint(cap))
        Ring(seg, 0, cap, create=True).close()
        header = bytes(memoryview(seg)[:256])
        seg.close()
        out.append(bytes([cap_sel, 1]) + header + prog)
    return out


# -- VMMC notification records ---------------------------------------------------------------

def target_notes(data: bytes) -> None:
    from shrimpio._fastpath import Export, Ring, Segment
    if len(data) < 256:
        return
    cap = 4096
    nseg = Segment(Ring.footprint(cap))
    buf = Segment(4096)
    exp = Export(buf)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ring = Ring(nseg, 0, cap, create=True, data_bell=a.fileno(), space_bell=a.fileno(),
                busy_poll_us=0)
    released = []

    def release() -> None:
        released.append(1)
        a.close()

    exp._add_link(ring, release)
    try:
        with memoryview(nseg) as mv:
            mv[:256] = data[:256]                        # the header, as the importer left it
            body = data[256:256 + cap]
            mv[256:256 + len(body)] = body
        b.send(b"\x01")
        for _ in range(300):
            got = exp.wait(0)
            if got is None:
                break
            off, n = got
            if not (0 <= off and 0 <= n and off + n <= 4096):
                raise FuzzFailure(f"notification {got} outside the buffer")
    finally:
        exp.close()
        if not released:
            ring.close()
            release()
        nseg.close()
        buf.close()
        b.close()


def seeds_notes() -> list[bytes]:
    from shrimpio._fastpath import Ring, Segment
    seg = Segment(Ring.footprint(4096))
    Ring(seg, 0, 4096, create=True).close()
    header = bytearray(memoryview(seg)[:256])
    seg.close()
    out = []
    for head, recs in [(16, [(0, 5)]), (32, [(0, 4096), (4095, 1)]), (8, [(0, 1)]),
                       (16, [(4096, 1)])]:
        h = bytearray(header)
        struct.pack_into("<Q", h, 64, head)
        out.append(bytes(h) + b"".join(struct.pack("<QQ", o, n) for o, n in recs))
    return out


TARGETS: dict[str, Callable[[bytes], None]] = {
    "hello": target_hello, "control": target_control, "ring": target_ring, "notes": target_notes}
SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "hello": seeds_hello, "control": seeds_control, "ring": seeds_ring, "notes": seeds_notes}


def replay(dirs: list[str]) -> int:
    """Run every file of each corpus directory (named after its target)
    through the target; print failures; the number of failures."""
    failures = 0
    runs = 0
    for d in dirs:
        target = TARGETS[os.path.basename(os.path.normpath(d))]
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            runs += 1
            try:
                target(data)
            except Exception as exc:
                failures += 1
                print(f"{d}/{name}: {type(exc).__name__}: {exc}")
    print(f"replayed {runs} inputs, {failures} failures")
    return failures


def write_seeds(root: str) -> None:
    """Write the built-in seeds into ``root/<target>/seed-N``."""
    for name, fn in SEEDS.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for k, data in enumerate(fn()):
            with open(os.path.join(d, f"seed-{k}"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["replay"]:
        sys.exit(1 if replay(sys.argv[2:]) else 0)
    if sys.argv[1:2] == ["seeds"]:
        write_seeds(sys.argv[2])
        sys.exit(0)
    print("usage: python -m shrimpio._chaos.fuzz replay DIR... | seeds ROOT", file=sys.stderr)
    sys.exit(2)
