"""The harness's side of a round: start chaos processes, follow their
events, kill some, and check every pass criterion on the others.

A round runs in a registry directory of its own.  Each process is a
:class:`Proc`: ``victim`` (its life and leaks are judged), ``honest`` (a
peer that must also come out clean), ``doomed`` (killed by the harness at
a random moment) or ``hostile`` (its own fate is its business, except a
death by a signal: that is shrimpio code crashing too).

What is checked, and the name each failure is counted under:

* ``crash``: a victim or honest process died of a signal, or ended with
  an uncaught exception (any thread, or an asyncio callback);
* ``hang``: a process did not get to its next checkpoint in time (its
  threads' stacks are dumped to its stderr, then it is killed), or said
  itself that a wait ran past its deadline;
* ``spin``: a victim used more than :data:`SPIN_CPU` of CPU over a
  :data:`WINDOW` in which it had nothing to do (after its peer was killed,
  and again once it closed everything): ``/proc/<pid>/stat`` deltas;
* ``leak``: a victim that closed everything still holds an fd it did not
  hold at its start (but its stat table, :data:`KEPT_FOR_LIFE`), a
  shrimpio (``memfd:shrimpio``) mapping or a child process it did not
  have, or left a registry entry or a ``/dev/shm/shrimpio-*`` file;
* ``data``: a byte arrived that was not sent (each process checks the
  keyed pattern of every stream it reads), or an honest round lost a
  connection (``fail``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from .common import EXIT_DATA, EXIT_HANG, EXIT_OK

#: Idle window over which a victim's CPU time is measured (seconds) and the
#: most it may use in it.
WINDOW = 0.5
SPIN_CPU = 0.15
#: Longest wait for any one event of a process.
EVENT_TIMEOUT = 40.0
_TICK = os.sysconf("SC_CLK_TCK")
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("crash", "hang", "spin", "leak", "data")
#: What a process keeps for its life by design, made at its first listener
#: or connection (after its baseline): its stat table (shrimpio/_stat.py;
#: the table's fd and each of its mmap objects' own dup of it).
KEPT_FOR_LIFE = ("/memfd:shrimpio-stat",)


class RoundFailed(Exception):
    """Stops a round early: something it needed did not happen."""


class Proc:
    """A chaos process as the harness sees it."""

    def __init__(self, rnd: "Round", name: str, role: str, args: dict, kind: str,
                 env: Optional[dict] = None) -> None:
        self.rnd, self.name, self.role, self.kind = rnd, name, role, kind
        r, w = os.pipe()
        penv = dict(os.environ)
        penv.update(env or {})
        paths = [p for p in penv.get("PYTHONPATH", "").split(os.pathsep) if p and p != _PKG_PARENT]
        penv["PYTHONPATH"] = os.pathsep.join([_PKG_PARENT] + paths)
        penv["SHRIMPIO_CHAOS_FD"] = str(w)
        penv["SHRIMPIO_REGISTRY"] = rnd.registry
        penv.pop("SHRIMPIO_PATCH", None)
        self.errpath = os.path.join(rnd.tmp, f"{name}.err")
        with open(self.errpath, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "shrimpio._chaos.proc", role, json.dumps(args)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, pass_fds=[w],
                env=penv, cwd=rnd.tmp)
        os.close(w)
        self.pid = self.popen.pid
        self._rfd = r
        self._buf = b""
        self.killed = False
        self.events: list[dict] = []
        self.returncode: Optional[int] = None
        self.judged = False
        self.base_fds: dict[int, str] = {}
        self.base_children: set[int] = set()
        rnd.procs.append(self)

    # -- events and commands --------------------------------------------------

    def _next_line(self, timeout: float) -> Optional[dict]:
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._rfd], [], [], left)[0]:
                return None
            chunk = os.read(self._rfd, 65536)
            if not chunk:
                return {"ev": "exit"}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def expect(self, ev: str, timeout: float = EVENT_TIMEOUT, soft: bool = False) -> dict:
        """The process's next ``ev`` event; a hang or an early exit is
        recorded and stops the round (``soft``: no event in time is ``{}``)."""
        end = time.monotonic() + timeout
        while True:
            got = self._next_line(max(0.0, end - time.monotonic()))
            if got is None and soft:
                return {}
            if got is None:
                self.rnd.fail("hang", self, f"no {ev!r} within {timeout:.0f}s\n"
                              + "\n".join(p.diagnose() for p in self.rnd.procs))
                for p in self.rnd.procs:         # everyone's stacks, for the record
                    if p is not self and p.popen.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                self.dump_and_kill()
                raise RoundFailed(ev)
            if got["ev"] == "exit":
                self.reap(10)
                self.rnd.judge_exit(self)
                raise RoundFailed(f"{self.name} exited before {ev!r}")
            self.events.append(got)
            if got["ev"] == ev:
                return got

    def send(self, cmd: str) -> None:
        try:
            self.popen.stdin.write(cmd.encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    # -- looking at it -----------------------------------------------------------

    def cpu(self) -> float:
        """User + system CPU seconds of the process (all its threads)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError):
            return 0.0

    def fds(self) -> dict[int, str]:
        out = {}
        try:
            names = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return out
        for n in names:
            try:
                out[int(n)] = os.readlink(f"/proc/{self.pid}/fd/{n}")
            except OSError:
                pass
        return out

    def children(self) -> set[int]:
        kids: set[int] = set()
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    kids.update(int(k) for k in f.read().split())
        except OSError:
            pass
        return kids

    def shm_maps(self) -> list[str]:
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                return [line.strip() for line in f
                        if "memfd:shrimpio" in line and "memfd:shrimpio-stat" not in line]
        except OSError:
            return []

    def diagnose(self) -> str:
        """What the process is doing: each thread's kernel wait and CPU time,
        and its fds."""
        lines = [f"{self.name} ({self.role}, pid {self.pid}):"]
        try:
            for tid in sorted(os.listdir(f"/proc/{self.pid}/task")):
                with open(f"/proc/{self.pid}/task/{tid}/wchan") as f:
                    wchan = f.read()
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                lines.append(f"  thread {tid}: {st[0]} wchan={wchan} "
                             f"cpu={(int(st[11]) + int(st[12])) / _TICK:.2f}s")
        except OSError:
            lines.append("  (gone)")
        lines.append(f"  fds: {self.fds()}")
        return "\n".join(lines)

    def idle_cpu(self, window: float = WINDOW) -> float:
        c0 = self.cpu()
        time.sleep(window)       # (measuring another process over a window)
        return self.cpu() - c0

    # -- its end ---------------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            self.killed = True

    def dump_and_kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGUSR1)      # faulthandler: all threads' stacks
            except ProcessLookupError:
                pass
            time.sleep(0.3)
        self.kill()
        self.reap(10)

    def reap(self, timeout: float) -> Optional[int]:
        if self.returncode is None:
            try:
                self.returncode = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            os.close(self._rfd)
            if self.popen.stdin:
                try:
                    self.popen.stdin.close()
                except BrokenPipeError:
                    pass
        return self.returncode

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            with open(self.errpath, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""


class Round:
    """One round: its processes, registry and findings."""

    def __init__(self, name: str, seed: int, keep_dir: Optional[str] = None) -> None:
        self.name, self.seed = name, seed
        self.tmp = tempfile.mkdtemp(prefix="shrimpio-chaos-", dir=keep_dir)
        self.registry = tempfile.mkdtemp(prefix="shr-c", dir="/tmp")
        os.chmod(self.registry, 0o700)
        self.procs: list[Proc] = []
        self.findings: list[tuple[str, str, str]] = []    # (kind, process, detail)
        self.killed_entries: set[str] = set()              # registry names of killed listeners
        self.notes: dict[str, Any] = {}

    def spawn(self, name: str, role: str, args: dict, kind: str, env: Optional[dict] = None) -> Proc:
        args = dict(args)
        args.setdefault("seed", f"{self.seed}:{name}")
        return Proc(self, name, role, args, kind, env)

    def fail(self, kind: str, proc: "Proc | str", detail: str) -> None:
        who = proc.name if isinstance(proc, Proc) else proc
        self.findings.append((kind, who, detail))

    # -- checks ------------------------------------------------------------------------

    def start(self, proc: Proc) -> dict:
        """Take the process's baseline, let it set up; its 'ready' event."""
        proc.expect("base")
        proc.base_fds = proc.fds()
        proc.base_children = proc.children()
        proc.send("go")
        return proc.expect("ready")

    def settle(self, proc: Proc) -> None:
        """Wait until ``proc`` has ended all its connections (its peers are
        gone or done): it says so itself (Channel.when_idle), or hangs."""
        proc.send("idle")
        proc.expect("idle")

    def check_spin(self, proc: Proc, when: str) -> None:
        used = proc.idle_cpu()
        if used > SPIN_CPU:
            self.fail("spin", proc, f"{used:.2f}s CPU in a {WINDOW}s idle window {when}")

    def quiesce(self, proc: Proc) -> dict:
        """The victim closed everything: no fd, mapping or spin left."""
        ev = proc.expect("quiet")
        now = proc.fds()
        new = {fd: t for fd, t in now.items()
               if (fd not in proc.base_fds or proc.base_fds[fd] != t)
               and not t.startswith(KEPT_FOR_LIFE)}
        if new:
            self.fail("leak", proc, f"fds left open: {new}")
        maps = proc.shm_maps()
        if maps:
            self.fail("leak", proc, f"{len(maps)} shrimpio mappings left: {maps[:3]}")
        kids = proc.children() - proc.base_children
        if kids:
            self.fail("leak", proc, f"child processes left: {sorted(kids)}")
        self.check_spin(proc, "after closing everything")
        proc.send("go")
        return ev.get("stats", {})

    def judge_exit(self, proc: Proc) -> None:
        rc = proc.returncode
        if rc is None or proc.judged:
            return
        proc.judged = True
        if proc.killed and proc.kind in ("doomed", "hostile"):
            return
        if proc.killed:
            return                      # already recorded as a hang
        if rc < 0:
            self.fail("crash", proc, f"died of signal {-rc}\n{proc.stderr_tail()}")
        elif proc.kind == "hostile":
            return
        elif rc == EXIT_DATA:
            self.fail("data", proc, proc.stderr_tail())
        elif rc == EXIT_HANG:
            self.fail("hang", proc, proc.stderr_tail())
        elif rc != EXIT_OK:
            self.fail("crash", proc, f"exit code {rc}\n{proc.stderr_tail()}")

    def finish(self) -> None:
        """Every process ends (the ones still running are told, then
        killed); exits are judged; the registry and /dev/shm checked."""
        for p in self.procs:
            if p.returncode is None and p.kind in ("doomed", "hostile"):
                p.kill()
            elif p.returncode is None:
                p.send("finish")
                p.send("go")
        for p in self.procs:
            if p.reap(20) is None:
                self.fail("hang", p, "did not exit")
                p.dump_and_kill()
            self.judge_exit(p)
        left = []
        for dirpath, _dirs, files in os.walk(self.registry):
            left += [f[:-5] for f in files if f.endswith(".sock")]
        left = [n for n in left if n.split("+")[0] not in self.killed_entries]
        if left:
            self.fail("leak", "registry", f"entries left: {left}")
        pids = {str(p.pid) for p in self.procs}
        try:
            shm = [n for n in os.listdir("/dev/shm")
                   if n.startswith("shrimpio-") and n.split("-")[1] in pids]
        except OSError:
            shm = []
        if shm:
            self.fail("leak", "/dev/shm", f"files left: {shm}")

    def close(self, keep: bool = False) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.kill()
                p.reap(10)
        shutil.rmtree(self.registry, ignore_errors=True)
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def counts(self) -> dict[str, int]:
        """Findings by kind, and ``aborted``: the round stopped before its
        end for a reason that is no finding (a hostile process of the
        harness's own failed: a bug of the suite, counted to be seen)."""
        out = {k: 0 for k in KINDS}
        for kind, _, _ in self.findings:
            out[kind] = out.get(kind, 0) + 1
        out["aborted"] = int("aborted" in self.notes and not self.findings)
        return out


def entry_of(addr) -> str:
    from shrimpio import _route
    import socket
    return _route.entry_name(socket.AF_INET, addr[0], addr[1])
