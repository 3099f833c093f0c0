"""Runs the test programs (``tests/programs.py``, ``tests/async_programs.py``
and the examples) as real processes, for ``tests/test_programs.py`` and
``tests/test_async_programs.py``.

A server is started (patched by ``python -m shrimpio run`` or a plain
``python``), its ready line (``... on port N``) read, the client run to
completion; the server is then stopped (SIGINT) and reaped.  Every patched
process appends a ``SHRIMPIO_REPORT`` line when a connection closes (one
file per process role, so a line says whose it is); the helpers at the end
read and check them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from async_programs import PROGRAMS as ASYNC_PROGRAMS
from children import child_env
from conftest import children_of, wait_for
from programs import PROGRAMS as BLOCKING_PROGRAMS

#: The programs known by name, written into the test's directory when run;
#: any other name is the path of a program (an example).
PROGRAMS = {**BLOCKING_PROGRAMS, **ASYNC_PROGRAMS}
assert len(PROGRAMS) == len(BLOCKING_PROGRAMS) + len(ASYNC_PROGRAMS), "a program name is taken twice"

READY_TIMEOUT = 20.0      # a server's "on port N" line
CLIENT_TIMEOUT = 60.0     # a client run, start to exit
STOP_TIMEOUT = 10.0       # a server's exit after SIGINT

SHM, TCP = "shm", "tcp"       # a report line's "path"

# ---------------------------------------------------------------------------
# Running programs


def _env(report: Path, extra: Optional[dict] = None) -> dict:
    """The environment of a program: shrimpio importable, no ``SHRIMPIO_*``
    setting of ours but the registry (so not patched unless run under
    ``shrimpio run``), reporting to ``report``, updated by ``extra``."""
    ours = [k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"]
    return child_env({"SHRIMPIO_REPORT": str(report), **(extra or {})}, drop=ours)


def _program(name: str) -> str:
    """The path of program ``name``: one of ``PROGRAMS``, written into the
    test's directory (the cwd: conftest chdirs into tmp_path), or a path."""
    if name not in PROGRAMS:
        return name
    path = Path.cwd() / name
    if not path.exists():
        path.write_text(PROGRAMS[name])
    return str(path)


def _command(name: str, args, patched: bool, netns: Optional[str] = None) -> list[str]:
    """The command line of program ``name``: under ``shrimpio run`` if
    ``patched``, in network namespace ``netns`` if given."""
    cmd = [sys.executable]
    if patched:
        cmd += ["-m", "shrimpio", "run"]
    cmd += [_program(name), *map(str, args)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return cmd


def _default_sigint() -> None:
    """In the server child before exec: SIGINT raises KeyboardInterrupt
    there even if pytest runs as a background job (which ignores SIGINT,
    and an ignored SIGINT is inherited and left alone by Python)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Server:
    """A running server program and where it reports."""
    proc: subprocess.Popen
    port: int
    report: Path
    stderr: Path
    baseline: frozenset = frozenset()   # its socket fds when it became ready


def _sockets_of(pid: int) -> frozenset:
    """The socket inodes ``pid`` holds open."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return frozenset()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return frozenset(out)


def _idle(srv: Server) -> bool:
    """The server holds no sockets beyond those it had when it became ready
    and has no child processes: every connection it served is closed (and a
    patched process writes its report line before the close)."""
    return _sockets_of(srv.proc.pid) <= srv.baseline and not children_of(srv.proc.pid)


def _read_ready_line(proc: subprocess.Popen, stderr: Path) -> int:
    """The port from the server's first stdout line, within READY_TIMEOUT."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"server gave no ready line in {READY_TIMEOUT}s; "
                                 f"stdout {buf!r}, stderr {stderr.read_text()!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(STOP_TIMEOUT)
                raise AssertionError(f"server exited ({proc.returncode}) before its ready line; "
                                     f"stdout {buf!r}, stderr {stderr.read_text()!r}")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    m = re.search(r"on port (\d+)$", line)
    assert m, f"unexpected ready line {line!r}"
    return int(m.group(1))


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (the servers close their listener on KeyboardInterrupt, which
    removes the registry entry), SIGKILL if that does not do, and reap."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=STOP_TIMEOUT)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def server(name: str, *, patched: bool, host: Optional[str] = None, netns: Optional[str] = None,
           env: Optional[dict] = None, tag: str = "server",
           stderr_must_not_match: Optional[re.Pattern] = None) -> Iterator[Server]:
    """Run server program ``name``; always stopped and reaped on exit.  If
    the body succeeded and ``stderr_must_not_match`` is given, the stopped
    server's stderr must not match it."""
    report = Path.cwd() / f"{tag}.report"
    errpath = Path.cwd() / f"{tag}.stderr"
    args = [0] + ([host] if host else [])
    with open(errpath, "wb") as err:
        proc = subprocess.Popen(_command(name, args, patched, netns), stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, env=_env(report, env),
                                preexec_fn=_default_sigint)
    try:
        port = _read_ready_line(proc, errpath)
        yield Server(proc, port, report, errpath, _sockets_of(proc.pid))
    finally:
        _stop(proc)
    if stderr_must_not_match is not None:
        text = errpath.read_text()
        assert not stderr_must_not_match.search(text), f"{name} logged:\n{text}"


def run_client(name: str, args, *, patched: bool, netns: Optional[str] = None,
               env: Optional[dict] = None, tag: str = "client") -> tuple[str, list[dict]]:
    """Run client program ``name`` to completion; its stdout and report."""
    report = Path.cwd() / f"{tag}.report"
    res = subprocess.run(_command(name, args, patched, netns), capture_output=True,
                         stdin=subprocess.DEVNULL, env=_env(report, env), timeout=CLIENT_TIMEOUT)
    assert res.returncode == 0, (f"{name} exited {res.returncode}\nstdout:\n{res.stdout.decode()}"
                                 f"\nstderr:\n{res.stderr.decode()}")
    return res.stdout.decode(), read_report(report)


# ---------------------------------------------------------------------------
# Reports


def read_report(path: Path) -> list[dict]:
    """The report lines in ``path`` (none if no process wrote one)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def records_when_idle(srv: Server) -> list[dict]:
    """The server's report once it has closed every connection it served."""
    wait_for(lambda: _idle(srv), timeout=10, what="the server to close its connections")
    return read_report(srv.report)


def server_records(srv: Server, n: int, *, forking: bool = False) -> list[dict]:
    """The server's report lines for the ``n`` connections it served, read
    once it has closed all of them (a server closes its side after the
    client's EOF, possibly after the client has exited).

    A forking server's connections are closed by its children, which leave
    with ``os._exit``: their lines must be there all the same.  Its parent
    also closes its copy of each accepted socket right after the fork; those
    lines (if any) must say that no bytes went through the parent."""
    records = records_when_idle(srv)
    served = [r for r in records if r["pid"] != srv.proc.pid] if forking else records
    assert len(served) == n, records
    if forking:
        assert all(r["bytes_sent"] == r["bytes_received"] == 0
                   for r in records if r["pid"] == srv.proc.pid), records
    else:
        assert all(r["pid"] == srv.proc.pid for r in records), records
    return served


def _addr(rec: dict, key: str) -> tuple:
    """A record's ``local`` or ``peer`` address as (host, port)."""
    return tuple(rec[key][:2])


def assert_paired(client: list[dict], server: list[dict], path: str) -> None:
    """Every client connection has the server-side record of the same
    connection (addresses crossed), both on ``path``, and the byte counts of
    each direction agree."""
    for c in client:
        assert c["path"] == path, c
        match = [s for s in server
                 if _addr(s, "peer") == _addr(c, "local") and _addr(s, "local") == _addr(c, "peer")]
        assert match, f"no server record for client connection {c} in {server}"
        s = match[-1]
        assert s["path"] == path, s
        assert (c["bytes_sent"], c["bytes_received"]) == (s["bytes_received"], s["bytes_sent"]), (c, s)
        assert c["bytes_sent"] > 0 and c["bytes_received"] > 0, c


def assert_tcp(records: list[dict], n: int, reason: str) -> None:
    """``n`` connections, all on kernel TCP for ``reason``, with bytes both ways."""
    assert len(records) == n, records
    for r in records:
        assert (r["path"], r["reason"]) == (TCP, reason), r
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, r
