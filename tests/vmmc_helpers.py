"""Helpers shared by the VMMC tests: forked children with a command channel.

A ``Child`` is forked *before* the test's own endpoints exist wherever the
test cares about liveness, so that it does not inherit (and keep open) the
parent's control sockets or segments.  Children talk to the parent over a
``multiprocessing`` pipe (pickled objects); the parent always waits with a
deadline, and kills and reaps every child it started.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import signal
import struct

from children import reap

DEADLINE = 10.0

# Ring header layout (_fastpath_core.h): producer index at 64, consumer at 128.
HEAD_AT = 64
TAIL_AT = 128
RING_DATA_AT = 256
U64 = struct.Struct("<Q")


class ChildFailed(AssertionError):
    pass


class Child:
    """Fork a child running ``fn(chan, *args)``; ``chan`` is a duplex pipe.

    An exception in the child is sent to the parent as ``("EXC", text)`` and
    re-raised by ``recv()`` as ``ChildFailed``.  The child exits with 0 if
    ``fn`` returned, 1 otherwise; a 60 s alarm is its safety net.
    """

    def __init__(self, fn, *args):
        parent_end, child_end = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:                                   # child: never return into pytest
            code = 1
            try:
                parent_end.close()
                signal.alarm(60)
                fn(child_end, *args)
                code = 0
            except BaseException as e:                 # noqa: BLE001 - report anything
                try:
                    child_end.send(("EXC", f"{type(e).__name__}: {e}"))
                except BaseException:                  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        child_end.close()
        self.pid = pid
        self.chan = parent_end
        self.reaped = False
        self.exitcode = None

    def send(self, obj) -> None:
        self.chan.send(obj)

    def recv(self, timeout: float = DEADLINE):
        if not self.chan.poll(timeout):
            raise AssertionError(f"child {self.pid} reported nothing within {timeout}s")
        try:
            msg = self.chan.recv()
        except EOFError:
            raise AssertionError(f"child {self.pid} exited without reporting") from None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "EXC":
            raise ChildFailed(f"child {self.pid} failed: {msg[1]}")
        return msg

    def expect(self, want, timeout: float = DEADLINE):
        got = self.recv(timeout)
        assert got == want, f"child {self.pid} said {got!r}, expected {want!r}"
        return got

    def wait(self, timeout: float = DEADLINE) -> int:
        """Reap the child (it must exit by itself within ``timeout``)."""
        if not self.reaped:
            try:
                self.exitcode = reap(self.pid, timeout)
            finally:
                self.reaped = True          # reap() killed and reaped it if it overran
        return self.exitcode

    def finish(self, timeout: float = DEADLINE) -> None:
        """Reap the child and require a clean exit."""
        code = self.wait(timeout)
        assert code == 0, f"child {self.pid} exited with {code}"

    def kill(self) -> None:
        """SIGKILL and reap (only this child, by its pid)."""
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.reaped = True
            self.exitcode = os.waitstatus_to_exitcode(status)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.kill()
        finally:
            self.chan.close()


def gone(op) -> bool:
    """True once ``op()`` raises ConnectionResetError (for wait_for)."""
    try:
        op()
    except ConnectionResetError:
        return True
    return False


_POLL_SYSCALLS = {"x86_64": {7, 271}, "aarch64": {73}}


def blocked_in_poll(tid: int) -> bool:
    """True if thread ``tid`` of this process sleeps in poll/ppoll (it has
    reached the doorbell).  Where the syscall table is unknown, say True."""
    nrs = _POLL_SYSCALLS.get(platform.machine())
    if nrs is None:
        return True
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return True
    return first.isdigit() and int(first) in nrs


def export_server(chan, endpoint: str, buffers) -> None:
    """Child body: export ``buffers`` [(name, size, readable, fill)] from
    endpoint ``endpoint``, report "ready", then obey commands:

    ("read", name, off, n) -> bytes;  ("write", name, off, data) -> "ok";
    ("close", name) -> "closed";  ("close_endpoint",) -> "closed";
    ("wait", name, timeout) -> the next notification or None;
    "exit" -> close everything, exit 0.
    """
    from shrimpio.vmmc import Endpoint

    ep = Endpoint(endpoint)
    exps = {}
    for name, size, readable, fill in buffers:
        exps[name] = ep.export(name, size, readable=readable)
        if fill:
            with memoryview(exps[name]) as mv:
                mv[:len(fill)] = fill
    chan.send("ready")
    while True:
        cmd = chan.recv()
        if cmd == "exit":
            ep.close()
            return
        op = cmd[0]
        if op == "read":
            _, name, off, n = cmd
            with memoryview(exps[name]) as mv:
                chan.send(bytes(mv[off:off + n]))
        elif op == "write":
            _, name, off, data = cmd
            with memoryview(exps[name]) as mv:
                mv[off:off + len(data)] = data
            chan.send("ok")
        elif op == "close":
            exps[cmd[1]].close()
            chan.send("closed")
        elif op == "close_endpoint":
            ep.close()
            chan.send("closed")
        elif op == "wait":
            chan.send(exps[cmd[1]].wait(cmd[2]))
        else:
            raise ValueError(f"unknown command {cmd!r}")
