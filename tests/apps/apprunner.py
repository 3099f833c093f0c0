"""Runs real frameworks, unmodified, as real processes under ``shrimpio run``
for the app matrix (``tests/apps/test_*.py``).

Each program (``tests/apps/progs/``) is an ordinary program of its
framework: nothing in it knows about shrimpio.  A test starts its servers
with :meth:`Apps.start` (``shrimpio run prog.py ...`` or ``shrimpio run -m
module ...``, through the ``shrimpio`` console script), waits for them to be
ready, runs its clients to completion with :meth:`Apps.run`, then stops
everything and reads the ``SHRIMPIO_REPORT`` lines that every patched
process appends when a connection closes: one report file per role, so a
line says whose it is.  :func:`assert_shm` then checks that every
connection went over shared memory, and prints the reason of each one that
did not.

Every process is started in a session of its own, so that its workers and
helpers (uvicorn's, gunicorn's, dask's, forked children) form one process
group: :meth:`Apps.close` stops each program with its own signal, waits for
the whole group to leave, kills what is left (and says so: a program that
does not stop is a failure) and reaps.  A test is also bounded by its
``pytest.mark.timeout``: a hang is a failure, never a stuck run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import pytest

from children import child_env
from conftest import wait_for

#: The programs run by the matrix.
PROGS = Path(__file__).resolve().parent / "progs"

READY_TIMEOUT = 40.0      # a server up and listening (dask imports take a while on busy cores)
CLIENT_TIMEOUT = 30.0     # a client run, start to exit (clients use shorter timeouts of their own)
STOP_TIMEOUT = 10.0       # a program's process group gone after its stop signal

SHM, TCP = "shm", "tcp"


def need(*modules: str) -> None:
    """Skip the test unless every module in ``modules`` can be imported
    (without importing it here: the test process stays unpatched and light)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (the app matrix needs: pip install '.[apps]')")


def shrimpio_run() -> list[str]:
    """The command that runs a program patched: the ``shrimpio`` console
    script installed beside this Python, else ``python -m shrimpio``."""
    script = Path(sys.executable).parent / "shrimpio"
    if script.exists():
        return [str(script), "run"]
    return [sys.executable, "-m", "shrimpio", "run"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (for programs that cannot
    be told to pick one and say which)."""
    import _socket
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _appdata():
    spec = importlib.util.spec_from_file_location("appdata", PROGS / "appdata.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: The content the programs exchange: ``appdata.blob(n)``, ``appdata.digest(data)``.
appdata = _appdata()


# ---------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    """A program started by :class:`Apps`."""
    role: str
    argv: list
    popen: subprocess.Popen
    out: Path           # its stdout and stderr
    report: Path        # its SHRIMPIO_REPORT file (its workers' lines too)
    stop_signal: int = signal.SIGINT
    killed: bool = False
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict]:
        """Its report lines (those of all its processes)."""
        return read_report(self.report)


def read_report(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _default_sigint() -> None:
    """In the child before exec: SIGINT stops it even when pytest runs as a
    background job (which ignores SIGINT, and an ignored signal is inherited
    and left alone by Python)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parens.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Apps:
    """The programs of one test; a context manager that always stops, kills
    and reaps every one of them (``with Apps() as apps: ...``)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.cwd = Path.cwd()          # the test's tmp_path (conftest chdirs there)
        self.problems: list[str] = []

    # -- starting ------------------------------------------------------------

    def _env(self, report: Path, patched: bool, env: Optional[dict]) -> dict:
        ours = [k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"]
        e = child_env({"SHRIMPIO_REPORT": str(report), "PYTHONUNBUFFERED": "1", **(env or {})},
                      drop=ours)
        e["PYTHONPATH"] = os.pathsep.join([e["PYTHONPATH"], str(PROGS)])
        return e

    def start(self, role: str, args: Sequence[Union[str, int, Path]], *, patched: bool = True,
              env: Optional[dict] = None, stop_signal: int = signal.SIGINT) -> Proc:
        """Start ``args`` (``["prog.py", ...]`` for a program of progs/, or
        ``["-m", "module", ...]``) under ``shrimpio run`` (plain ``python``
        if not ``patched``), as role ``role``."""
        args = [str(a) for a in args]
        if args[0] != "-m" and not os.path.isabs(args[0]):
            args[0] = str(PROGS / args[0])
        argv = (shrimpio_run() if patched else [sys.executable]) + args
        out = self.cwd / f"{role}.out"
        report = self.cwd / f"{role}.report"
        with open(out, "wb") as f:
            popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd,
                                     env=self._env(report, patched, env),
                                     start_new_session=True, preexec_fn=_default_sigint)
        proc = Proc(role, argv, popen, out, report, stop_signal)
        self.procs.append(proc)
        return proc

    def wait_output(self, proc: Proc, pattern: str, count: int = 1,
                    timeout: float = READY_TIMEOUT) -> list[re.Match]:
        """Wait until ``proc``'s output matches ``pattern`` ``count`` times
        (its matches); fails if it exits first or ``timeout`` runs out."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = proc.output()
            found = list(rx.finditer(text))
            if len(found) >= count:
                return found
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.role} exited ({proc.popen.returncode}) before "
                                     f"printing {pattern!r}:\n{proc.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{proc.role} did not print {pattern!r} within {timeout}s:\n"
                                     f"{text[-4000:]}")
            time.sleep(0.02)

    def wait_port(self, proc: Proc, pattern: str = r"on port (\d+)",
                  timeout: float = READY_TIMEOUT) -> int:
        """The port in ``proc``'s ready line (group 1 of ``pattern``)."""
        return int(self.wait_output(proc, pattern, timeout=timeout)[0].group(1))

    def wait_entry(self, port: int, count: int = 1, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``count`` shrimpio registry entries listen on ``port``
        (a listener registers right after its kernel ``listen()``; a client
        that came before would take TCP)."""
        root = Path(os.environ["SHRIMPIO_REGISTRY"])

        def entries():
            return [p for p in root.glob(f"net-*/tcp*-{port}*") if p.is_socket()]
        wait_for(lambda: len(entries()) >= count, timeout=timeout, interval=0.02,
                 what=f"{count} registry entries for port {port} (have {[p.name for p in entries()]})")

    # -- clients ---------------------------------------------------------------

    def run(self, role: str, args: Sequence[Union[str, int, Path]], *, patched: bool = True,
            env: Optional[dict] = None, timeout: float = CLIENT_TIMEOUT) -> str:
        """Run a client to completion within ``timeout``; its output (it must
        exit 0)."""
        proc = self.start(role, args, patched=patched, env=env, stop_signal=signal.SIGKILL)
        try:
            rc = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.popen.wait()
            proc.killed = True
            raise AssertionError(f"{role} did not finish within {timeout}s (killed); output:\n"
                                 f"{proc.output()[-4000:]}") from None
        proc.stopped = True
        # Its helpers (if any) must not outlive it.
        self._finish_group(proc)
        assert rc == 0, f"{role} exited {rc}; output:\n{proc.output()[-6000:]}"
        return proc.output()

    # -- stopping --------------------------------------------------------------

    def serve_one_client(self, server: Sequence[Union[str, int, Path]],
                         client: Sequence[Union[str, int, Path]]) -> "tuple[str, Proc, Proc]":
        """Start ``server`` (a program that prints "... on port N"), run
        ``client`` with the port as its first argument, stop the server:
        (the client's output, the server, the client)."""
        srv = self.start("server", server)
        port = self.wait_port(srv)
        out = self.run("client", [client[0], port, *client[1:]])
        cli = self.procs[-1]
        self.stop(srv)
        return out, srv, cli

    def stop(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
        """Stop ``proc`` with its stop signal and wait for its whole process
        group to leave; what is still there after ``timeout`` is killed and
        noted as a problem (raised by :meth:`close`)."""
        if proc.stopped:
            return
        proc.stopped = True
        if proc.popen.poll() is None:
            try:
                os.kill(proc.pid, proc.stop_signal)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{proc.role} did not exit within {timeout}s of signal "
                                     f"{signal.Signals(proc.stop_signal).name}; killed. Output:\n"
                                     f"{proc.output()[-3000:]}")
                _kill_group(proc.pid)
                proc.killed = True
                proc.popen.wait()
        self._finish_group(proc, timeout)

    def _finish_group(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the rest of ``proc``'s process group (workers) to leave."""
        deadline = time.monotonic() + timeout
        while _group_alive(proc.pid):
            if time.monotonic() > deadline:
                left = _group_alive(proc.pid)
                self.problems.append(f"{proc.role}: processes {left} still alive {timeout}s after "
                                     "it exited; killed")
                _kill_group(proc.pid)
                proc.killed = True
                break
            time.sleep(0.02)
        wait_for(lambda: not _group_alive(proc.pid), timeout=5, interval=0.02,
                 what=f"{proc.role}'s process group to die")

    def close(self) -> None:
        """Stop every program (last started first)."""
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except BaseException as exc:   # keep going: every process must go
                self.problems.append(f"stopping {proc.role}: {exc!r}")
                _kill_group(proc.pid)
                proc.popen.wait()
        # Every process is gone: no registry entry may be left (a process
        # that exits removes its own).  Said here, as a failure of the test,
        # and swept, so that conftest's leak check (a teardown error, which
        # an xfail mark does not cover) does not repeat it.
        root = os.environ.get("SHRIMPIO_REGISTRY")
        left = []
        if root:
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    if not f.startswith("."):
                        left.append(os.path.join(dirpath, f))
                        os.unlink(left[-1])
        if left and not any(p.killed for p in self.procs):
            self.problems.append("registry entries left behind after every process exited: "
                                 + ", ".join(os.path.basename(f) for f in left))

    def __enter__(self) -> "Apps":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if not self.problems:
            return
        text = "\n".join(self.problems)
        if exc is not None:
            if hasattr(exc, "add_note"):
                exc.add_note(text)
            return
        raise AssertionError(text)


# ---------------------------------------------------------------------------
# Checks


def describe(records: Iterable[dict]) -> str:
    return "\n".join(f"  pid {r['pid']} {r['path']} reason={r['reason']!r} local={r.get('local')} "
                     f"peer={r.get('peer')} sent={r.get('bytes_sent')} received={r.get('bytes_received')}"
                     for r in records)


def assert_shm(*procs: Proc, at_least: int = 1, ports: Optional[Iterable[int]] = None) -> list[dict]:
    """Every connection each of ``procs`` reported went over shared memory,
    and each reported at least ``at_least``.  With ``ports``, only the
    connections to or from those ports count (the others are listed but not
    judged).  The records judged, all processes together."""
    judged = []
    problems = []
    for proc in procs:
        records = proc.records()
        if ports is not None:
            ports = set(ports)
            records = [r for r in records
                       if (r.get("local") or [None, None])[1] in ports
                       or (r.get("peer") or [None, None])[1] in ports]
        tcp = [r for r in records if r["path"] != SHM]
        if tcp:
            problems.append(f"{proc.role}: {len(tcp)} of {len(records)} connections took kernel TCP:\n"
                            + describe(tcp))
        if len(records) < at_least:
            problems.append(f"{proc.role}: {len(records)} connections reported, expected at least "
                            f"{at_least}:\n" + describe(proc.records()))
        judged += records
    assert not problems, "\n".join(problems)
    return judged


def shm_reasons(*procs: Proc) -> str:
    """A summary of every report line (for messages)."""
    return "\n".join(f"{p.role}:\n{describe(p.records())}" for p in procs)
