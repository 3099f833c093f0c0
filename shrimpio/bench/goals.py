"""The performance goals of the issues, checked against a run's rows.

Each goal reads one or two rows of ``shrimpio bench`` (by key, see
``runner``) and says whether this run met it, in its worst repeat
(a goal is met only if it held in every repeat); a goal whose rows were
not measured is reported as such (``met`` is None).
"""

from __future__ import annotations

from typing import Callable, Optional

from .rows.msg import GOALS as _MSG_GOALS
from .table import Goal, Row, fmt, fmt_ratio

__all__ = ["GOALS", "goals"]

Rows = dict[str, Row]


def _ratio(rows: Rows, key: str, peer: str) -> Optional[float]:
    """The subject's advantage over ``peer`` in the row's worst repeat: a
    goal holds only if it held in every run."""
    row = rows.get(key)
    if row is None:
        return None
    try:
        return row.worst_ratio(row.peer(peer))
    except KeyError:
        return None


def _at_least(key: str, peer: str, target: float) -> Callable[[Rows], tuple[str, Optional[bool]]]:
    def check(rows: Rows) -> tuple[str, Optional[bool]]:
        r = _ratio(rows, key, peer)
        return (fmt_ratio(r), None if r is None else r >= target)
    return check


def _near_floor(rows: Rows) -> tuple[str, Optional[bool]]:
    r = _ratio(rows, "socket_rtt", "floor")
    if r is None:
        return "-", None
    return f"{1 / r:.1f}x the floor", 1 / r <= 8


def _echo(rows: Rows) -> tuple[str, Optional[bool]]:
    got = [(server, _ratio(rows, f"echo_{server}", "uvloop TCP")) for server in ("protocol", "streams")]
    got = [(server, r) for server, r in got if r is not None]
    if not got:
        return "-", None
    text = ", ".join(f"{fmt_ratio(r)} {server}" for server, r in got)
    bound = _ratio_of(rows, "echo_streams", "asyncio alone", "uvloop TCP")
    if bound is not None:
        # What no transport can pass: asyncio's streams code on its own.
        text += f" (streams bound {fmt_ratio(bound)}"
        cpu = _server_cpu_us(rows, "echo_streams", ("shm", "uvloop TCP", "asyncio alone"))
        if cpu is not None:
            # A server busy all the time runs at its share of the core over
            # its CPU per request: with the peer's share, the ratio is at
            # most TCP's CPU per request over asyncio's own.
            shm, tcp, alone = cpu
            text += (f"; server CPU/request {fmt(shm)} vs {fmt(tcp)} us, asyncio alone {fmt(alone)} us:"
                     f" at most {fmt_ratio(tcp / alone)} at equal CPU")
        text += ")"
    return text, all(r >= 3 for _, r in got)


def _server_cpu_us(rows: Rows, key: str, labels: tuple[str, ...]) -> Optional[tuple[float, ...]]:
    """The server CPU per request of each figure of a row, or None if one
    lacks it."""
    row = rows.get(key)
    if row is None:
        return None
    by_label = {f.label: f for f in row.figures}
    got = tuple(by_label[label].extra.get("server_cpu_us") if label in by_label else None for label in labels)
    return None if any(x is None or x <= 0 for x in got) else got


def _ratio_of(rows: Rows, key: str, a: str, b: str) -> Optional[float]:
    """How many times better peer ``a`` of a row is than peer ``b``."""
    row = rows.get(key)
    if row is None:
        return None
    try:
        x, y = row.peer(a).median, row.peer(b).median
    except KeyError:
        return None
    if row.lower_is_better:
        x, y = y, x
    return x / y if x > 0 and y > 0 else None


def _aiohttp(rows: Rows) -> tuple[str, Optional[bool]]:
    parts, met = [], []
    keys = [k for k in rows if k.startswith("aiohttp_")]
    for key in sorted(keys, key=lambda k: (k.endswith("_load"), int(k.split("_")[1]))):
        r = _ratio(rows, key, "uvloop TCP")
        if r is None:
            continue
        text = f"{fmt_ratio(r)} " + ("4 in flight, a core busy" if key.endswith("_load")
                                     else f"{key.partition('_')[2]} in flight")
        busy = [f.extra.get("client_cpu_percent") for f in rows[key].figures]
        if all(b is not None for b in busy):
            # A client that is busy all the time sets the rate itself.
            text += " (client CPU " + "/".join(f"{b:.0f}%" for b in busy) + ")"
        parts.append(text)
        met.append(r >= 1.5)
    if not parts:
        return "-", None
    return ", ".join(parts), all(met)


def _web(framework: str, target: float = 1.5) -> Callable[[Rows], tuple[str, Optional[bool]]]:
    """A framework's row: the ratio, each kind's p99 request time and the
    client's and server's CPU (a side busy all the time sets the rate)."""
    def check(rows: Rows) -> tuple[str, Optional[bool]]:
        r = _ratio(rows, framework, "TCP")
        if r is None:
            return "-", None
        figs = rows[framework].figures
        text = fmt_ratio(r)
        p99 = [f.extra.get("p99_us") for f in figs]
        if all(x is not None for x in p99):
            med = [f.extra.get("median_us") for f in figs]
            if all(x is not None for x in med):
                text += " (median " + " vs ".join(fmt(x) for x in med) + " us; "
            else:
                text += " ("
            text += "p99 " + " vs ".join(fmt(x) for x in p99) + " us"
            slow = [f.extra.get("slow_time_percent") for f in figs]
            if all(x is not None for x in slow):
                # Requests over 1 ms: on a loaded host, waits for a CPU.
                text += "; time in requests > 1 ms " + "/".join(f"{x:.0f}%" for x in slow)
            cpu = [(f.extra.get("client_cpu_percent"), f.extra.get("server_cpu_percent")) for f in figs]
            if all(c is not None and s is not None for c, s in cpu):
                text += "; CPU client " + "/".join(f"{c:.0f}%" for c, _ in cpu)
                text += ", server " + "/".join(f"{s:.0f}%" for _, s in cpu)
            text += ")"
        return text, r >= target
    return check


def _bandwidth(rows: Rows) -> tuple[str, Optional[bool]]:
    """The 1 MiB row against Unix (the goal), with the 64 KiB and 16 MiB
    rows' ratios beside it when they were measured."""
    text, met = _at_least("socket_bw", "Unix", 2)(rows)
    others = [(name, _ratio(rows, key, "Unix")) for name, key in (("64 KiB", "socket_bw_64k"),
                                                                ("16 MiB", "socket_bw_16m"))]
    others = [(name, r) for name, r in others if r is not None]
    if met is not None and others:
        text += " (" + ", ".join(f"{name} {fmt_ratio(r)}" for name, r in others) + ")"
    return text, met


def _connect(rows: Rows) -> tuple[str, Optional[bool]]:
    row = rows.get("connect")
    r = _ratio(rows, "connect", "TCP")
    if row is None or r is None:
        return "-", None
    return f"{fmt(row.subject.median)} vs {fmt(row.peer('TCP').median)} us", r >= 1


def _idle(rows: Rows) -> tuple[str, Optional[bool]]:
    got = [(name, rows[key].subject.median) for name, key in (("blocking", "idle_socket"),
                                                              ("asyncio", "idle_asyncio")) if key in rows]
    if not got:
        return "-", None
    return ", ".join(f"{pct:.2f}% {name}" for name, pct in got), all(pct < 1 for _, pct in got)


def _scale_pairs(rows: Rows, suffix: str) -> list[tuple[str, float, float]]:
    """(mode, shm's figure, TCP's) of the scale rows measured."""
    out = []
    for mode in ("asyncio", "threaded"):
        row = rows.get(f"scale_{mode}{suffix}")
        if row is None:
            continue
        try:
            out.append((mode, row.subject.median, row.peer("TCP").median))
        except KeyError:
            continue
    return out


def _scale_memory(rows: Rows) -> tuple[str, Optional[bool]]:
    got = _scale_pairs(rows, "")
    if not got:
        return "-", None
    text = ", ".join(f"{_ratio_text(shm / tcp, 2.0)}x {mode} ({fmt(shm)} vs {fmt(tcp)} KB)"
                     for mode, shm, tcp in got)
    return text, all(shm <= 2 * tcp for _, shm, tcp in got)


def _ratio_text(ratio: float, limit: float) -> str:
    """`ratio` with two decimals, or as many more as it takes (up to 4) not
    to print the limit itself for a ratio on the wrong side of it (a goal
    missed by 0.3 % must not read "2.00x ... MISSED")."""
    for digits in (2, 3, 4):
        text = f"{ratio:.{digits}f}"
        if (float(text) == limit) == (ratio == limit):
            break
    return text


#: Memory a closed connection may leave behind beyond what one over TCP
#: leaves (KB): the processes' allocators keep some of what the
#: connections' objects used, over TCP too (docs/bench.md, "Scale").
CLOSED_SLACK_KB = 1.0


def _scale_closed(rows: Rows) -> tuple[str, Optional[bool]]:
    got = _scale_pairs(rows, "_closed")
    if not got:
        return "-", None
    text = ", ".join(f"{fmt(shm)} vs {fmt(tcp)} KB {mode}" for mode, shm, tcp in got)
    return text, all(shm <= tcp + CLOSED_SLACK_KB for _, shm, tcp in got)


def _scale_rate(rows: Rows) -> tuple[str, Optional[bool]]:
    got = _scale_pairs(rows, "_rate")
    if not got:
        return "-", None
    text = ", ".join(f"{shm / tcp:.2f}x {mode} ({fmt(shm)} vs {fmt(tcp)}/s)" for mode, shm, tcp in got)
    return text, all(shm >= tcp for _, shm, tcp in got)


#: (what the issue asks, how to check it on a run's rows).
GOALS: list[tuple[str, Callable[[Rows], tuple[str, Optional[bool]]]]] = [
    ("socket 64 B rtt >= 30x faster than kernel TCP", _at_least("socket_rtt", "TCP", 30)),
    ("socket 64 B rtt within 8x of the Cython spin loop", _near_floor),
    ("socket rtt polling before each read >= 3x kernel TCP", _at_least("socket_poll_rtt", "TCP", 3)),
    ("the same with 1000 idle connections >= 3x kernel TCP", _at_least("socket_idle_rtt", "TCP", 3)),
    ("asyncio streams rtt >= 8x faster than uvloop TCP", _at_least("asyncio_rtt", "uvloop TCP", 8)),
    ("asyncio echo >= 3x uvloop TCP", _echo),
    ("aiohttp >= 1.5x uvloop TCP", _aiohttp),
    ("uvicorn (defaults) >= 1.5x its kernel TCP speed", _web("uvicorn")),
    ("tornado >= 1.5x its kernel TCP speed", _web("tornado")),
    ("a connection per request (http.server) >= 1.2x TCP", _web("threading", 1.2)),
    ("socket 1 MiB bandwidth >= 2x Unix socket", _bandwidth),
    ("VMMC 1 MiB put near one memcpy (>= 0.8x its rate)", _at_least("vmmc_bw", "memcpy", 0.8)),
    ("connect+accept no slower than kernel TCP", _connect),
    ("idle connected pair < 1% of a core", _idle),
    ("memory per idle connection within 2x of TCP's", _scale_memory),
    ("after close, memory back to baseline (as TCP's, +1 KB)", _scale_closed),
    ("connect rate at scale no worse than TCP's", _scale_rate),
] + _MSG_GOALS


def goals(rows: Rows) -> list[Goal]:
    """Each goal with this run's figure and whether it was met."""
    out = []
    for text, check in GOALS:
        value, met = check(rows)
        out.append(Goal(text, value, met))
    return out
