"""Tests for shrimpio._control: registry, control messages, fd passing, credentials.

Real sockets, real processes.  Children are forked (or fork+exec'd) and report
over pipes; the parent always waits on a condition with a deadline and kills
and reaps every child it started.
"""

import array
import errno
import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from children import NOBODY, child_env, drop_to_nobody, reap
from shrimpio._control import (
    MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION, Message, ProtocolError, Registry, check_name,
    error_reply, expect, peer_credentials, recv_message, registry_root, send_message,
)

DEADLINE = 10.0
NETNS = os.stat("/proc/self/ns/net").st_ino
HEADER = struct.Struct("!4sHHI")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown / drop to nobody")


# --------------------------------------------------------------------------- helpers

def open_fds():
    return set(os.listdir("/proc/self/fd"))


def memfd(data=b""):
    fd = os.memfd_create("shrimpio-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def close_all(fds):
    for fd in fds:
        os.close(fd)


class Child:
    """A forked child running fn(report, *args); report(str) sends one line to the parent."""

    def __init__(self, fn, *args):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                  # child: never return into pytest
            code = 1
            try:
                os.close(r)
                signal.alarm(30)                      # safety net if the parent vanishes
                fn(lambda line: os.write(w, line.encode() + b"\n"), *args)
                code = 0
            except BaseException as e:               # noqa: BLE001 - report anything
                try:
                    os.write(w, f"EXC {type(e).__name__}: {e}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._r, self._buf, self.reaped = pid, r, b"", False

    def line(self, timeout=DEADLINE):
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(0.0, end - time.monotonic()))
            assert ready, f"child {self.pid} reported nothing within {timeout}s"
            chunk = os.read(self._r, 4096)
            assert chunk, f"child {self.pid} exited without reporting (got {self._buf!r})"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def kill(self):
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.reaped = True

    def wait(self):
        try:
            return reap(self.pid, DEADLINE)
        finally:
            self.reaped = True          # reap() killed and reaped it if it overran

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        os.close(self._r)


def _serve_forever(report, root, name):
    lsock = Registry.open(root).listen(name)      # noqa: F841 - keep it open
    report("ready")
    while True:
        signal.pause()


def stale_entry(root, name):
    """Leave a stale entry `name`: a child listens there and is killed with SIGKILL."""
    with Child(_serve_forever, root, name) as child:
        assert child.line() == "ready"
        child.kill()


def raw_message(payload, magic=b"SHRM", version=PROTOCOL_VERSION, length=None):
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return HEADER.pack(magic, version, 0, len(payload) if length is None else length) + payload


def send_raw(sock, data, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


@pytest.fixture
def root(tmp_path, monkeypatch):
    path = str(tmp_path / "reg")
    monkeypatch.setenv("SHRIMPIO_REGISTRY", path)
    return path


@pytest.fixture
def reg(root):
    return Registry.open()


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def open_base():
    """A short directory under /tmp that other users may traverse (not list)."""
    base = tempfile.mkdtemp(prefix="shr-", dir="/tmp")
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base)


# --------------------------------------------------------------------------- names, root

def test_registry_root(monkeypatch):
    monkeypatch.delenv("SHRIMPIO_REGISTRY", raising=False)
    assert registry_root() == f"/tmp/shrimpio-{os.geteuid()}"
    monkeypatch.setenv("SHRIMPIO_REGISTRY", "")
    assert registry_root() == f"/tmp/shrimpio-{os.geteuid()}"
    monkeypatch.setenv("SHRIMPIO_REGISTRY", "/somewhere/else")
    assert registry_root() == "/somewhere/else"


def test_check_name():
    for good in ["a", "tcp:127.0.0.1:8080", "x@y+z-w_v.u", "A" * 96, "::1"]:
        assert check_name(good) == good
    for bad in ["", ".hidden", "A" * 97, "a/b", "a b", "é", "../x", "x\n", "a\0b"]:
        with pytest.raises(ValueError, match="endpoint name"):
            check_name(bad)
    for bad in [None, b"abc", 5]:
        with pytest.raises(TypeError):
            check_name(bad)


# --------------------------------------------------------------------------- Registry.open

def test_open_creates_private_dirs(root):
    old = os.umask(0o277)                       # mkdir alone would give 0500
    try:
        reg = Registry.open()
    finally:
        os.umask(old)
    assert reg.path == os.path.join(root, f"net-{NETNS}")
    for path in (root, reg.path):
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
    assert Registry.open(root=root).path == reg.path      # reopening is fine
    assert reg.names() == []


@pytest.mark.parametrize("how, reason", [
    ("symlink", "symbolic link"),
    ("mode", "mode 0755"),
    pytest.param("owner", f"owned by uid {NOBODY}", marks=needs_root),
    ("file", "not a directory"),
    ("netmode", "mode 0750"),
])
def test_open_refuses_unsafe_dirs(tmp_path, how, reason):
    root = str(tmp_path / "reg")
    bad = root
    if how == "symlink":
        os.mkdir(tmp_path / "real", 0o700)
        os.symlink(tmp_path / "real", root)
    elif how == "file":
        open(root, "w").close()
    else:
        Registry.open(root)
        if how == "mode":
            os.chmod(root, 0o755)
        elif how == "owner":
            os.chown(root, NOBODY, NOBODY)
        else:
            bad = os.path.join(root, f"net-{NETNS}")
            os.chmod(bad, 0o750)
    with pytest.raises(PermissionError) as info:
        Registry.open(root)
    assert reason in str(info.value)
    assert info.value.filename == bad


def test_open_missing_parent(tmp_path, monkeypatch):
    root = str(tmp_path / "nope" / "reg")
    monkeypatch.setenv("SHRIMPIO_REGISTRY", root)
    with pytest.raises(FileNotFoundError) as info:
        Registry.open()
    text = str(info.value)
    assert str(tmp_path / "nope") in text and "SHRIMPIO_REGISTRY" in text
    assert info.value.filename == root
    assert not os.path.exists(tmp_path / "nope")


def _open_concurrently(barrier, queue, root):
    try:
        barrier.wait(DEADLINE)
        queue.put(("ok", Registry.open(root).path))
    except BaseException as e:                      # noqa: BLE001 - report anything
        queue.put(("err", repr(e)))


def test_open_concurrent(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 8
    for round_ in range(3):
        root = str(tmp_path / f"reg{round_}")
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_open_concurrently, args=(barrier, queue, root))
                 for _ in range(n)]
        for p in procs:
            p.start()
        try:
            results = [queue.get(timeout=DEADLINE) for _ in range(n)]
        finally:
            for p in procs:
                p.join(DEADLINE)
                if p.exitcode is None:
                    p.kill()
                    p.join()
        assert results == [("ok", os.path.join(root, f"net-{NETNS}"))] * n
        assert all(p.exitcode == 0 for p in procs)
        queue.close()


# --------------------------------------------------------------------------- listen / connect

def test_listen_connect_round_trip(reg):
    before = open_fds()
    lsock = reg.listen("svc")
    path = os.path.join(reg.path, "svc.sock")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert reg.names() == ["svc"]
    client = reg.connect("svc")
    conn, _ = lsock.accept()
    try:
        assert client.gettimeout() is None
        raw = client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        assert raw == bytes(16)                               # no send timeout left behind
        assert not os.get_inheritable(client.fileno()) and not os.get_inheritable(lsock.fileno())
        assert client.type == socket.SOCK_SEQPACKET
        assert peer_credentials(conn) == (os.getpid(), os.geteuid(), os.getegid())
        assert peer_credentials(client.fileno()) == (os.getpid(), os.geteuid(), os.getegid())
        send_message(client, "hello", {"n": 1})
        assert recv_message(conn, timeout=DEADLINE) == Message("hello", {"n": 1}, [])
        send_message(conn, "welcome")
        assert recv_message(client, timeout=DEADLINE) == Message("welcome", {}, [])
    finally:
        conn.close()
        client.close()
    reg.remove("svc", lsock)
    assert lsock.fileno() == -1
    assert not os.path.lexists(path) and reg.names() == []
    with pytest.raises(FileNotFoundError, match="no shrimpio endpoint named 'svc'") as info:
        reg.connect("svc")
    assert info.value.errno == errno.ENOENT
    reg.remove("svc")                                         # already gone: no error
    assert open_fds() == before


def test_listen_on_live_name(reg, root):
    lsock = reg.listen("svc")
    try:
        for other in (reg, Registry.open(root)):
            with pytest.raises(FileExistsError) as info:
                other.listen("svc")
            assert info.value.errno == errno.EADDRINUSE
        client = reg.connect("svc")               # the entry still works
        client.close()
    finally:
        reg.remove("svc", lsock)


def test_path_too_long(reg):
    with pytest.raises(ValueError, match="Unix socket address"):
        reg.listen("x" * 96)
    with pytest.raises(ValueError, match="Unix socket address"):
        reg.connect("x" * 96)
    with pytest.raises(ValueError, match="endpoint name"):
        reg.listen("../escape")


def test_stale_entry_of_killed_child(reg, root):
    path = os.path.join(reg.path, "svc.sock")
    with Child(_serve_forever, root, "svc") as child:
        assert child.line() == "ready"
        client = reg.connect("svc")               # live: connects, peer is the child
        assert peer_credentials(client)[0] == child.pid
        client.close()
        child.kill()
    assert os.path.lexists(path)                  # the kernel does not clean up
    with pytest.raises(FileNotFoundError, match="no shrimpio endpoint"):
        reg.connect("svc")
    assert not os.path.lexists(path)


def test_listen_replaces_stale_entry(reg, root):
    stale_entry(root, "svc")
    assert reg.names() == ["svc"]
    lsock = reg.listen("svc")
    try:
        client = reg.connect("svc")
        conn, _ = lsock.accept()
        assert peer_credentials(conn)[0] == os.getpid()
        conn.close()
        client.close()
    finally:
        reg.remove("svc", lsock)


def test_sweep(reg, root):
    stale_entry(root, "dead1")
    stale_entry(root, "dead2")
    lsock = reg.listen("live")
    try:
        assert reg.names() == ["dead1", "dead2", "live"]
        assert reg.sweep() == ["dead1", "dead2"]
        assert reg.names() == ["live"]
        assert reg.sweep() == []
        reg.connect("live").close()
    finally:
        reg.remove("live", lsock)


def test_remove_leaves_recreated_entry(reg, root):
    path = os.path.join(reg.path, "x.sock")
    other = Registry.open(root)
    # 1. our listener died without remove(); another Registry took over the stale name
    s1 = reg.listen("x")
    s1.close()
    s2 = other.listen("x")
    reg.remove("x")
    assert os.path.lexists(path)
    c = reg.connect("x")
    s2.settimeout(DEADLINE)
    s2.accept()[0].close()
    c.close()
    other.remove("x", s2)
    assert not os.path.lexists(path)
    # 2. our listener is alive, but its file was unlinked behind our back and re-created
    s1 = reg.listen("x")
    os.unlink(path)
    s2 = other.listen("x")
    reg.remove("x", s1)
    assert s1.fileno() == -1 and os.path.lexists(path)
    other.remove("x", s2)
    assert not os.path.lexists(path)
    # 3. never bound by this Registry: not ours to remove
    s2 = other.listen("x")
    reg.remove("x")
    assert os.path.lexists(path)
    other.remove("x", s2)


def _listen_race(barrier, queue, done, root):
    try:
        barrier.wait(DEADLINE)
        try:
            lsock = Registry.open(root).listen("race")   # noqa: F841 - keep it open
            queue.put("ok")
        except FileExistsError:
            queue.put("exists")
        done.wait(DEADLINE)                      # keep the winner listening
    except BaseException as e:                   # noqa: BLE001
        queue.put(repr(e))


def test_concurrent_listen_on_stale_name(root):
    Registry.open(root)
    stale_entry(root, "race")
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, queue, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_listen_race, args=(barrier, queue, done, root)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=DEADLINE) for _ in range(n))
        assert results == ["exists"] * (n - 1) + ["ok"]
    finally:
        done.set()
        for p in procs:
            p.join(DEADLINE)
            if p.exitcode is None:
                p.kill()
                p.join()
        queue.close()


def test_connect_timeout_when_backlog_full(reg):
    lsock = reg.listen("busy", backlog=0)        # one pending connection fits, no more
    first = reg.connect("busy")
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="backlog"):
            reg.connect("busy", timeout=0.2)
        assert time.monotonic() - t0 >= 0.15
        with pytest.raises(TimeoutError):
            reg.connect("busy", timeout=0)
        lsock.accept()[0].close()
        reg.connect("busy", timeout=0.2).close()
    finally:
        first.close()
        reg.remove("busy", lsock)


# --------------------------------------------------------------------------- fd passing across exec

CHILD_SCRIPT = textwrap.dedent("""
    import os, sys
    from shrimpio._control import Registry, recv_message, send_message, expect
    sock = Registry.open().connect("fdsvc")
    msg = expect(recv_message(sock, timeout=10), "hello")
    (fd,) = msg.fds
    seen = os.pread(fd, 100, 0)
    inheritable = os.get_inheritable(fd)
    os.close(fd)
    out = os.memfd_create("child")
    os.write(out, b"child saw: " + seen)
    send_message(sock, "reply", {"pid": os.getpid(), "n": msg.body["n"],
                                 "inheritable": inheritable}, fds=[out])
    os.close(out)
    expect(recv_message(sock, timeout=10), "bye")
""")


def test_fd_passing_across_exec(reg, root):
    before = open_fds()
    lsock = reg.listen("fdsvc")
    lsock.settimeout(DEADLINE)
    env = child_env({"SHRIMPIO_REGISTRY": root})
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        conn, _ = lsock.accept()
        try:
            assert peer_credentials(conn) == (proc.pid, os.geteuid(), os.getegid())
            fd = memfd(b"written by the parent")
            send_message(conn, "hello", {"n": 7}, fds=[fd])
            os.close(fd)
            reply = expect(recv_message(conn, timeout=DEADLINE), "reply")
            assert reply.body == {"pid": proc.pid, "n": 7, "inheritable": False}
            (got,) = reply.fds
            assert not os.get_inheritable(got)
            assert os.pread(got, 100, 0) == b"child saw: written by the parent"
            os.close(got)
            send_message(conn, "bye")
            out, _ = proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0, out.decode()
        finally:
            conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        reg.remove("fdsvc", lsock)
    assert open_fds() == before


# --------------------------------------------------------------------------- messages

def test_message_round_trip(pair):
    a, b = pair
    before = open_fds()
    body = {"text": "héllo ✓", "list": [1, 2.5, None, True], "nested": {"k": "v"}}
    send_message(a, "data", body)
    assert recv_message(b) == Message("data", body, [])
    send_message(a, "empty", None)
    assert recv_message(b) == Message("empty", {}, [])
    fds = [memfd(b"fd%d" % i) for i in range(MAX_FDS)]
    send_message(a, "fds", {"count": MAX_FDS}, fds=fds)
    close_all(fds)
    msg = recv_message(b)
    assert msg.kind == "fds" and len(msg.fds) == MAX_FDS
    assert [os.pread(fd, 10, 0) for fd in msg.fds] == [b"fd%d" % i for i in range(MAX_FDS)]
    assert not any(os.get_inheritable(fd) for fd in msg.fds)
    close_all(msg.fds)
    assert open_fds() == before


def test_message_of_exactly_max_size(pair):
    a, b = pair
    overhead = HEADER.size + len(b'{"kind":"big","pad":""}')
    send_message(a, "big", {"pad": "x" * (MAX_MESSAGE - overhead)})
    msg = recv_message(b)
    assert len(msg.body["pad"]) == MAX_MESSAGE - overhead


def test_send_message_rejects(pair):
    a, b = pair
    with pytest.raises(ValueError, match="MAX_MESSAGE"):
        send_message(a, "big", {"pad": "x" * MAX_MESSAGE})
    fds = [memfd() for _ in range(MAX_FDS + 1)]
    try:
        with pytest.raises(ValueError, match="at most"):
            send_message(a, "many", fds=fds)
    finally:
        close_all(fds)
    with pytest.raises(ValueError, match="kind"):
        send_message(a, "x", {"kind": "y"})
    with pytest.raises(ValueError):
        send_message(a, "x", {"v": float("nan")})
    with pytest.raises(TypeError):
        send_message(a, b"x")
    with pytest.raises(TimeoutError):             # nothing was sent by any of those
        recv_message(b, timeout=0)


def test_send_to_dead_peer(pair):
    a, b = pair
    b.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        send_message(a, "hello")


def _deep():
    return raw_message(b"[" * 3000)


MALFORMED = {
    "empty with fds": (b"", "short"),
    "short header": (b"SHRM\x00", "short"),
    "wrong magic": (raw_message({"kind": "x"}, magic=b"HTTP"), "magic"),
    "wrong version": (raw_message({"kind": "x"}, version=2),
                      "peer speaks control protocol v2, this is v1"),
    "length too big": (raw_message({"kind": "x"}, length=100), "length"),
    "length too small": (raw_message({"kind": "x"}, length=3), "length"),
    "not json": (raw_message(b"kind=x"), "JSON"),
    "not utf-8": (raw_message(b'{"kind":"\xff"}'), "UTF-8"),
    "json list": (raw_message(["kind", "x"]), "not an object"),
    "missing kind": (raw_message({"a": 1}), "kind"),
    "kind not str": (raw_message({"kind": 5}), "kind"),
    "NaN": (raw_message(b'{"kind":"x","v":NaN}'), "JSON"),
    "deep nesting": (_deep(), "JSON"),
    "oversized": (raw_message(b"x" * (MAX_MESSAGE + 100 - HEADER.size)), "MAX_MESSAGE"),
    "one byte over": (raw_message(b"x" * (MAX_MESSAGE + 1 - HEADER.size)), "MAX_MESSAGE"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message(pair, case):
    a, b = pair
    data, match = MALFORMED[case]
    before = open_fds()
    fds = [memfd(b"junk"), memfd(b"junk")]
    send_raw(a, data, fds)
    close_all(fds)
    with pytest.raises(ProtocolError, match=match) as info:
        recv_message(b)
    assert info.value.errno == errno.EPROTO
    assert open_fds() == before                   # every fd that came with it was closed
    send_message(a, "next")                       # and the connection is still in step
    assert recv_message(b) == Message("next", {}, [])


@pytest.mark.parametrize("nfds", [MAX_FDS + 1, 6])
def test_too_many_fds(pair, nfds):
    a, b = pair
    before = open_fds()
    fds = [memfd() for _ in range(nfds)]
    send_raw(a, raw_message({"kind": "many"}), fds)
    close_all(fds)
    with pytest.raises(ProtocolError, match="fds"):
        recv_message(b)
    assert open_fds() == before


def test_oversized_raw_send(pair):
    a, b = pair
    a.send(b"\0" * (MAX_MESSAGE + 100))
    with pytest.raises(ProtocolError, match="MAX_MESSAGE"):
        recv_message(b)


def test_recv_timeout_and_eof(pair):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        recv_message(b, timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    with pytest.raises(TimeoutError):
        recv_message(b, timeout=0)
    assert b.gettimeout() is None                 # the socket's own timeout is untouched
    send_message(a, "late")
    assert recv_message(b, timeout=DEADLINE).kind == "late"
    a.close()
    with pytest.raises(ConnectionResetError, match="peer closed"):
        recv_message(b, timeout=DEADLINE)
    with pytest.raises(ConnectionResetError):
        recv_message(b)


# --------------------------------------------------------------------------- expect / error_reply

def test_expect(pair):
    a, b = pair
    before = open_fds()
    fd = memfd()
    send_message(a, "error", {"errno": errno.EPERM, "message": "not yours"}, fds=[fd])
    os.close(fd)
    msg = recv_message(b)
    with pytest.raises(PermissionError, match="not yours") as info:
        expect(msg, "welcome")
    assert info.value.errno == errno.EPERM and msg.fds == []
    assert open_fds() == before

    error_reply(a, errno.ENOENT, "no such buffer")
    with pytest.raises(FileNotFoundError, match="no such buffer"):
        expect(recv_message(b), "welcome")
    error_reply(a, errno.EACCES)                  # default text: strerror
    with pytest.raises(PermissionError, match=os.strerror(errno.EACCES)):
        expect(recv_message(b), "welcome")
    error_reply(a, FileNotFoundError(errno.ENOENT, "gone", "/some/path"))
    with pytest.raises(FileNotFoundError, match="gone"):
        expect(recv_message(b), "welcome")
    error_reply(a, ProtocolError("bad hello"))
    with pytest.raises(OSError, match="bad hello") as info:
        expect(recv_message(b), "welcome")
    assert info.value.errno == errno.EPROTO
    error_reply(a, errno.EINVAL, "\x01" * 5000)   # truncated so that it still fits
    with pytest.raises(OSError) as info:
        expect(recv_message(b), "welcome")
    assert info.value.errno == errno.EINVAL

    fd = memfd()
    send_message(a, "surprise", fds=[fd])
    os.close(fd)
    msg = recv_message(b)
    with pytest.raises(ProtocolError, match="expected a 'welcome'"):
        expect(msg, "welcome")
    assert open_fds() == before

    send_message(a, "error", {"errno": "EPERM"})
    with pytest.raises(ProtocolError, match="malformed"):
        expect(recv_message(b), "welcome")

    send_message(a, "welcome", {"x": 1})
    msg = recv_message(b)
    assert expect(msg, "welcome") is msg


@pytest.mark.parametrize("code", [0, -1, 2 ** 40, 2 ** 31, -(2 ** 40), 4096])
def test_an_error_reply_with_an_impossible_errno_is_a_protocol_error(pair, code):
    """Found by the chaos suite: {"errno": 2**40, "message": ""} made
    expect() call os.strerror(2**40), whose OverflowError escaped the
    importer's import_buffer()."""
    a, b = pair
    send_message(a, "error", {"errno": code, "message": ""})
    with pytest.raises(ProtocolError, match="malformed"):
        expect(recv_message(b), "welcome")


def test_error_reply_to_vanished_peer(pair):
    a, b = pair
    b.close()
    error_reply(a, errno.EPERM, "nobody listens")     # swallowed


# --------------------------------------------------------------------------- other users

def _open_as_nobody(report, root):
    drop_to_nobody()
    os.environ["SHRIMPIO_REGISTRY"] = root
    try:
        Registry.open()
    except PermissionError as e:
        report(f"PermissionError {e}")
    else:
        report("opened")


@needs_root
def test_other_user_cannot_open(open_base):
    root = os.path.join(open_base, "reg")
    Registry.open(root)
    with Child(_open_as_nobody, root) as child:
        line = child.line()
        assert child.wait() == 0
    assert line.startswith("PermissionError") and "owned by uid 0" in line, line


def _connect_as_nobody(report, path):
    drop_to_nobody()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    report("connected")
    sock.recv(1)                                  # until the parent closes


@needs_root
def test_listener_sees_other_users_credentials(open_base):
    root = os.path.join(open_base, "reg")
    reg = Registry.open(root)
    lsock = reg.listen("svc")
    lsock.settimeout(DEADLINE)
    path = os.path.join(reg.path, "svc.sock")
    modes = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in (root, reg.path, path)}
    try:
        os.chmod(root, 0o711)
        os.chmod(reg.path, 0o711)
        os.chmod(path, 0o777)
        with Child(_connect_as_nobody, path) as child:
            conn, _ = lsock.accept()
            try:
                assert child.line() == "connected"
                assert peer_credentials(conn) == (child.pid, NOBODY, NOBODY)
            finally:
                conn.close()
            assert child.wait() == 0
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    reg.remove("svc", lsock)
    assert not os.path.lexists(path)


def _listen_as_nobody(report, path):
    drop_to_nobody()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen()
    report("listening")
    while True:
        signal.pause()


@needs_root
def test_connect_refuses_other_users_listener(open_base):
    root = os.path.join(open_base, "reg")
    reg = Registry.open(root)
    before = open_fds()
    try:
        os.chmod(root, 0o711)
        os.chmod(reg.path, 0o777)                 # let nobody plant a socket...
        with Child(_listen_as_nobody, os.path.join(reg.path, "evil.sock")) as child:
            assert child.line() == "listening"
            os.chmod(reg.path, 0o700)
            os.chmod(root, 0o700)
            with pytest.raises(PermissionError, match=f"served by uid {NOBODY}"):
                reg.connect("evil")               # ...connect still refuses it
    finally:
        os.chmod(reg.path, 0o700)
        os.chmod(root, 0o700)
    assert open_fds() == before
