"""Data plane, part 1: ``Segment`` (memfd / shm fallback, buffer protocol, fd
passing, refusals) and the busy-poll configuration.

Rings are in test_ring.py (a hostile peer in test_ring_corruption.py), the
wait protocol in test_wait.py.  Real shared memory and real processes
throughout.
"""

import errno
import fcntl
import gc
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from children import child_env
from fastpath_helpers import RingPair
from shrimpio import _fastpath as fp
from shrimpio._fastpath import Ring, Segment, get_busy_poll_us, set_busy_poll_us

PAGE = os.sysconf("SC_PAGE_SIZE")
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def fd_target(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def shm_names():
    return set(os.listdir("/dev/shm"))


def run_python(code, *args, env=None, drop=(), pass_fds=(), timeout=30):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=child_env(env, drop=drop), pass_fds=pass_fds, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- kinds

def test_memfd_is_default_and_sealed(monkeypatch):
    monkeypatch.delenv("SHRIMPIO_SEGMENT", raising=False)
    with Segment(10000) as seg:
        assert seg.kind == "memfd"
        assert fd_target(seg.fileno()).startswith("/memfd:shrimpio")
        seals = fcntl.fcntl(seg.fileno(), fcntl.F_GET_SEALS)
        assert seals & ALL_SEALS == ALL_SEALS
        # Sealed for real: the kernel refuses to shrink or grow it.
        for size in (0, PAGE, 1 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(seg.fileno(), size)
        assert seg.size == 10000
        assert os.fstat(seg.fileno()).st_size == 3 * PAGE  # page-rounded
        # Close-on-exec: a segment reaches a child only when passed on purpose.
        assert not os.get_inheritable(seg.fileno())
    assert seg.closed


@pytest.mark.parametrize("how", ["env", "argument"])
def test_shm_fallback_leaves_no_name(monkeypatch, how):
    before = shm_names()
    if how == "env":
        monkeypatch.setenv("SHRIMPIO_SEGMENT", "shm")
        seg = Segment(5000)
    else:
        monkeypatch.setenv("SHRIMPIO_SEGMENT", "memfd")
        seg = Segment(5000, kind="shm")
    try:
        assert seg.kind == "shm"
        target = fd_target(seg.fileno())
        assert target.startswith("/dev/shm/shrimpio-") and target.endswith("(deleted)")
        assert shm_names() == before  # unlinked at once, while still in use
        # Not sealable: Linux tmpfs answers F_SEAL_SEAL alone, others EINVAL.
        try:
            assert fcntl.fcntl(seg.fileno(), fcntl.F_GET_SEALS) == fcntl.F_SEAL_SEAL
        except OSError as e:
            assert e.errno == errno.EINVAL
        m = memoryview(seg)
        m[:5] = b"hello"
        assert bytes(m[:5]) == b"hello"
        m.release()
    finally:
        seg.close()
    assert shm_names() == before


def test_kind_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "shm")
    with Segment(100, kind="memfd") as seg:
        assert seg.kind == "memfd"


def test_bad_kind_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="kind"):
        Segment(100, kind="tmpfs")
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "hugepages")
    with pytest.raises(ValueError, match="SHRIMPIO_SEGMENT"):
        Segment(100)


# --------------------------------------------------------------------------- buffer protocol

@pytest.mark.parametrize("kind", ["memfd", "shm"])
def test_second_mapping_sees_writes(kind):
    seg = Segment(3 * PAGE + 5, kind=kind)
    try:
        other = Segment.from_fd(os.dup(seg.fileno()), seg.size, allow_unsealed=(kind == "shm"))
    except BaseException:
        seg.close()
        raise
    a, b = memoryview(seg), memoryview(other)
    try:
        assert other.kind == kind
        assert len(a) == len(b) == seg.size == other.size == 3 * PAGE + 5
        assert not a.readonly and a.format == "B"
        a[0:4] = b"ping"
        a[-3:] = b"end"                 # last bytes, in the partial last page
        assert bytes(b[0:4]) == b"ping" and bytes(b[-3:]) == b"end"
        b[PAGE:PAGE + 4] = b"pong"      # and the other way round
        assert bytes(a[PAGE:PAGE + 4]) == b"pong"
        a[:] = bytes(range(256)) * (len(a) // 256) + bytes(len(a) % 256)
        assert b.tobytes() == a.tobytes()
    finally:
        a.release()
        b.release()
        other.close()
        seg.close()


def test_from_fd_defaults_to_file_size_and_keep_fd_false():
    with Segment(PAGE) as seg:
        fds = set(os.listdir("/proc/self/fd"))
        other = Segment.from_fd(os.dup(seg.fileno()), keep_fd=False)
        # The dup was closed once mapped; the mapping lives on.
        assert set(os.listdir("/proc/self/fd")) == fds
        assert other.size == PAGE
        with pytest.raises(ValueError, match="without keeping its fd"):
            other.fileno()
        memoryview(other)[:3] = b"abc"
        assert bytes(memoryview(seg)[:3]) == b"abc"
        other.close()


CHILD_WRITER = """
    import os, sys
    from shrimpio._fastpath import Segment
    fd, size = int(sys.argv[1]), int(sys.argv[2])
    seg = Segment.from_fd(fd, size, allow_unsealed=os.environ.get("TRUST_PARENT") == "1")
    m = memoryview(seg)
    assert bytes(m[:6]) == b"parent", bytes(m[:6])
    m[size - 5:] = b"child"
    m.release()
    seg.close()
    print(seg.kind, os.getpid())
"""


@pytest.mark.parametrize("kind", ["memfd", "shm"])
def test_fd_passed_to_child_process(kind):
    seg = Segment(2 * PAGE, kind=kind)
    try:
        memoryview(seg)[:6] = b"parent"
        env = {"TRUST_PARENT": "1" if kind == "shm" else "0"}  # unsealed: only when told
        res = run_python(CHILD_WRITER, seg.fileno(), seg.size, env=env, pass_fds=[seg.fileno()])
        assert res.returncode == 0, res.stderr
        child_kind, child_pid = res.stdout.split()
        assert child_kind == kind and int(child_pid) != os.getpid()
        with memoryview(seg) as m:
            assert bytes(m[-5:]) == b"child"
    finally:
        seg.close()


@pytest.mark.parametrize("setting", ["memfd", "shm"])
def test_child_refuses_shm_segment_unless_told(setting):
    """Whatever its own SHRIMPIO_SEGMENT, a process maps an unsealed
    segment only when its caller says so (allow_unsealed)."""
    with Segment(PAGE, kind="shm") as seg:
        res = run_python(CHILD_WRITER, seg.fileno(), seg.size, env={"SHRIMPIO_SEGMENT": setting},
                         pass_fds=[seg.fileno()])
        assert res.returncode != 0
        assert "PermissionError" in res.stderr and "not a sealed memfd" in res.stderr


# --------------------------------------------------------------------------- from_fd refusals

def assert_closed(fd):
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


def test_from_fd_refuses_a_pipe():
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a shared memory object"):
            Segment.from_fd(r)
        assert_closed(r)  # from_fd owns the fd, even when refusing it
    finally:
        os.close(w)


def test_from_fd_refuses_a_socket_and_a_directory():
    s1, s2 = socket.socketpair()
    with s1, s2:
        with pytest.raises(ValueError, match="not a shared memory object"):
            Segment.from_fd(s1.detach())
    d = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(ValueError, match="not a shared memory object"):
        Segment.from_fd(d)
    assert_closed(d)


@pytest.mark.parametrize("announced", [2 * PAGE, PAGE + 1, 2 ** 63 - 1, 2 ** 64])
def test_from_fd_refuses_too_small(announced):
    with Segment(PAGE) as seg:
        fd = os.dup(seg.fileno())
        with pytest.raises(ValueError, match="holds %d bytes" % PAGE):
            Segment.from_fd(fd, announced)
        assert_closed(fd)


@pytest.mark.parametrize("size", [0, -1, "4096", 1.5])
def test_from_fd_refuses_bad_sizes(size):
    with Segment(PAGE) as seg:
        fd = os.dup(seg.fileno())
        with pytest.raises(ValueError, match="bad segment size"):
            Segment.from_fd(fd, size)
        assert_closed(fd)


def test_from_fd_refuses_empty_file():
    fd = os.memfd_create("empty", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(ValueError, match="bad segment size 0"):
        Segment.from_fd(fd)
    assert_closed(fd)


@pytest.mark.parametrize("seals", [0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE])
def test_from_fd_refuses_unsealed_memfd(seals):
    """Sealable but not sealed against shrinking: the sender could truncate it
    under us (SIGBUS).  Refused even with allow_unsealed: it could be sealed."""
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, PAGE)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    with pytest.raises(PermissionError, match="not sealed against shrinking"):
        Segment.from_fd(fd, allow_unsealed=True)
    assert_closed(fd)


def test_from_fd_unsealable_memfd_is_treated_as_shm(monkeypatch):
    """A memfd made without MFD_ALLOW_SEALING cannot be sealed: like the shm
    fallback, it is accepted only when unsealed segments are allowed."""
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "memfd")
    fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    try:
        with pytest.raises(PermissionError, match="not a sealed memfd"):
            Segment.from_fd(os.dup(fd))
        with Segment.from_fd(os.dup(fd), allow_unsealed=True) as seg:
            assert seg.kind == "shm"
            memoryview(seg)[:2] = b"ok"
            assert os.pread(fd, 2, 0) == b"ok"
    finally:
        os.close(fd)


def test_from_fd_shm_needs_permission(monkeypatch):
    monkeypatch.setenv("SHRIMPIO_SEGMENT", "memfd")
    with Segment(PAGE, kind="shm") as seg:
        fd = os.dup(seg.fileno())
        with pytest.raises(PermissionError) as e:
            Segment.from_fd(fd)
        assert e.value.errno == errno.EPERM
        assert_closed(fd)
        with Segment.from_fd(os.dup(seg.fileno()), allow_unsealed=True) as s2:
            assert s2.kind == "shm"
        monkeypatch.setenv("SHRIMPIO_SEGMENT", "shm")
        with pytest.raises(PermissionError):       # the default never follows the env
            Segment.from_fd(os.dup(seg.fileno()))


def test_from_fd_bad_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        Segment.from_fd(r)      # closed fd number
    assert e.value.errno == errno.EBADF


# --------------------------------------------------------------------------- close, types

def test_close_with_memoryview_raises_buffer_error():
    seg = Segment(PAGE)
    fd = seg.fileno()
    m = memoryview(seg)
    sub = m[10:20]
    m.release()
    with pytest.raises(BufferError, match="1 buffer users"):
        seg.close()
    assert not seg.closed
    sub[:] = b"0123456789"   # still mapped: the refused close did nothing
    sub.release()
    seg.close()
    assert seg.closed
    assert_closed(fd)
    seg.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        memoryview(seg)
    with pytest.raises(ValueError, match="closed"):
        seg.fileno()
    assert "closed" in repr(seg)


def test_close_with_ring_attached_raises_buffer_error():
    seg = Segment(Ring.footprint(64))
    ring = Ring(seg, 0, 64, create=True)
    with pytest.raises(BufferError):
        seg.close()
    ring.write(b"still works")
    assert ring.read(100) == b"still works"
    ring.close()
    seg.close()
    with pytest.raises(ValueError, match="segment is closed"):
        Ring(seg, 0, 64, create=True)


def test_segment_wrong_types_and_sizes():
    for bad in ("4096", 4096.0, [4096]):
        with pytest.raises(TypeError):
            Segment(bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            Segment(bad)
    with pytest.raises(TypeError):
        Segment.from_fd("3")
    with pytest.raises(TypeError):
        Segment.from_fd(None)


def test_dealloc_releases_everything():
    """A segment dropped without close() unmaps and closes its fd (no leak:
    the autouse fixture checks the fd table)."""
    seg = Segment(PAGE)
    fd = seg.fileno()
    assert stat.S_ISREG(os.fstat(fd).st_mode)
    del seg
    gc.collect()
    assert_closed(fd)


# --------------------------------------------------------------------------- busy-poll configuration

@pytest.fixture
def restore_busy_poll():
    old = get_busy_poll_us()
    yield
    set_busy_poll_us(old)


def test_set_busy_poll_applies_to_new_rings(restore_busy_poll):
    with RingPair(64, busy_poll_us=7) as before:
        set_busy_poll_us(12.5)
        assert get_busy_poll_us() == 12.5
        seg = Segment(Ring.footprint(64))
        ring = Ring(seg, 0, 64, create=True)
        assert ring.busy_poll_us == 12.5             # the new default
        assert before.w.busy_poll_us == 7             # explicit, earlier: unchanged
        ring.busy_poll_us = 0
        assert ring.busy_poll_us == 0
        set_busy_poll_us(0)
        assert get_busy_poll_us() == 0
        ring.close()
        seg.close()


@pytest.mark.parametrize("bad,exc", [
    (-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (fp.MAX_BUSY_POLL_US + 1, ValueError), ("50", TypeError), (None, TypeError),
])
def test_bad_busy_poll_values(restore_busy_poll, bad, exc):
    set_busy_poll_us(33)
    with pytest.raises(exc, match="microseconds"):
        set_busy_poll_us(bad)
    assert get_busy_poll_us() == 33  # unchanged by the refused value
    if bad is None:
        return  # for a ring, None means "the default"
    seg = Segment(Ring.footprint(64))
    try:
        with pytest.raises(exc, match="busy_poll_us"):
            Ring(seg, 0, 64, create=True, busy_poll_us=bad)
        ring = Ring(seg, 0, 64, create=True, busy_poll_us=5)
        with pytest.raises(exc, match="busy_poll_us"):
            ring.busy_poll_us = bad
        assert ring.busy_poll_us == 5
        ring.close()
    finally:
        seg.close()


GET_BUSY_POLL = "import shrimpio._fastpath as f; print(f.get_busy_poll_us())"


@pytest.mark.parametrize("value,expected", [(None, 50.0), ("0", 0.0), ("7.5", 7.5), (" 120 ", 120.0),
                                            ("1e3", 1000.0)])
def test_env_busy_poll(value, expected):
    env = {} if value is None else {"SHRIMPIO_BUSY_POLL_US": value}
    res = run_python(GET_BUSY_POLL, env=env, drop=("SHRIMPIO_BUSY_POLL_US",))
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == expected


@pytest.mark.parametrize("value", ["abc", "", "-1", "nan", "inf", "1e7", "50us"])
def test_env_busy_poll_bad_values_fail_clearly(value):
    res = run_python(GET_BUSY_POLL, env={"SHRIMPIO_BUSY_POLL_US": value})
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: SHRIMPIO_BUSY_POLL_US must be a number of microseconds")
