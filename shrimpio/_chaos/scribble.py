"""A hostile peer's scribbling: a thread that writes random values into
the ring headers of this process's shared-memory connections (both rings:
the segment is mapped on both sides, so this is exactly what a hostile
process can do to its peer) and rings the peer's doorbell now and then.

Header layout (``_fastpath_core.h``, 256 bytes a ring): magic u32 @0,
version u32 @4, capacity u64 @8; head u64 @64, write_shut u32 @72; tail
u64 @128; reader_sleeping u32 @192, writer_sleeping u32 @196, read_shut u32
@200.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from typing import Any

FIELDS = [(0, "<I"), (4, "<I"), (8, "<Q"), (64, "<Q"), (72, "<I"), (128, "<Q"),
          (192, "<I"), (196, "<I"), (200, "<I")]
#: Fields a hostile peer most often touches (the indices and the flags).
HOT = [(64, "<Q"), (128, "<Q"), (72, "<I"), (192, "<I"), (196, "<I"), (200, "<I")]


def ring_offsets(conn: Any) -> list[tuple[int, int]]:
    """(offset, capacity) of a connection's two rings in its segment."""
    from shrimpio._connection import Connection
    c2s = conn.tx.capacity if conn.client else conn.rx.capacity
    s2c = conn.rx.capacity if conn.client else conn.tx.capacity
    return [(0, c2s), (Connection.layout(c2s, s2c)[0], s2c)]


def scribble_once(rng: random.Random, mv: memoryview, rings: list[tuple[int, int]]) -> None:
    base, cap = rng.choice(rings)
    off, fmt = rng.choice(HOT if rng.random() < 0.8 else FIELDS)
    bits = struct.calcsize(fmt) * 8
    r = rng.random()
    if r < 0.4 and off in (64, 128):          # near the real value: passes some checks
        cur = struct.unpack_from(fmt, mv, base + off)[0]
        val = (cur + rng.randint(-2 * cap, 2 * cap)) % (1 << bits)
    elif r < 0.6:
        val = rng.choice([0, 1, cap - 1, cap, cap + 1, 1 << (bits - 1), (1 << bits) - 1])
    else:
        val = rng.randrange(1 << bits)
    struct.pack_into(fmt, mv, base + off, val)


class Scribbler:
    """Scribbles over the rings of the sockets given to :meth:`start` until
    :meth:`stop`.  ``args``: ``seed``; ``scribble_rate`` (writes a second,
    roughly)."""

    def __init__(self, args: dict) -> None:
        self.rng = random.Random(f"{args['seed']}:scribble:{os.getpid()}")
        self.rate = float(args.get("scribble_rate", 200))
        self.targets: dict[int, tuple] = {}        # id(sock) -> (mv, rings, fd)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos-scribbler")
        self.thread.start()

    def start(self, sock: socket.socket) -> None:
        conn = getattr(sock, "_shm", None)
        if conn is None or id(sock) in self.targets:
            return
        with self.lock:
            self.targets[id(sock)] = (memoryview(conn.segment), ring_offsets(conn), conn.bell_fd)

    def forget(self, sock: socket.socket) -> None:
        """Before ``sock`` closes (its doorbell fd number may be reused)."""
        with self.lock:
            got = self.targets.pop(id(sock), None)
        if got is not None:
            got[0].release()

    def _run(self) -> None:
        from shrimpio._fdhooks import _real_write
        while not self.done.wait(self.rng.expovariate(self.rate)):
            with self.lock:
                if not self.targets:
                    continue
                mv, rings, bell = self.rng.choice(list(self.targets.values()))
                try:
                    scribble_once(self.rng, mv, rings)
                    if self.rng.random() < 0.3:
                        # The kernel's write (the patched one sends into
                        # the ring, as a program's os.write of the fd does).
                        _real_write(bell, b"\x01")
                except (OSError, ValueError):
                    pass             # that connection is gone

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)
        with self.lock:
            for mv, _, _ in self.targets.values():
                mv.release()
            self.targets.clear()

