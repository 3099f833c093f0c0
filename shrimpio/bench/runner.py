"""``shrimpio bench``: every benchmark of the project in one run, with its peers.

Rows (``--rows`` picks some; docs/bench.md says what each measures).  Each
family of rows is a module of ``shrimpio.bench.rows`` that gives their
:class:`~shrimpio.bench.spec.Spec` objects; this module measures them, in this
order:

===============  ===================================================  ================================
key              measurement                                          peers
===============  ===================================================  ================================
vmmc_rtt         VMMC 64 B put+notify round trip                      Unix socket, Cython spin loop
vmmc_bw          VMMC 1 MiB put + 8 B ack                             Unix socket, one memcpy
socket_rtt       blocking socket 64 B round trip                      TCP, Unix, pyzmq ipc, spin loop
socket_bw_64k    blocking socket 64 KiB sendall + 8 B ack             TCP, Unix, one memcpy
socket_bw        the same, 1 MiB                                      TCP, Unix, pyzmq ipc, one memcpy
socket_bw_16m    the same, 16 MiB                                     TCP, Unix, one memcpy
socket_poll_rtt  64 B round trip, epoll before each read              TCP, Unix
socket_idle_rtt  the same, 1,000 idle connections also registered    TCP, Unix
connect          connect + accept + both close, per connection        TCP, Unix
asyncio_rtt      asyncio streams 64 B round trip                      uvloop over TCP
echo_protocol    asyncio echo, 10 clients x 1 KiB, Protocol server    uvloop over TCP
echo_streams     the same, streams server                             uvloop over TCP, asyncio alone
aiohttp_1        aiohttp hello world, 1 request in flight             uvloop over TCP
aiohttp_4        aiohttp hello world, 4 requests in flight            uvloop over TCP
aiohttp_16       aiohttp hello world, 16 requests in flight           uvloop over TCP
aiohttp_4_load   the same, 4 in flight, a third process busy on a core uvloop over TCP, same load
uvicorn          uvicorn (defaults) hello world, http.client          the same programs over TCP
tornado          tornado hello world, http.client keep-alive          the same programs over TCP
threading        http.server threads, a new connection per request    the same programs over TCP
idle_socket      CPU of an idle blocking-socket pair                  (goal: < 1 % of a core)
idle_asyncio     CPU of an idle asyncio pair                          (goal: < 1 % of a core)
msg_rtt          shrimpio.msg 64 B object round trip                  mp.Pipe, pyzmq, mpi4py
msg_artt         shrimpio.msg 64 B round trip with await              asyncio streams over shm
msg_1m, msg_64m  shrimpio.msg numpy array + 8 B ack                   mp.Pipe, pyzmq, mpi4py, memcpy
scale_asyncio    10,000 idle connections to one asyncio server:       the same programs over TCP
                 memory per connection (``_closed``: left after
                 they all closed; ``_rate``: connect rate)
scale_threaded   the same, 1,000 connections, a threaded server       the same programs over TCP
===============  ===================================================  ================================

The ``scale_*`` rows take minutes: ``--quick`` leaves them out unless
``--rows`` names them.

Each pair of processes is pinned to two cores; peers take turns within each
repeat, and each figure is the repeat with the median median (one repeat
with ``--quick``); each ratio is given per repeat too, and the goals
(``goals``) read the worst repeat.

    shrimpio bench [--quick] [--json] [--plot FILE.png] [--rows KEY,KEY...]
    python -m shrimpio.bench [the same options]
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
from typing import Any, Optional, TextIO

from .common import machine, private_registry
from .goals import goals
from .rows import aio, connect, msg, scale, sockets, vmmc, web, zmq_ipc
from .spec import FULL, QUICK, NotInstalled, Settings, Spec
from .table import Figure, Row, format_goals, format_noise, format_table, machine_line, pick_median

__all__ = ["FULL", "QUICK", "ROW_KEYS", "Progress", "Settings", "Spec", "add_arguments", "chosen_specs", "main",
           "report", "run", "specs"]


def specs() -> list[Spec]:
    """Every row, in the order of the table."""
    return (vmmc.specs() + sockets.specs() + connect.specs() + aio.specs() + web.specs() + connect.idle_specs()
            + msg.specs(Spec, Figure) + scale.specs())


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
    from .. import __version__
    out = {"shrimpio": __version__}
    for dist in ("uvloop", "aiohttp", "uvicorn", "h11", "httptools", "tornado"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["pyzmq"] = zmq_ipc.version()
    out.update(msg.versions())
    return out


def _measure_row(sp: Spec, s: Settings, progress: Progress) -> tuple[Optional[Row], dict[str, str]]:
    """One row (None if its subject failed) and, per kind, why it is missing."""
    missing: dict[str, str] = {}
    runs: dict[str, list[Figure]] = {label: [] for label, _ in sp.kinds}
    repeats = s.repeats if sp.repeat else 1
    for rep in range(repeats):
        for label, measure in sp.kinds:
            if label in missing:
                continue
            progress.step(f"{sp.title}: {label}" + (f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""))
            try:
                runs[label].append(measure(s))
            except (NotInstalled, msg.NotInstalled) as exc:
                missing[label] = str(exc)
            except Exception as exc:       # the rest of the matrix still runs
                missing[label] = f"failed: {type(exc).__name__}: {exc}"
            if label in missing:
                progress.total -= repeats - rep - 1      # its later repeats are not measured
    subject = sp.kinds[0][0]
    if subject in missing:
        return None, missing
    figs = [pick_median(r) for label, r in runs.items() if r and label not in missing]
    return Row(sp.key, sp.title, sp.unit, figs, dict(missing)), missing


def _steps(sp: Spec, s: Settings) -> int:
    return len(sp.kinds) * (s.repeats if sp.repeat else 1)


def chosen_specs(settings: Settings, rows: Optional[list[str]] = None) -> list[Spec]:
    """The rows to measure: those named, else all (less the slow ones when
    ``settings.scale`` is off, as with ``--quick``)."""
    return [sp for sp in specs() if (sp.key in rows if rows is not None else settings.scale or not sp.slow)]


def run(settings: Settings = FULL, rows: Optional[list[str]] = None,
        progress: Optional[Progress] = None) -> dict[str, Any]:
    """Measure the chosen rows (all by default) in a private registry; a
    JSON-ready dict with the machine, each row, the goals and the wall time."""
    scale.new_run()
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
    res: dict[str, Any] = {"machine": machine(), "versions": versions(),
                           "load_before": os.getloadavg()[0], "settings": dataclasses.asdict(settings)}
    if any(sp.needs == "aiohttp" for sp in todo):
        import aiohttp  # noqa: F401  (once, before the forks, as bench-asyncio does)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    t0 = time.monotonic()
    out: list[Row] = []
    try:
        with private_registry():
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
        from .plot import plot
        plot(res, args.plot)
        print(f"shrimpio bench: chart written to {args.plot}", file=sys.stderr)
    failed = any(r["reason"].startswith("failed") for r in res["skipped_rows"]) or any(
        why.startswith("failed") for r in res["rows"] for why in r["skipped"].values())
    return 1 if failed else 0
