"""``shrimpio bench``: every benchmark of the project in one run, with its peers.

Rows (``--rows`` picks some; docs/bench.md says what each measures):

=============  ===================================================  ================================
key            measurement                                          peers
=============  ===================================================  ================================
vmmc_rtt       VMMC 64 B put+notify round trip                      Unix socket, Cython spin loop
vmmc_bw        VMMC 1 MiB put + 8 B ack                             Unix socket, one memcpy
socket_rtt     blocking socket 64 B round trip                      TCP, Unix, pyzmq ipc, spin loop
socket_bw      blocking socket 1 MiB sendall + 8 B ack              TCP, Unix, pyzmq ipc
connect        connect + accept + both close, per connection        TCP, Unix
asyncio_rtt    asyncio streams 64 B round trip                      uvloop over TCP
echo_protocol  asyncio echo, 10 clients x 1 KiB, Protocol server    uvloop over TCP
echo_streams   the same, streams server                             uvloop over TCP, asyncio alone
aiohttp_1      aiohttp hello world, 1 request in flight             uvloop over TCP
aiohttp_4      aiohttp hello world, 4 requests in flight            uvloop over TCP
aiohttp_16     aiohttp hello world, 16 requests in flight           uvloop over TCP
aiohttp_4_load the same, 4 in flight, a third process busy on a core uvloop over TCP, same load
uvicorn        uvicorn (defaults) hello world, http.client          the same programs over TCP
tornado        tornado hello world, http.client keep-alive          the same programs over TCP
threading      http.server threads, a new connection per request    the same programs over TCP
idle_socket    CPU of an idle blocking-socket pair                  (goal: < 1 % of a core)
idle_asyncio   CPU of an idle asyncio pair                          (goal: < 1 % of a core)
scale_asyncio  10,000 idle connections to one asyncio server:       the same programs over TCP
               memory per connection (``_closed``: left after
               they all closed; ``_rate``: connect rate)
scale_threaded the same, 1,000 connections, a threaded server       the same programs over TCP
=============  ===================================================  ================================

The ``scale_*`` rows take minutes: ``--quick`` leaves them out unless
``--rows`` names them.

Each pair of processes is pinned to two cores; peers take turns within each
repeat, and each figure is the repeat with the median median (one repeat
with ``--quick``).  The measurements are those of ``_bench``,
``_bench_socket``, ``_bench_asyncio``, ``_bench_web``, ``_bench_conn`` and
``_bench_zmq``.

    shrimpio bench [--quick] [--json] [--plot FILE.png] [--rows KEY,KEY...]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

from . import (_bench, _bench_asyncio, _bench_conn, _bench_msg, _bench_scale, _bench_socket, _bench_web,
               _bench_zmq)
from ._bench_table import Figure, Row, format_goals, format_noise, format_table, machine_line, pick_median
from ._bench_goals import goals

MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """How much to measure: rounds per timed loop, seconds per rate window,
    repeats per figure."""

    rtt_rounds: int = 50000
    bw_rounds: int = 1000
    connects: int = 3000
    async_rtt_rounds: int = 20000
    seconds: float = 3.0
    idle_seconds: float = 5.0
    repeats: int = 3
    scale_asyncio: int = 10000      # connections of the scale rows
    scale_threaded: int = 1000
    scale: bool = True              # measure the scale rows unless asked for by name


FULL = Settings()
QUICK = Settings(rtt_rounds=5000, bw_rounds=100, connects=300, async_rtt_rounds=3000, seconds=1.0,
                 repeats=1, scale=False)

Measure = Callable[[Settings], Figure]


@dataclass
class Spec:
    """A row to measure: its kinds (subject first) and how to measure each
    once.  ``needs`` names a module without which the row is skipped."""

    key: str
    title: str
    unit: str
    kinds: list[tuple[str, Measure]]
    repeat: bool = True
    needs: str = ""
    slow: bool = False        # left out when Settings.scale is False, unless named


# --- measurements, each once ----------------------------------------------------

def _vmmc(size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n = s.rtt_rounds if size == 64 else s.bw_rounds
        return Figure.from_ns("VMMC", _bench.bench_vmmc(n, size), 0 if size == 64 else MIB)
    return m


def _unix_pair(size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n = s.rtt_rounds if size == 64 else s.bw_rounds
        return Figure.from_ns("Unix", _bench.bench_unix(n, size), 0 if size == 64 else MIB)
    return m


def _floor(s: Settings) -> Figure:
    return Figure.from_ns("floor", _bench.bench_reference(s.rtt_rounds))


def _memcpy(s: Settings) -> Figure:
    return Figure.from_ns("memcpy", _bench.bench_memcpy(s.bw_rounds), MIB)


def _sock(kind: str, label: str, size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n, reply = (s.rtt_rounds, 64) if size == 64 else (s.bw_rounds, 8)
        samples = _bench_socket.run_one(kind, n, size, reply)   # checks shrimpio took shm
        path = {"shrimpio": "shm"}.get(kind, kind)
        return Figure.from_ns(label, samples, 0 if size == 64 else MIB, paths=[path])
    return m


def _sock_poll(kind: str, label: str) -> Measure:
    def m(s: Settings) -> Figure:
        samples = _bench_socket.run_one(kind, s.rtt_rounds, 64, 64, poll=True)
        return Figure.from_ns(label, samples, paths=[{"shrimpio": "shm"}.get(kind, kind)])
    return m


def _zmq(size: int) -> Measure:
    def m(s: Settings) -> Figure:
        n, reply = (s.rtt_rounds, 64) if size == 64 else (s.bw_rounds, 8)
        return Figure.from_ns("zmq ipc", _bench_zmq.bench_zmq(n, size, reply), 0 if size == 64 else MIB)
    return m


def _connect(kind: str, label: str) -> Measure:
    def m(s: Settings) -> Figure:
        res = _bench_conn.bench_connect(kind, s.connects)
        want = {"shrimpio": "shm"}.get(kind, kind)
        if res["paths"] != [want]:
            raise RuntimeError(f"{kind} connections took {res['paths']}, expected {want}")
        return Figure.from_ns(label, res["samples"], paths=res["paths"])
    return m


def _aio(kind: str, test: str) -> Measure:
    label = _bench_asyncio.LABELS[kind]

    def m(s: Settings) -> Figure:
        if test == "rtt":                 # run_one checks each connection's path
            res = _bench_asyncio.run_one(kind, test, s.async_rtt_rounds)
            return Figure.from_ns(label, res["samples"], paths=sorted(set(res["paths"])))
        res = _bench_asyncio.run_one(kind, test, s.seconds)
        extra = {"paths": sorted(set(res["paths"]))}
        if "client_cpu_percent" in res:
            extra["client_cpu_percent"] = res["client_cpu_percent"]
        return Figure(label, res["rps"], None, [res["rps"]], extra)
    return m


def _loaded(measure: Measure) -> Measure:
    """``measure`` while a third process spins on core 1 (the server's)."""
    def m(s: Settings) -> Figure:
        with _busy_core(1):
            return measure(s)
    return m


class _busy_core:
    """A process of pure busy loop pinned to one core, for as long as the
    ``with`` lasts (a machine that is busy with something else)."""

    def __init__(self, core: int) -> None:
        self.core = core

    def __enter__(self) -> "_busy_core":
        import subprocess
        code = (f"import os\ntry:\n    os.sched_setaffinity(0, {{{self.core}}})\n"
                "except OSError:\n    pass\nwhile True:\n    pass\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


def _web(framework: str, kind: str) -> Measure:
    label = _bench_web.LABELS[kind]

    def m(s: Settings) -> Figure:
        res = _bench_web.run_one(framework, kind, s.seconds)   # checks both ends' paths
        extra = {k: res[k] for k in ("median_us", "p99_us", "n", "client_cpu_percent", "server_cpu_percent")}
        extra["paths"] = sorted(set(res["paths"]))
        return Figure(label, res["rps"], None, [res["rps"]], extra)
    return m


def _streams_bound(s: Settings) -> Figure:
    rate = _bench_asyncio.streams_bound(s.seconds)
    return Figure("asyncio alone", rate, None, [rate])


def _idle(kind: str) -> Measure:
    def m(s: Settings) -> Figure:
        res = _bench_conn.idle_pair(kind, s.idle_seconds)
        if set(res["paths"]) != {"shm"}:
            raise RuntimeError(f"idle {kind} pair took {res['paths']}, expected shm")
        return Figure("shm", res["percent"], None, [res["percent"]],
                      {"per_process": res["per_process"], "paths": res["paths"], "seconds": s.idle_seconds})
    return m


_scale_runs = _bench_scale.Runs()


def _scale(mode: str, kind: str, suffix: str) -> Measure:
    label = _bench_scale.LABELS[kind]

    def m(s: Settings) -> Figure:
        n = s.scale_asyncio if mode == "asyncio" else s.scale_threaded
        value, extra = _bench_scale.figure_values(_scale_runs.get(mode, kind, suffix, n), suffix)
        extra["paths"] = [label.lower()]
        return Figure(label, value, None, [value], extra)
    return m


def specs() -> list[Spec]:
    """Every row, in the order of the table."""
    a = _bench_asyncio
    sock = [("shm", "shrimpio"), ("TCP", "tcp"), ("Unix", "unix")]
    return [
        Spec("vmmc_rtt", "VMMC 64 B put+notify round trip", "us",
             [("VMMC", _vmmc(64)), ("Unix", _unix_pair(64)), ("floor", _floor)]),
        Spec("vmmc_bw", "VMMC 1 MiB put + 8 B ack", "MiB/s",
             [("VMMC", _vmmc(MIB)), ("Unix", _unix_pair(MIB)), ("memcpy", _memcpy)]),
        Spec("socket_rtt", "socket 64 B round trip", "us",
             [(lb, _sock(k, lb, 64)) for lb, k in sock] + [("zmq ipc", _zmq(64)), ("floor", _floor)]),
        Spec("socket_bw", "socket 1 MiB sendall + 8 B ack", "MiB/s",
             [(lb, _sock(k, lb, MIB)) for lb, k in sock] + [("zmq ipc", _zmq(MIB))]),
        Spec("socket_poll_rtt", "socket 64 B round trip, epoll before each read", "us",
             [(lb, _sock_poll(k, lb)) for lb, k in sock]),
        Spec("connect", "connect+accept+close", "us", [(lb, _connect(k, lb)) for lb, k in sock]),
        Spec("asyncio_rtt", "asyncio streams 64 B round trip", "us",
             [(a.LABELS[k], _aio(k, "rtt")) for k in a.KINDS]),
        Spec("echo_protocol", a.echo_title("protocol"), "req/s",
             [(a.LABELS[k], _aio(k, "echo-protocol")) for k in a.KINDS]),
        Spec("echo_streams", a.echo_title("streams"), "req/s",
             [(a.LABELS[k], _aio(k, "echo-streams")) for k in a.KINDS]
             + [("asyncio alone", _streams_bound)]),
    ] + [
        Spec(f"aiohttp_{n}", a.aiohttp_title(n), "req/s",
             [(a.LABELS[k], _aio(k, f"aiohttp-{n}")) for k in a.KINDS], needs="aiohttp")
        for n in a.HTTP_IN_FLIGHT
    ] + [
        Spec("aiohttp_4_load", a.aiohttp_title(4) + ", a core busy", "req/s",
             [(a.LABELS[k], _loaded(_aio(k, "aiohttp-4"))) for k in a.KINDS], needs="aiohttp"),
    ] + [
        Spec(fw, _bench_web.title(fw), "req/s",
             [(_bench_web.LABELS[k], _web(fw, k)) for k in _bench_web.KINDS], needs=fw)
        for fw in _bench_web.FRAMEWORKS
    ] + [
        Spec("idle_socket", "idle CPU, blocking socket pair", "%", [("shm", _idle("socket"))], repeat=False),
        Spec("idle_asyncio", "idle CPU, asyncio pair", "%", [("shm", _idle("asyncio"))], repeat=False),
    ] + _bench_msg.specs(Spec, Figure) + [
        Spec(_bench_scale.row_key(mode, suffix),
             _bench_scale.row_title(mode, suffix, getattr(FULL, f"scale_{mode}")), unit,
             [(_bench_scale.LABELS[k], _scale(mode, k, suffix)) for k in _bench_scale.KINDS], slow=True)
        for mode in _bench_scale.MODES for suffix, _, unit in _bench_scale.ROWS
    ]


ROW_KEYS = tuple(sp.key for sp in specs())


# --- progress ---------------------------------------------------------------------

class Progress:
    """``[n/total] row: peer`` on ``stream``: rewritten in place on a
    terminal, one plain line per step otherwise."""

    def __init__(self, total: int, stream: Optional[TextIO] = None) -> None:
        self.total, self.n = total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, text: str) -> None:
        """Announce the next measurement."""
        self.n += 1
        line = f"[{self.n}/{self.total}] {text}"
        self.stream.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Clear the progress line (on a terminal)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --- the run ------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """Versions of shrimpio and of the peers' packages."""
    from . import __version__
    out = {"shrimpio": __version__}
    for dist in ("uvloop", "aiohttp", "uvicorn", "h11", "httptools", "tornado"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["pyzmq"] = _bench_zmq.version()
    out.update(_bench_msg.versions())
    return out


def _measure_row(sp: Spec, s: Settings, progress: Progress) -> tuple[Optional[Row], dict[str, str]]:
    """One row (None if its subject failed) and, per kind, why it is missing."""
    missing: dict[str, str] = {}
    runs: dict[str, list[Figure]] = {label: [] for label, _ in sp.kinds}
    repeats = s.repeats if sp.repeat else 1
    for rep in range(repeats):
        for label, measure in sp.kinds:
            if label == "zmq ipc" and not _bench_zmq.available():
                missing[label] = "pyzmq not installed"
                continue
            if label in missing:
                continue
            progress.step(f"{sp.title}: {label}" + (f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""))
            try:
                runs[label].append(measure(s))
            except _bench_msg.NotInstalled as exc:
                missing[label] = str(exc)
            except Exception as exc:       # the rest of the matrix still runs
                missing[label] = f"failed: {type(exc).__name__}: {exc}"
    subject = sp.kinds[0][0]
    if subject in missing:
        return None, missing
    figs = [pick_median(r) for label, r in runs.items() if r and label not in missing]
    return Row(sp.key, sp.title, sp.unit, figs, dict(missing)), missing


def _steps(sp: Spec, s: Settings) -> int:
    n = sum(1 for label, _ in sp.kinds if label != "zmq ipc" or _bench_zmq.available())
    return n * (s.repeats if sp.repeat else 1)


def chosen_specs(settings: Settings, rows: Optional[list[str]] = None) -> list[Spec]:
    """The rows to measure: those named, else all (less the slow ones when
    ``settings.scale`` is off, as with ``--quick``)."""
    return [sp for sp in specs() if (sp.key in rows if rows is not None else settings.scale or not sp.slow)]


def run(settings: Settings = FULL, rows: Optional[list[str]] = None,
        progress: Optional[Progress] = None) -> dict[str, Any]:
    """Measure the chosen rows (all by default) in a private registry; a
    JSON-ready dict with the machine, each row, the goals and the wall time."""
    global _scale_runs
    _scale_runs = _bench_scale.Runs()
    chosen = chosen_specs(settings, rows)
    skipped: list[dict[str, str]] = []
    todo = []
    for sp in chosen:
        if sp.needs and importlib.util.find_spec(sp.needs) is None:
            skipped.append({"key": sp.key, "title": sp.title, "reason": f"{sp.needs} not installed"})
        else:
            todo.append(sp)
    if progress is None:
        progress = Progress(sum(_steps(sp, settings) for sp in todo))
    res: dict[str, Any] = {"machine": _bench.machine(), "versions": versions(),
                           "load_before": os.getloadavg()[0], "settings": dataclasses.asdict(settings)}
    if any(sp.needs == "aiohttp" for sp in todo):
        import aiohttp  # noqa: F401  (once, before the forks, as bench-asyncio does)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    t0 = time.monotonic()
    out: list[Row] = []
    try:
        with _bench.private_registry():
            for sp in todo:
                row, missing = _measure_row(sp, settings, progress)
                if row is None:
                    skipped.append({"key": sp.key, "title": sp.title, "reason": missing[sp.kinds[0][0]]})
                else:
                    out.append(row)
    finally:
        progress.done()
        if affinity is not None:
            os.sched_setaffinity(0, affinity)   # the measurements pinned this process
    res["wall_s"] = time.monotonic() - t0
    res["rows"] = [r.to_json() for r in out]
    res["skipped_rows"] = skipped
    res["goals"] = [g.to_json() for g in goals({r.key: r for r in out})]
    return res


def report(res: dict[str, Any]) -> str:
    """The text form of :func:`run`'s result: machine, table, goals."""
    rows = [Row.from_json(r) for r in res["rows"]]
    v = res["versions"]
    s = res["settings"]
    lines = [machine_line(res["machine"], res["load_before"]),
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"each pair pinned to two cores; each figure the median of {s['repeats']} repeat(s); "
             f"idle CPU over {s['idle_seconds']:g} s", "",
             format_table(rows)]
    lines += [f"{r['title']}: skipped, {r['reason']}" for r in res["skipped_rows"]]
    noise = format_noise(rows)
    if noise:
        lines += ["", noise]
    lines += ["", format_goals(goals({r.key: r for r in rows})), "",
              f"wall time {res['wall_s']:.0f} s"]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``shrimpio bench``."""
    ap.add_argument("--quick", action="store_true", help="fewer rounds, one repeat (under a minute)")
    ap.add_argument("--json", action="store_true", help="print JSON to stdout")
    ap.add_argument("--plot", metavar="FILE.png", help="also write a chart (needs matplotlib)")
    ap.add_argument("--rows", metavar="KEY,...",
                    help="measure only these rows: " + ", ".join(ROW_KEYS))


def main(args: argparse.Namespace, settings: Optional[Settings] = None) -> int:
    """Run ``shrimpio bench``; the exit status."""
    rows = None
    if args.rows:
        rows = [k.strip() for k in args.rows.split(",") if k.strip()]
        unknown = [k for k in rows if k not in ROW_KEYS]
        if unknown or not rows:
            print(f"shrimpio bench: unknown row(s) {', '.join(unknown) or '(none given)'}; "
                  f"rows are: {', '.join(ROW_KEYS)}", file=sys.stderr)
            return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before a run of minutes, not after)
        except ImportError:
            print("shrimpio bench: --plot needs matplotlib, which is not installed "
                  "(pip install 'shrimpio[bench]')", file=sys.stderr)
            return 2
    res = run(settings or (QUICK if args.quick else FULL), rows)
    print(json.dumps(res, indent=2) if args.json else report(res))
    if args.plot:
        from ._bench_plot import plot
        plot(res, args.plot)
        print(f"shrimpio bench: chart written to {args.plot}", file=sys.stderr)
    failed = any(r["reason"].startswith("failed") for r in res["skipped_rows"]) or any(
        why.startswith("failed") for r in res["rows"] for why in r["skipped"].values())
    return 1 if failed else 0
