"""``shrimpio bench`` rows of shrimpio.msg, beside multiprocessing.Pipe,
pyzmq over ``ipc://`` and mpi4py over MPICH.

=============  =========================================================
key            one sample
=============  =========================================================
msg_rtt        a 64-byte ``bytes`` object sent and sent back
msg_artt       the same awaited on the shrimpio loop (both sides), beside
               the blocking calls and the loop's streams over shm
msg_1m         a 1 MiB numpy array sent, an 8-byte answer back (MiB/s)
msg_64m        the same with 64 MiB
=============  =========================================================

Each pair is two processes pinned to two cores (server 1, client 0).  The
subject, ``shrimpio.msg``, receives arrays with ``recv_into`` posted
before each array is sent (its figure's ``receiver_copied`` says how many
bytes the receiver copied per array: the goal is none); ``msg recv`` is a
plain ``recv()`` making a new array each time.  The peers use each
library's natural calls: ``multiprocessing.Pipe`` ``send``/``recv`` (the
array pickled), pyzmq REQ/REP ``send_pyobj``/``recv_pyobj`` for objects and
``send(copy=False)``/``recv(copy=False)`` for arrays, mpi4py's pickled
``send``/``recv`` for objects and its buffer ``Send``/``Recv`` (into a
ready array) for arrays, run by MPICH's ``mpiexec -n 2``.  ``memcpy`` is
one ``numpy.copyto`` of the array between two arrays already in memory.
A peer whose package is missing says "not installed".
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from ..common import child_python
from ..common import pin as _pin

__all__ = ["specs", "GOALS", "NotInstalled", "versions"]

MIB = 1 << 20
SIZES = {"msg_1m": MIB, "msg_64m": 64 * MIB}
_WARM = 200


class NotInstalled(Exception):
    """A peer's package is not installed (the row says so; not a failure)."""


def _need(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NotInstalled(f"{dist} not installed")


def _mpiexec() -> str:
    _need("mpi4py", "mpi4py")
    for cand in (os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec")):
        if cand and os.path.exists(cand):
            return cand
    raise NotInstalled("mpiexec not installed (pip install mpich)")


def _cma_ok() -> bool:
    """Do cross-memory copies work here (else large messages take the rings)?"""
    import ctypes
    from ...msg import _cma
    tok = ctypes.create_string_buffer(b"shrimpio-bench-c", 16)
    return _cma.verify(os.getpid(), ctypes.addressof(tok), tok.raw)


def versions() -> dict[str, str]:
    """Versions of the peers' packages."""
    import importlib.metadata as md
    out = {}
    for dist in ("numpy", "mpi4py", "mpich"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# -- running a pair ----------------------------------------------------------------------

def _fork(fn: Callable[[], Any], core: Optional[int] = None) -> tuple[int, int]:
    """Fork a child that runs ``fn`` (pinned to ``core``) and writes its
    return value as JSON to a pipe: (pid, the pipe's read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            if core is not None:
                _pin(core)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _join(pid: int, r: int, who: str) -> Any:
    """The forked child's return value (see _fork), once it has exited."""
    data = b""
    while True:
        chunk = os.read(r, 1 << 20)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the {who} process failed")
    return json.loads(data) if data else None


def _pair(server: Callable[[], Any], client: Callable[[], list[int]]) -> tuple[list[int], Any]:
    """Fork ``server`` (core 1; its return value comes back as JSON) and run
    ``client`` here (core 0); (client's samples, server's value)."""
    pid, r = _fork(server, 1)
    affinity = os.sched_getaffinity(0)
    try:
        _pin(0)
        samples = client()
    except BaseException:
        os.sched_setaffinity(0, affinity)
        try:
            _join(pid, r, "server")
        except RuntimeError:
            pass                           # (the client's error says more)
        raise
    os.sched_setaffinity(0, affinity)
    return samples, _join(pid, r, "server")


def _in_child(fn: Callable[[], list[int]]) -> list[int]:
    """Run ``fn`` in a forked process (for libraries, as libzmq, that keep
    threads and fds of their own): its samples."""
    pid, r = _fork(fn)
    return _join(pid, r, "client")


def _timed(n: int, step: Callable[[], Any]) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        step()
        out.append(clock() - t0)
    return out


OBJ = b"m" * 64


# -- one pair of each library: a server answering, a client timing its asks ------------------

Ask = Callable[[], Any]


def _msg_pair(n: int, warm: int, serve: Callable[[Any], Any],
              make_ask: Callable[[Any], Ask]) -> tuple[list[int], Any]:
    """shrimpio.msg: ``serve(end)`` in the server (its return value comes
    back); the client times ``n`` calls of ``make_ask(end)`` after
    ``warm`` untimed ones."""
    from ... import msg
    a, b = msg.Pipe()

    def server() -> Any:
        b.close()
        out = serve(a)
        a.close()
        return out

    def client() -> list[int]:
        a.close()
        ask = make_ask(b)
        for _ in range(warm):
            ask()
        if not b.shm:
            raise RuntimeError("shrimpio.msg did not take shared memory")
        out = _timed(n, ask)
        b.close()
        return out

    return _pair(server, client)


def _mp_pair(n: int, warm: int, serve_one: Callable[[Any], Any],
             make_ask: Callable[[Any], Ask]) -> list[int]:
    """multiprocessing.Pipe: ``serve_one(end)`` answers one ask."""
    import multiprocessing
    a, b = multiprocessing.Pipe()

    def server() -> None:
        b.close()
        for _ in range(n + warm):
            serve_one(a)

    def client() -> list[int]:
        a.close()
        ask = make_ask(b)
        for _ in range(warm):
            ask()
        return _timed(n, ask)

    return _pair(server, client)[0]


def _zmq_url() -> tuple[str, str]:
    d = tempfile.mkdtemp(prefix="shrimpio-bench-zmq-")
    return f"ipc://{d}/s", d


def _zmq_pair(n: int, warm: int, serve_one: Callable[[Any], Any],
              make_ask: Callable[[Any], Ask]) -> list[int]:
    """pyzmq REQ/REP over ``ipc://``, the client in a child of its own
    (libzmq keeps threads and fds)."""
    _need("zmq", "pyzmq")
    url, d = _zmq_url()
    rd, wr = os.pipe()

    def server() -> None:
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(zmq.REP)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(url)
        os.write(wr, b"1")
        for _ in range(n + warm):
            serve_one(s)
        s.close()
        ctx.term()

    def client() -> list[int]:
        import zmq
        os.read(rd, 1)
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        ask = make_ask(s)
        for _ in range(warm):
            ask()
        out = _timed(n, ask)
        s.close()
        ctx.term()
        return out

    try:
        return _pair(server, lambda: _in_child(client))[0]
    finally:
        os.close(rd)
        os.close(wr)
        shutil.rmtree(d, ignore_errors=True)


# -- 64 B object round trip ---------------------------------------------------------------

def rtt_msg(n: int) -> list[int]:
    def serve(a: Any) -> None:
        for _ in range(n + _WARM):
            a.send(a.recv())

    return _msg_pair(n, _WARM, serve, lambda b: lambda: (b.send(OBJ), b.recv()))[0]


def rtt_msg_async(n: int) -> list[int]:
    """``await asend``/``await arecv`` on the shrimpio loop, both sides."""
    from ... import msg
    from ...transport import new_event_loop
    a, b = msg.Pipe()

    def run(coro: Any) -> Any:
        loop = new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    async def serve() -> None:
        for _ in range(n + _WARM):
            await a.asend((await a.arecv()).payload)

    async def ask() -> list[int]:
        for _ in range(_WARM):
            await b.asend(OBJ)
            await b.arecv()
        clock = time.perf_counter_ns
        out = []
        for _ in range(n):
            t0 = clock()
            await b.asend(OBJ)
            await b.arecv()
            out.append(clock() - t0)
        return out

    def server() -> None:
        b.close()
        run(serve())
        a.close()

    def client() -> list[int]:
        a.close()
        out = run(ask())
        b.close()
        return out

    return _pair(server, client)[0]


def rtt_streams(n: int) -> list[int]:
    from . import aio
    return aio.run_one("shrimpio", "rtt", n)["samples"]


def rtt_mp(n: int) -> list[int]:
    return _mp_pair(n, _WARM, lambda a: a.send(a.recv()), lambda b: lambda: (b.send(OBJ), b.recv()))


def rtt_zmq(n: int) -> list[int]:
    return _zmq_pair(n, _WARM, lambda s: s.send_pyobj(s.recv_pyobj()),
                     lambda s: lambda: (s.send_pyobj(OBJ), s.recv_pyobj()))


def _run_mpi(test: str, n: int, size: int) -> list[int]:
    exe = _mpiexec()
    env = dict(os.environ)
    proc = subprocess.run([exe, "-n", "2", *child_python(), "-m", "shrimpio.bench.rows.msg", "mpi", test,
                           str(n), str(size)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"mpiexec failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rtt_mpi(n: int) -> list[int]:
    return _run_mpi("rtt", n, 64)


# -- array transfer -------------------------------------------------------------------------

def _array(size: int) -> Any:
    import numpy as np
    a = np.empty(size, dtype=np.uint8)
    a.fill(1)                      # in memory, as a program's array is
    return a


def bw_msg(n: int, size: int, posted: bool = True) -> tuple[list[int], Any]:
    from ... import msg

    def serve(a: Any) -> dict:
        total = n + 2
        dest = _array(size) if posted else None
        req = a.irecv(into=dest) if posted else None
        a.send(b"ready")
        s0 = msg.copy_stats()
        for i in range(total):
            if posted:
                req.wait()
                if i + 1 < total:
                    req = a.irecv(into=dest)
            else:
                a.recv()
            if i == 1:
                s0 = msg.copy_stats()          # after the warm-up
            a.send(b"ack-8-by")
        moved = msg.copy_stats()["received_copied"] - s0["received_copied"]
        return {"receiver_copied": moved / (total - 2)}

    def make_ask(b: Any) -> Ask:
        arr = _array(size)
        b.recv()
        return lambda: (b.send(arr), b.recv())

    return _msg_pair(n, 2, serve, make_ask)


def bw_mp(n: int, size: int) -> list[int]:
    def make_ask(b: Any) -> Ask:
        arr = _array(size)
        return lambda: (b.send(arr), b.recv_bytes())

    return _mp_pair(n, 2, lambda a: (a.recv(), a.send_bytes(b"ack-8-by")), make_ask)


def bw_zmq(n: int, size: int) -> list[int]:
    def serve_one(s: Any) -> None:
        import numpy as np
        f = s.recv(copy=False)
        np.frombuffer(f.buffer, dtype=np.uint8)
        s.send(b"ack-8-by")

    def make_ask(s: Any) -> Ask:
        arr = _array(size)
        return lambda: (s.send(arr, copy=False), s.recv())

    return _zmq_pair(n, 2, serve_one, make_ask)


def bw_mpi(n: int, size: int) -> list[int]:
    return _run_mpi("bw", n, size)


def bw_memcpy(n: int, size: int) -> list[int]:
    import numpy as np
    src, dst = _array(size), _array(size)
    return _timed(n, lambda: np.copyto(dst, src))


# -- mpi4py, as run by ``mpiexec -n 2 python -m shrimpio.bench.rows.msg mpi TEST N SIZE`` ----------

def _mpi_main(test: str, n: int, size: int) -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    _pin(1 - rank)                        # rank 0 is the client, on core 0
    peer = 1 - rank
    out: list[int] = []
    if test == "rtt":
        comm.Barrier()
        if rank == 0:
            for _ in range(_WARM):
                comm.send(OBJ, dest=peer)
                comm.recv(source=peer)
            out = _timed(n, lambda: (comm.send(OBJ, dest=peer), comm.recv(source=peer)))
        else:
            for _ in range(n + _WARM):
                comm.send(comm.recv(source=peer), dest=peer)
    else:
        arr = _array(size)
        ack = bytearray(8)
        comm.Barrier()
        if rank == 0:
            for _ in range(2):
                comm.Send(arr, dest=peer)
                comm.Recv(ack, source=peer)
            out = _timed(n, lambda: (comm.Send(arr, dest=peer), comm.Recv(ack, source=peer)))
        else:
            for _ in range(n + 2):
                comm.Recv(arr, source=peer)
                comm.Send(ack, dest=peer)
    if rank == 0:
        print(json.dumps(out))


# -- the rows ---------------------------------------------------------------------------------

def specs(Spec: Any, Figure: Any) -> list:
    """The rows, as ``runner.Spec`` objects (classes passed in: no
    import cycle)."""

    def rtt(label: str, fn: Callable[[int], list[int]]) -> Any:
        def m(s: Any) -> Any:
            return Figure.from_ns(label, fn(s.rtt_rounds))
        return m

    def bw(label: str, size: int, fn: Callable[[int, int], Any]) -> Any:
        def m(s: Any) -> Any:
            rounds = max(5, s.bw_rounds // (size // MIB)) if size > MIB else s.bw_rounds
            res = fn(rounds, size)
            samples, extra = res if isinstance(res, tuple) else (res, None)
            return Figure.from_ns(label, samples, size, **(extra or {}))
        return m

    rows = [Spec("msg_rtt", "msg 64 B object round trip", "us",
                 [("shrimpio.msg", rtt("shrimpio.msg", rtt_msg)),
                  ("mp.Pipe", rtt("mp.Pipe", rtt_mp)),
                  ("zmq ipc", rtt("zmq ipc", rtt_zmq)),
                  ("mpi4py", rtt("mpi4py", rtt_mpi))]),
            Spec("msg_artt", "msg 64 B awaited round trip (shrimpio loop)", "us",
                 [("shrimpio.msg", rtt("shrimpio.msg", rtt_msg_async)),
                  ("msg blocking", rtt("msg blocking", rtt_msg)),
                  ("streams shm", rtt("streams shm", rtt_streams))])]
    for key, size in SIZES.items():
        name = "1 MiB" if size == MIB else "64 MiB"
        rows.append(Spec(key, f"msg {name} numpy array + 8 B ack", "MiB/s",
                         [("shrimpio.msg", bw("shrimpio.msg", size, bw_msg)),
                          ("msg recv", bw("msg recv", size, lambda n, sz: bw_msg(n, sz, posted=False))),
                          ("mp.Pipe", bw("mp.Pipe", size, bw_mp)),
                          ("zmq ipc", bw("zmq ipc", size, bw_zmq)),
                          ("mpi4py", bw("mpi4py", size, bw_mpi)),
                          ("memcpy", bw("memcpy", size, bw_memcpy))], needs="numpy"))
    return rows


def _goal_rtt(rows: dict) -> tuple[str, Optional[bool]]:
    row = rows.get("msg_rtt")
    if row is None:
        return "-", None
    us = row.subject.median
    text = f"{us:.2f} us"
    try:
        mpi = row.peer("mpi4py").median
    except KeyError:
        return text + " (mpi4py not measured)", us <= 1.5
    return f"{text} vs mpi4py {mpi:.2f} us", us <= 1.5 and us < mpi


def _goal_64m(rows: dict) -> tuple[str, Optional[bool]]:
    row = rows.get("msg_64m")
    if row is None:
        return "-", None
    rate = row.subject.median
    try:
        mem = row.peer("memcpy").median
    except KeyError:
        return "-", None
    text = f"{rate / mem:.2f}x memcpy"
    try:
        mpi = row.peer("mpi4py").median
    except KeyError:
        return text + " (mpi4py not measured)", rate >= 0.8 * mem
    return f"{text}, {rate / mpi:.2f}x mpi4py Send/Recv", rate >= 0.8 * mem and rate > mpi


def _goal_copy(rows: dict) -> tuple[str, Optional[bool]]:
    got = [(k, rows[k].subject.extra.get("receiver_copied")) for k in SIZES if k in rows]
    got = [(k, c) for k, c in got if c is not None]
    if not got:
        return "-", None
    return ", ".join(f"{c:.0f} B per array ({k})" for k, c in got), all(c == 0 for _, c in got)


GOALS = [
    ("msg 64 B object rtt <= 1.5 us and faster than mpi4py send/recv", _goal_rtt),
    ("msg 64 MiB array >= 0.8x memcpy and faster than mpi4py Send/Recv", _goal_64m),
    ("msg posted recv_into: no receiver-side copy", _goal_copy),
]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "mpi":
    _mpi_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
