"""Tests for shrimpio.vmmc, part 1: deliberate update, remote fetch, errors,
lifetimes, another user, a killed exporter.  (Notifications, several
importers and hostile importers are in test_vmmc_notify.py.)

Real processes: the other side of every import is a forked child (see
vmmc_helpers.Child), driven over a pipe; waits have deadlines; every child is
reaped.  conftest's autouse fixtures check that no registry entry, fd,
/dev/shm file or child outlives a test.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

import pytest

from children import NOBODY, drop_to_nobody
from conftest import wait_for
from shrimpio import _control
from shrimpio._control import Registry
from shrimpio.vmmc import NOTIFY_CAPACITY, Endpoint
from vmmc_helpers import (
    DEADLINE, Child, blocked_in_poll, export_server, gone,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
PATTERN = bytes(range(256)) * 16            # 4096 bytes


def _importer(chan, writes):
    """Child: on "go", import exp/buf, report (size, readable), apply
    ``writes`` [(offset, data)], report "sent", exit on "done"."""
    chan.recv()
    with Endpoint("imp") as ep:
        imp = ep.import_buffer("exp", "buf")
        chan.send((imp.size, imp.readable))
        for off, data in writes:
            imp.send(data, off)
        chan.send("sent")
        chan.recv()


# --------------------------------------------------------------------------- deliberate update

def test_send_at_offsets_lands_in_the_exporters_memory():
    size = 2 << 20
    big = os.urandom(1 << 20)                # above the GIL-free copy threshold
    writes = [(0, b"head"), (100, bytearray(b"middle")), (10, b"aaaa"), (12, b"bb"),
              (4096, big), (size - 4, b"tail"), (size, b""), (0, b"")]
    with Child(_importer, writes) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", size)
            child.send("go")
            assert child.recv() == (size, False)
            child.expect("sent")
            expected = bytearray(size)
            for off, data in writes:
                expected[off:off + len(data)] = data
            with memoryview(exp) as mv:
                assert len(mv) == size
                assert mv[10:14] == b"aabb"          # later sends overwrite earlier ones
                assert mv[4096:4096 + len(big)] == big
                assert bytes(mv) == expected
            child.send("done")
            child.finish()


def test_fetch_where_the_exporter_allows_it():
    buffers = [("ro", 4096, True, PATTERN), ("wo", 4096, False, PATTERN)]
    with Child(export_server, "exp", buffers) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            ro = ep.import_buffer("exp", "ro")
            wo = ep.import_buffer("exp", "wo")
            assert (ro.size, ro.readable) == (4096, True)
            assert (wo.size, wo.readable) == (4096, False)

            assert ro.fetch(0, 4096) == PATTERN
            assert ro.fetch(10, 5) == PATTERN[10:15]
            assert ro.fetch(4096, 0) == b"" and ro.fetch(0, 0) == b""
            ro.send(b"new", 50)
            assert ro.fetch(48, 7) == PATTERN[48:50] + b"new" + PATTERN[53:55]
            child.send(("read", "ro", 50, 3))
            assert child.recv() == b"new"
            child.send(("write", "ro", 4000, b"from the exporter"))
            child.expect("ok")
            assert ro.fetch(4000, 17) == b"from the exporter"

            for args in [(0, 1), (0, 0), (0, 4096)]:
                with pytest.raises(PermissionError):
                    wo.fetch(*args)
            wo.send(b"abc", 7)                        # write-only still accepts sends
            child.send(("read", "wo", 5, 6))
            assert child.recv() == PATTERN[5:7] + b"abc" + PATTERN[10:11]
        child.send("exit")
        child.finish()


HUGE = [2**63, 2**64, 2**200, sys.maxsize]


def test_out_of_bounds_raise_valueerror_and_write_nothing():
    fill = b"\xaa" * 64
    with Child(export_server, "exp", [("buf", 64, True, fill)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            bad_sends = [(b"x", -1), (b"x", 64), (b"xy", 63), (b"", 65), (b"x" * 65, 0),
                         (b"x" * 64, 1), (b"x", -2**63), (b"x", -2**70)] + [(b"x", h) for h in HUGE]
            for data, off in bad_sends:
                with pytest.raises(ValueError):
                    imp.send(data, off)
                with pytest.raises(ValueError):
                    imp.send(data, off, notify=True)
            bad_fetches = [(-1, 1), (0, 65), (64, 1), (1, 64), (0, -1), (-2**70, 0),
                           (sys.maxsize, sys.maxsize)] + [(h, 1) for h in HUGE] + [(0, h) for h in HUGE]
            for off, n in bad_fetches:
                with pytest.raises(ValueError):
                    imp.fetch(off, n)
            assert imp.fetch(0, 64) == fill
            child.send(("read", "buf", 0, 64))
            assert child.recv() == fill                 # nothing was written
            # The exact edges are in bounds.
            imp.send(b"z" * 64, 0)
            imp.send(b"", 64)
            assert imp.fetch(64, 0) == b"" and imp.fetch(63, 1) == b"z"
        child.send("exit")
        child.finish()


def test_wrong_types_raise_typeerror_and_write_nothing():
    fill = b"\xaa" * 64
    with Child(export_server, "exp", [("buf", 64, True, fill)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            for data in ["text", 5, None, [1, 2], object()]:
                with pytest.raises(TypeError):
                    imp.send(data)
            for off in [1.0, "1", None, b"\x01"]:
                with pytest.raises(TypeError):
                    imp.send(b"x", off)
            for args in [("0", 1), (0, 1.5), (None, 1), (0, None)]:
                with pytest.raises(TypeError):
                    imp.fetch(*args)
            with pytest.raises(TypeError):
                imp.send(b"x", 0, True)                 # notify is keyword-only
            assert imp.fetch(0, 64) == fill
            child.send(("read", "buf", 0, 64))
            assert child.recv() == fill

            # Argument checks of the API around it.
            with pytest.raises(TypeError):
                Endpoint(None)
            with pytest.raises(ValueError):
                Endpoint("bad/name")
            with pytest.raises(TypeError):
                ep.export(1, 10)
            for size in [1.5, True, "10"]:
                with pytest.raises(TypeError):
                    ep.export("b", size)
            for size in [0, -1]:
                with pytest.raises(ValueError):
                    ep.export("b", size)
            with pytest.raises(TypeError):
                ep.export("b", 10, notify=5)
            with pytest.raises(TypeError):
                ep.import_buffer(1, "buf")
            with pytest.raises(ValueError):
                ep.import_buffer("exp", "no such/name")
        child.send("exit")
        child.finish()


def test_any_contiguous_buffer_can_be_sent():
    with Child(export_server, "exp", [("buf", 256, True, b"\x00" * 256)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            ints = array.array("I", [1, 2, 3])
            grid = memoryview(bytearray(range(16))).cast("H", (2, 4))    # 2-D, C-contiguous
            cbuf = (ctypes.c_char * 4)(*b"ctyp")
            sends = [(0, b"bytes!"), (8, bytearray(b"bytearray")),
                     (20, memoryview(b"..xyz..")[2:5]), (24, ints), (40, grid),
                     (60, memoryview(b"readonly").toreadonly()), (80, cbuf)]
            expected = bytearray(256)
            for off, data in sends:
                imp.send(data, off)
                raw = bytes(data)
                expected[off:off + len(raw)] = raw
            assert bytes(expected[24:36]) == ints.tobytes()
            # Like socket.send(): a non-contiguous view is refused, nothing written.
            with pytest.raises(BufferError):
                imp.send(memoryview(b"a-b-c-d-")[::2], 100)
            assert imp.fetch(0, 256) == expected
            child.send(("read", "buf", 0, 256))
            assert child.recv() == expected
        child.send("exit")
        child.finish()


# --------------------------------------------------------------------------- names

def test_unknown_endpoint_or_buffer_is_filenotfound():
    with Child(export_server, "exp", [("buf", 64, False, None)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            with pytest.raises(FileNotFoundError):
                ep.import_buffer("nope", "buf")
            with pytest.raises(FileNotFoundError):
                ep.import_buffer("exp", "nope")
            with ep.import_buffer("exp", "buf") as imp:         # the endpoint still serves
                imp.send(b"ok")
            child.send(("close", "buf"))
            child.expect("closed")
            with pytest.raises(FileNotFoundError):
                ep.import_buffer("exp", "buf")                  # unexported
        child.send("exit")
        child.finish()
    with Endpoint("imp") as ep:
        with pytest.raises(FileNotFoundError):
            ep.import_buffer("exp", "buf")                      # endpoint gone


def test_a_silent_asker_does_not_hold_up_the_others():
    """An asker that connects to an endpoint and sends no request (slow,
    stopped or hostile) must not keep the endpoint from answering others:
    an import from another process succeeds well within the 5 s the
    endpoint grants the silent one (the import itself allows 2 s), and the
    silent one is hung up on once its time is up."""
    with Child(export_server, "exp", [("buf", 64, False, None)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            silent = [ep._registry.connect("exp") for _ in range(3)]
            try:
                with ep.import_buffer("exp", "buf", timeout=2.0) as imp:
                    imp.send(b"ok")
                for s in silent:
                    s.settimeout(DEADLINE)
                    assert s.recv(1) == b""                     # hung up on, not answered
            finally:
                for s in silent:
                    s.close()
        child.send("exit")
        child.finish()


def test_duplicate_names_are_fileexists():
    with Child(export_server, "exp", [("buf", 64, False, None)]) as child:
        child.expect("ready")
        with pytest.raises(FileExistsError):
            Endpoint("exp")                                     # live in another process
        with Endpoint("a") as a:
            with pytest.raises(FileExistsError):
                Endpoint("a")
            first = a.export("b", 10)
            with pytest.raises(FileExistsError):
                a.export("b", 20)
            assert first.size == 10 and not first.closed
            first.close()
            second = a.export("b", 20)                          # the name is free again
            assert second.size == 20
        child.send("exit")
        child.finish()


# --------------------------------------------------------------------------- lifetimes

def test_operations_after_close_raise_valueerror():
    with Child(export_server, "exp", [("buf", 64, True, None)]) as child:
        child.expect("ready")
        ep = Endpoint("imp")
        imp = ep.import_buffer("exp", "buf")
        imp.close()
        assert imp.closed
        with pytest.raises(ValueError):
            imp.send(b"x")
        with pytest.raises(ValueError):
            imp.fetch(0, 1)
        imp.close()                                             # idempotent

        nfds = len(os.listdir("/proc/self/fd"))
        own = ep.export("mine", 32)
        mv = memoryview(own)
        with pytest.raises(BufferError):
            own.close()                                         # a view is alive
        assert not own.closed
        mv[:2] = b"ok"
        mv.release()
        own.close()
        assert own.closed
        assert len(os.listdir("/proc/self/fd")) == nfds          # released by close(), not by GC
        with pytest.raises(ValueError):
            memoryview(own)
        with pytest.raises(ValueError):
            own.wait(0)
        own.close()

        imp2 = ep.import_buffer("exp", "buf")
        exp2 = ep.export("other", 16)
        ep.close()                                              # closes what it holds
        assert ep.closed and imp2.closed and exp2.closed
        with pytest.raises(ValueError):
            imp2.send(b"x")
        with pytest.raises(ValueError):
            ep.export("again", 16)
        with pytest.raises(ValueError):
            ep.import_buffer("exp", "buf")
        ep.close()
        assert Registry.open().names() == ["exp"]               # ours is gone
        child.send("exit")
        child.finish()


def test_close_while_another_thread_sends_does_not_crash():
    """A large send copies with the GIL released; close() in another thread
    must not unmap the buffer under it (that was a SIGSEGV)."""
    size = 16 << 20
    with Child(export_server, "exp", [("buf", size, False, None)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            data = bytes(size)
            sent, errors = [0], []

            def sender():
                try:
                    while True:
                        imp.send(data)
                        sent[0] += 1
                except Exception as e:                          # noqa: BLE001
                    errors.append(e)

            t = threading.Thread(target=sender, daemon=True)
            t.start()
            wait_for(lambda: sent[0] >= 2, what="sends to run")
            imp.close()
            t.join(DEADLINE)
            assert not t.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], ValueError), errors
            assert "closed" in str(errors[0])
        child.send("exit")
        child.finish()


# --------------------------------------------------------------------------- exporter gone

def test_exporter_killed_gives_connectionreset_and_sweep_removes_its_entry():
    with Child(export_server, "exp", [("buf", 4096, True, b"alive")]) as child:
        child.expect("ready")
        ep = Endpoint("imp")
        imp = ep.import_buffer("exp", "buf")
        imp.send(b"ping", 100, notify=True)
        assert imp.fetch(0, 5) == b"alive"
        child.kill()                                            # SIGKILL, reaped
        assert child.exitcode == -signal.SIGKILL
        # Liveness is checked once per coarse clock tick: poll with a deadline.
        wait_for(lambda: gone(lambda: imp.send(b"x", 0)), what="send to see the exporter gone")
        with pytest.raises(ConnectionResetError):
            imp.fetch(0, 1)
        with pytest.raises(ConnectionResetError):
            imp.send(b"x", 0, notify=True)
        imp.close()
        assert imp.closed

        reg = Registry.open()
        assert reg.names() == ["exp", "imp"]                    # the dead one's entry is stale
        assert reg.sweep() == ["exp"]
        assert reg.names() == ["imp"]
        with pytest.raises(FileNotFoundError):
            ep.import_buffer("exp", "buf")
        ep.close()
        assert reg.names() == []


def test_exporter_killed_wakes_an_importer_blocked_on_a_full_notification_ring():
    records = NOTIFY_CAPACITY // 16
    with Child(export_server, "exp", [("buf", 64, False, None)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            sent, errors = [0], []

            def flood():
                try:
                    while True:
                        imp.send(b"x", 0, notify=True)
                        sent[0] += 1
                except Exception as e:                          # noqa: BLE001
                    errors.append(e)

            t = threading.Thread(target=flood, daemon=True)
            t.start()
            # Nobody consumes: exactly one ring's worth goes in, then it sleeps.
            wait_for(lambda: sent[0] == records and blocked_in_poll(t.native_id),
                     what="the sender to block on the full ring")
            child.kill()
            t.join(DEADLINE)
            assert not t.is_alive(), "sender still blocked after the exporter died"
            assert sent[0] == records
            assert len(errors) == 1 and isinstance(errors[0], ConnectionResetError), errors
        assert Registry.open().sweep() == ["exp"]


@pytest.mark.parametrize("what", ["export", "endpoint"])
def test_exporter_closing_resets_its_importers(what):
    with Child(export_server, "exp", [("buf", 64, True, None)]) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            imp.send(b"before")
            assert imp.fetch(0, 6) == b"before"
            child.send(("close", "buf") if what == "export" else ("close_endpoint",))
            child.expect("closed")
            wait_for(lambda: gone(lambda: imp.fetch(0, 1)), what="fetch to see the unexport")
            with pytest.raises(ConnectionResetError):
                imp.send(b"after")
            with pytest.raises(FileNotFoundError):
                ep.import_buffer("exp", "buf")
            imp.close()
        child.send("exit")
        child.finish()


# --------------------------------------------------------------------------- another user

def _nobody_opens_registry(chan):
    drop_to_nobody()
    sock_path = chan.recv()
    outcomes = []
    for attempt in (lambda: Endpoint("nob"), lambda: Registry.open(),
                    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(sock_path)):
        try:
            attempt()
            outcomes.append("allowed")
        except Exception as e:                                  # noqa: BLE001
            outcomes.append(type(e).__name__)
    chan.send(outcomes)


@needs_root
def test_other_user_cannot_reach_the_registry():
    # Forked before the endpoint exists: it inherits none of its fds.
    with Child(_nobody_opens_registry) as child:
        with Endpoint("exp") as ep:
            exp = ep.export("buf", 64)
            child.send(os.path.join(ep._registry.path, "exp.sock"))
            assert child.recv() == ["PermissionError"] * 3
            child.finish()
            assert exp.importers == 0


def _nobody_imports(chan):
    drop_to_nobody()
    nob_reg, sock_path = chan.recv()
    with Endpoint("nob", registry=nob_reg) as ep:
        try:
            ep.import_buffer("exp", "buf")
            chan.send(("import_buffer", "imported", ""))
        except OSError as e:
            chan.send(("import_buffer", type(e).__name__, str(e)))
    # A hostile client skips the library's own check and asks directly.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(sock_path)
        _control.send_message(s, "import", {"buffer": "buf", "pid": os.getpid()})
        msg = _control.recv_message(s, timeout=DEADLINE)
        chan.send(("raw", msg.kind, msg.body.get("errno"), len(msg.fds)))
        try:
            _control.expect(msg, "ok")
            chan.send(("expect", "ok"))
        except OSError as e:
            chan.send(("expect", type(e).__name__))


@needs_root
def test_other_user_is_refused_by_peer_credentials():
    """Make the endpoint's socket reachable by `nobody` (directories 0711, the
    socket 0777, a symlink in nobody's own registry): the SO_PEERCRED checks
    on both sides must still keep the segment from it."""
    base = tempfile.mkdtemp(prefix="shr-", dir="/tmp")
    os.chmod(base, 0o711)
    netdir = f"net-{os.stat('/proc/self/ns/net').st_ino}"
    root_reg, nob_reg = os.path.join(base, "root"), os.path.join(base, "nob")
    for d in (nob_reg, os.path.join(nob_reg, netdir)):
        os.mkdir(d, 0o700)
        os.chown(d, NOBODY, NOBODY)
    try:
        # Forked before the endpoint exists: it inherits none of its fds.
        with Child(_nobody_imports) as child:
            with Endpoint("exp", registry=root_reg) as ep:
                exp = ep.export("buf", 4096, readable=True)
                sock_path = os.path.join(root_reg, netdir, "exp.sock")
                for d in (root_reg, os.path.dirname(sock_path)):
                    os.chmod(d, 0o711)
                os.chmod(sock_path, 0o777)
                os.symlink(sock_path, os.path.join(nob_reg, netdir, "exp.sock"))
                child.send((nob_reg, sock_path))
                kind, exc, text = child.recv()
                assert (kind, exc) == ("import_buffer", "PermissionError")
                assert "uid 0" in text                          # refused for the peer's uid
                assert child.recv() == ("raw", "error", errno.EPERM, 0)   # no fds handed out
                assert child.recv() == ("expect", "PermissionError")
                child.finish()
                assert exp.importers == 0
                # Control: the same user, through the same socket, gets it.
                for d in (root_reg, os.path.dirname(sock_path)):
                    os.chmod(d, 0o700)
                with Endpoint("imp", registry=root_reg) as ep2:
                    with ep2.import_buffer("exp", "buf") as imp:
                        imp.send(b"same user")
                        assert imp.fetch(0, 9) == b"same user"
    finally:
        shutil.rmtree(base)
