"""Shared fixtures.  Every test runs with its own registry directory and is
checked for leaks afterwards: file descriptors, /dev/shm files, registry
entries and child processes."""

from __future__ import annotations

import gc
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import pytest


def _fds() -> set[int]:
    """Open fds, less multiprocessing's heap arenas (``/dev/shm/pym-*``), which
    the stdlib keeps for the life of the process by design, and shrimpio's
    stat table (``/memfd:shrimpio-stat``: one per process, for its life;
    shrimpio/_stat.py).  shrimpio's spare
    connect kits (one segment and socketpair a process keeps ready once it
    connects repeatedly) are closed first: they are not a leak."""
    conn_mod = sys.modules.get("shrimpio._connection")
    if conn_mod is not None:
        conn_mod.drop_spares()
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listing itself, already closed
        if not target.startswith(("/dev/shm/pym-", "/memfd:shrimpio-stat")):
            fds.add(int(fd))
    return fds


def _shm() -> set[str]:
    """shrimpio's named segments in /dev/shm (``SHRIMPIO_SEGMENT=shm``:
    ``shrimpio-<pid>-<random>``).  Only those: other programs on the machine
    (multiprocessing's ``sem.mp-*`` of a concurrent run) come and go."""
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith("shrimpio-")}
    except FileNotFoundError:
        return set()


def children_of(pid: int) -> set[int]:
    """Live (or zombie) children of process ``pid`` (none if it is gone)."""
    kids = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return kids


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.001, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch):
    """A private registry root for the test; must be empty of entries after.

    The test also runs in ``tmp_path``: a child ``python -c`` started from
    the source tree would import the uncompiled ``shrimpio/`` there instead
    of the installed package."""
    # Short, under /tmp: a Unix socket path must fit in 107 bytes, and
    # tmp_path (with the test's name in it) often does not.
    root = pathlib.Path(tempfile.mkdtemp(prefix="shr-", dir="/tmp"))
    monkeypatch.setenv("SHRIMPIO_REGISTRY", str(root))
    monkeypatch.chdir(tmp_path)
    try:
        yield root
        gc.collect()
        leftovers = []
        for dirpath, _dirs, files in os.walk(root):
            leftovers += [os.path.join(dirpath, f) for f in files if not f.startswith(".")]
        assert not leftovers, f"registry entries left behind: {leftovers}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks(request):
    """No fds, /dev/shm files, child processes, threads or pinned cores may
    outlive a test."""
    gc.collect()
    me = os.getpid()
    fds, shm, kids = _fds(), _shm(), children_of(me)
    threads = set(threading.enumerate())
    cpus = os.sched_getaffinity(0)
    yield
    # A test that pins the process (benchmarks do, to measure) must give the
    # cores back: the tests after it would run on one core (and skip what
    # needs two).
    left = os.sched_getaffinity(0)
    if left != cpus:
        os.sched_setaffinity(0, cpus)
        pytest.fail(f"the test left this process pinned to cores {sorted(left)} (was {sorted(cpus)})")
    if request.node.get_closest_marker("allow_leaks"):
        return
    gc.collect()
    # Children we started must be gone (reaped) by the end of the test.
    wait_for(lambda: not (children_of(me) - kids), timeout=10, what="child processes to exit")
    # A thread left running holds what it uses, and makes every later
    # fork() of the suite a fork of a multi-threaded process.
    wait_for(lambda: not _new_threads(threads), timeout=10,
             what=f"threads to finish: {_new_threads(threads)}")
    # Threads that close fds (endpoint servers) finish promptly: allow a moment.
    wait_for(lambda: not (_fds() - fds), timeout=5, what=f"fds to close: {sorted(_fds() - fds)}")
    assert not (_shm() - shm), f"/dev/shm files left behind: {sorted(_shm() - shm)}"


def _new_threads(before: set) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: skip the leak check (for tests that check leaks themselves)")


def pytest_runtest_setup(item):
    """A test marked ``chaos`` (the chaos suite's long runs) is opt-in: it
    runs only when the marker expression names it (``pytest -m chaos``)."""
    if item.get_closest_marker("chaos") and "chaos" not in (item.config.getoption("-m") or ""):
        pytest.skip("long chaos run: pytest -m chaos (or shrimpio chaos)")
