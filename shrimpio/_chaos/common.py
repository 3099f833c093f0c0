"""What every chaos process shares: the keyed byte pattern, the report
channel to the harness, the harness's commands, and the process entry.

A chaos process is ``python -m shrimpio._chaos.proc ROLE JSON``.  It
reports events to the harness as JSON lines on the fd named by
``SHRIMPIO_CHAOS_FD`` and reads commands (one word a line) on stdin.  Its
exit code says how it ended: 0 fine, :data:`EXIT_DATA` a byte that was not
sent arrived, :data:`EXIT_ERROR` an uncaught exception (in any thread, or
an asyncio callback), :data:`EXIT_HANG` a wait of its own ran past its
deadline.  A signal is a crash; the harness tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys
import threading
import time
from typing import Any, Callable

EXIT_OK, EXIT_ERROR, EXIT_DATA, EXIT_HANG = 0, 1, 3, 4

#: Period of the keyed pattern (a prime, so that stream offsets and ring
#: sizes never line up).
PERIOD = 65521
#: Longest chunk a pattern hands out or checks in one slice.
CHUNK = 1 << 18

#: Stream header: magic, start offset in the pattern, length that follows.
HEADER = struct.Struct("<4sIQ")
MAGIC = b"CHAO"


class DataError(AssertionError):
    """Bytes arrived that were never sent (or in the wrong place)."""


class Pattern:
    """A keyed pseudo-random byte stream of period :data:`PERIOD`: byte
    ``i`` of stream ``start`` is ``block[(start + i) % PERIOD]``.  Bytes
    from nowhere (zeros, doorbell bytes, another stream's or stale ring
    contents) fail :meth:`check` with near certainty."""

    def __init__(self, key: bytes) -> None:
        block = hashlib.shake_256(b"shrimpio-chaos" + key).digest(PERIOD)
        reps = 2 + CHUNK // PERIOD
        self._buf = block * reps

    def chunk(self, pos: int, n: int) -> bytes:
        """``n`` (at most CHUNK) bytes from absolute pattern position ``pos``."""
        i = pos % PERIOD
        return self._buf[i:i + n]

    def check(self, pos: int, data: "bytes | memoryview", what: str = "stream") -> None:
        """Raise DataError unless ``data`` is the pattern from ``pos``."""
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            n = min(CHUNK, len(mv) - done)
            if mv[done:done + n] != self.chunk(pos + done, n):
                bad = next(k for k in range(n) if mv[done + k] != self.chunk(pos + done + k, 1)[0])
                raise DataError(f"{what}: byte {pos + done + bad} is {mv[done + bad]:#x}, "
                                f"not {self.chunk(pos + done + bad, 1)[0]:#x}")
            done += n


def header(start: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, start, length)


def parse_header(data: bytes) -> tuple[int, int]:
    magic, start, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise DataError(f"stream header {data!r}")
    return start, length


class Echo:
    """The client's view of one echoed stream: what was sent, what came
    back so far; the echo must be a prefix of what was sent."""

    def __init__(self, pattern: Pattern, start: int, length: int) -> None:
        self.pattern, self.start, self.length = pattern, start, length
        self.head = header(start, length)
        self.sent = 0               # bytes of header + data sent
        self.got = 0                # bytes of header + data echoed
        self.total = HEADER.size + length

    def next_out(self, n: int) -> bytes:
        """The next ``n`` bytes to send (fewer at the end)."""
        n = min(n, self.total - self.sent, CHUNK)
        if self.sent < HEADER.size:
            return self.head[self.sent:self.sent + n]
        return self.pattern.chunk(self.start + self.sent - HEADER.size, n)

    def out_done(self, n: int) -> None:
        self.sent += n

    def echoed(self, data: "bytes | memoryview") -> None:
        n = len(data)
        if self.got + n > self.sent:
            raise DataError(f"echo of {self.got + n} bytes, only {self.sent} sent")
        mv = memoryview(data)
        hn = max(0, min(n, HEADER.size - self.got))
        if hn and bytes(mv[:hn]) != self.head[self.got:self.got + hn]:
            raise DataError("echoed header differs")
        if n > hn:
            self.pattern.check(self.start + self.got + hn - HEADER.size, mv[hn:], "echo")
        self.got += n


#: Start offset in the header of a hostile peer's stream: not checked (a
#: hostile peer may send what it likes; it must only not harm us).
HOSTILE_START = 0xFFFFFFFF


class Inbound:
    """The server's view of one incoming stream: header, then pattern."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.head = b""
        self.start = self.length = None
        self.got = 0                # data bytes after the header
        self.hostile = False

    def received(self, data: "bytes | memoryview") -> None:
        if self.hostile:
            return
        mv = memoryview(data)
        if self.start is None:
            need = HEADER.size - len(self.head)
            self.head += bytes(mv[:need])
            mv = mv[need:]
            if len(self.head) < HEADER.size:
                return
            self.start, self.length = parse_header(self.head)
            if self.start == HOSTILE_START:
                self.hostile = True
                return
        if self.got + len(mv) > self.length:
            raise DataError(f"stream longer than its header says ({self.length})")
        self.pattern.check(self.start + self.got, mv, "inbound")
        self.got += len(mv)

    @property
    def complete(self) -> bool:
        return self.hostile or (self.start is not None and self.got == self.length)


# -- the report channel and commands -----------------------------------------------

class Channel:
    """Events to the harness (JSON lines on SHRIMPIO_CHAOS_FD), commands
    from it (lines on stdin, read by a thread)."""

    def __init__(self) -> None:
        fd = os.environ.get("SHRIMPIO_CHAOS_FD")
        self.fd = int(fd) if fd else None
        self._lock = threading.Lock()
        self._cmds: list[str] = []
        self._cond = threading.Condition()
        self._idle = None                     # see when_idle()
        self.finish = threading.Event()       # set by the command "finish"
        t = threading.Thread(target=self._read, daemon=True, name="chaos-commands")
        t.start()

    def report(self, ev: str, **fields: Any) -> None:
        line = (json.dumps({"ev": ev, **fields}) + "\n").encode()
        if self.fd is None:
            sys.stderr.write(line.decode())
            return
        with self._lock:
            os.write(self.fd, line)

    def _read(self) -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "idle":
                threading.Thread(target=self._report_idle, daemon=True, name="chaos-idle").start()
                continue
            with self._cond:
                self._cmds.append(cmd)
                self._cond.notify_all()
            if cmd == "finish":
                self.finish.set()
        with self._cond:                       # the harness went away
            self._cmds.append("eof")
            self._cond.notify_all()
        self.finish.set()

    def wait(self, cmd: str, timeout: float = 60.0) -> None:
        """Block until the harness sends ``cmd`` (EXIT_HANG after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while cmd not in self._cmds:
                if "eof" in self._cmds:
                    os._exit(EXIT_HANG)
                left = deadline - time.monotonic()
                if left <= 0:
                    os._exit(EXIT_HANG)
                self._cond.wait(left)
            self._cmds.remove(cmd)

    def value(self, name: str, timeout: float = 60.0) -> str:
        """The value of the command ``name VALUE`` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for cmd in self._cmds:
                    if cmd.startswith(name + " "):
                        self._cmds.remove(cmd)
                        return cmd[len(name) + 1:]
                left = deadline - time.monotonic()
                if left <= 0 or "eof" in self._cmds:
                    os._exit(EXIT_HANG)
                self._cond.wait(left)

    def when_idle(self, predicate: "Callable[[], bool]") -> None:
        """Answer the harness's command ``idle`` with the event ``idle``
        once ``predicate()`` holds (all of this process's connections
        ended): a process still not idle after :data:`IDLE_TIMEOUT` hangs
        (EXIT_HANG)."""
        self._idle = predicate

    def _report_idle(self) -> None:
        deadline = Deadline(IDLE_TIMEOUT)
        while not (self._idle is not None and self._idle()):
            if deadline.expired():
                raise HangError(f"not idle {IDLE_TIMEOUT}s after the harness asked")
            time.sleep(0.005)       # (a condition on state other threads own: polled)
        self.report("idle")

    def checkpoint(self, ev: str, **fields: Any) -> None:
        """Report ``ev`` and wait for the harness to say ``go`` (it looks
        at this process meanwhile: fds, mappings, CPU time)."""
        self.report(ev, **fields)
        self.wait("go")


#: Longest a process may take to end its connections once its peers are
#: gone (seconds).
IDLE_TIMEOUT = 20.0


class Deadline:
    """A per-process deadline for its own waits: past it, EXIT_HANG."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def join_all(threads: "list[threading.Thread]", deadline: Deadline, what: str) -> None:
    for t in threads:
        t.join(deadline.left())
        if t.is_alive():
            raise HangError(f"{what}: thread {t.name} still running at the deadline")


class HangError(Exception):
    """A wait of this process ran past its deadline."""


def key_of(args: dict) -> bytes:
    return bytes.fromhex(args["key"])


def addr_of(args: dict) -> tuple:
    return tuple(args["addr"])


def make_rng(args: dict, salt: str) -> random.Random:
    return random.Random(f"{args['seed']}:{salt}:{os.getpid()}")


def maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p

