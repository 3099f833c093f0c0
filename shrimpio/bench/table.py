"""The result model and table printer shared by every shrimpio benchmark.

A benchmark produces :class:`Row`\\ s.  A row is one measurement (say "socket
64 B round trip") in one unit; its first :class:`Figure` is the subject
(shrimpio, or VMMC) and the others are its peers, measured in the same run.
Each figure has a median, usually a p99, and the per-repeat medians it was
chosen from.  The ratio to a peer says how many times *better* the subject
is: faster for times and CPU use, more for rates (so above 1 means the
subject wins).

:func:`format_table` prints rows as::

    socket 64 B round trip   [us]  shm    0.86  p99  1.50 | TCP 85.7 (99x) | Unix 68.9 (80x)

and :func:`machine_line` the machine they ran on.  ``pingpong``,
``bench-socket``, ``bench-asyncio`` and ``bench`` all print through here.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

__all__ = ["Figure", "Goal", "NOISY_SPREAD", "Row", "UNITS", "fmt", "fmt_ratio", "format_goals", "format_noise",
           "format_table", "from_stats", "machine_line", "pick_median"]

#: unit -> True when lower is better.
UNITS = {"us": True, "%": True, "KB": True, "MiB/s": False, "req/s": False, "conn/s": False}


def fmt(x: Optional[float]) -> str:
    """A figure with three or so significant digits (``-`` for none)."""
    if x is None:
        return "-"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(r: Optional[float]) -> str:
    """``99x``, ``3.20x``, ``0.45x`` (``-`` when a ratio cannot be taken)."""
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 10 else f"{r:.2f}x"


@dataclass
class Figure:
    """One measured figure in its row's unit.

    ``runs`` holds the median of each repeat (the figure is the repeat with
    the median median); ``extra`` anything else worth keeping (sample
    count, the connection paths that were checked...)."""

    label: str
    median: float
    p99: Optional[float] = None
    runs: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_ns(cls, label: str, samples_ns: Sequence[int], nbytes: int = 0,
                **extra: Any) -> "Figure":
        """From per-operation times in nanoseconds: microseconds, or MiB/s
        when each operation moved ``nbytes`` (then p99 is the rate of the
        99th-percentile, i.e. slow-tail, operation)."""
        s = sorted(samples_ns)
        if not s:
            raise ValueError(f"{label}: no samples")
        med_us = statistics.median(s) / 1000
        p99_us = s[min(len(s) - 1, int(len(s) * 0.99))] / 1000
        extra = dict(extra, n=len(s))
        if nbytes:
            rate = nbytes / (1 << 20) * 1e6
            return cls(label, rate / med_us, rate / p99_us if p99_us else None, [rate / med_us], extra)
        return cls(label, med_us, p99_us, [med_us], extra)


def from_stats(label: str, stats: dict[str, Any], nbytes: int = 0) -> Figure:
    """From a ``{"median_us", "p99_us", "n"}`` dict (``common.stats``), as
    :meth:`Figure.from_ns` would have made it."""
    med, p99 = stats["median_us"], stats["p99_us"]
    extra = {"n": stats["n"]} if "n" in stats else {}
    if nbytes:
        rate = nbytes / (1 << 20) * 1e6
        return Figure(label, rate / med, rate / p99 if p99 else None, [rate / med], extra)
    return Figure(label, med, p99, [med], extra)


def pick_median(runs: Sequence[Figure]) -> Figure:
    """The repeat with the median median, remembering every repeat's median
    (the machine is noisy: one repeat is rarely representative)."""
    if not runs:
        raise ValueError("no runs")
    chosen = sorted(runs, key=lambda f: f.median)[len(runs) // 2]
    return Figure(chosen.label, chosen.median, chosen.p99, [f.median for f in runs], dict(chosen.extra))


@dataclass
class Row:
    """One measurement: the subject's figure first, then its peers.

    ``skipped`` names peers that were not measured and why (``pyzmq not
    installed``)."""

    key: str
    title: str
    unit: str
    figures: list[Figure]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def lower_is_better(self) -> bool:
        """Times and CPU use: lower is better; rates: higher."""
        return UNITS[self.unit]

    @property
    def subject(self) -> Figure:
        """The figure the row is about (shrimpio's)."""
        return self.figures[0]

    @property
    def peers(self) -> list[Figure]:
        """The figures the subject is compared with."""
        return self.figures[1:]

    def peer(self, label: str) -> Figure:
        """The peer called ``label``."""
        for f in self.peers:
            if f.label == label:
                return f
        raise KeyError(f"{self.key}: no peer {label!r}")

    def ratio(self, peer: Figure) -> Optional[float]:
        """How many times better the subject is than ``peer`` (None if a
        figure is zero)."""
        a, b = self.subject.median, peer.median
        if self.lower_is_better:
            a, b = b, a
        return a / b if b > 0 and a > 0 else None

    def run_ratios(self, peer: Figure) -> list[float]:
        """The ratio in each repeat (a repeat measures the subject and then
        each peer, so the i-th medians belong together); empty when the
        figures' repeats do not pair up."""
        a_runs, b_runs = self.subject.runs, peer.runs
        if len(a_runs) != len(b_runs):
            return []
        out = []
        for a, b in zip(a_runs, b_runs):
            if self.lower_is_better:
                a, b = b, a
            if a > 0 and b > 0:
                out.append(a / b)
        return out if len(out) == len(a_runs) else []

    def worst_ratio(self, peer: Figure) -> Optional[float]:
        """The subject's advantage over ``peer`` in its worst repeat (the
        median's ratio when there was one repeat): a regression under
        contention shows here even when the median hides it."""
        runs = self.run_ratios(peer)
        return min(runs) if runs else self.ratio(peer)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the figures plus the ratio to each peer, per
        repeat, and the worst."""
        return {"key": self.key, "title": self.title, "unit": self.unit,
                "better": "lower" if self.lower_is_better else "higher",
                "figures": [asdict(f) for f in self.figures],
                "ratios": {f.label: self.ratio(f) for f in self.peers},
                "run_ratios": {f.label: self.run_ratios(f) for f in self.peers},
                "worst_ratios": {f.label: self.worst_ratio(f) for f in self.peers},
                "skipped": dict(self.skipped)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Row":
        """The inverse of :meth:`to_json` (ratios are recomputed)."""
        return cls(d["key"], d["title"], d["unit"], [Figure(**f) for f in d["figures"]], dict(d["skipped"]))


@dataclass
class Goal:
    """A target of the issue and whether this run met it (None: the rows it
    needs were not measured)."""

    text: str
    value: str
    met: Optional[bool]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def machine_line(m: dict[str, Any], load: Optional[float] = None) -> str:
    """``machine: <cpu>, N cores, Python x, Linux y[; load average z at the start]``."""
    line = f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Linux {m['kernel']}"
    if load is not None:
        line += f"; load average {load:.2f} at the start"
    return line


def format_table(rows: Iterable[Row], note: bool = True) -> str:
    """One line per row: title, unit, the subject's median and p99, then each
    peer's median with the subject's advantage over it; skipped peers last."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    tw = max(len(r.title) for r in rows)
    uw = max(len(r.unit) for r in rows) + 2
    lw = max(len(r.subject.label) for r in rows)
    vw = max(len(fmt(r.subject.median)) for r in rows)
    pw = max(len(fmt(r.subject.p99)) for r in rows)
    lines = []
    if note:
        lines.append("(Nx) after a peer: how many times better the first figure is "
                     "(faster for us and %, more for MiB/s and req/s); runs: the same in each repeat")
    for r in rows:
        s = r.subject
        head = (f"{r.title:<{tw}}  {'[' + r.unit + ']':<{uw}} {s.label:<{lw}} {fmt(s.median):>{vw}}"
                f"  p99 {fmt(s.p99):>{pw}}")
        parts = [f"{p.label} {fmt(p.median)} ({_ratios(r, p)})" for p in r.peers]
        parts += [f"{label}: {why}" for label, why in r.skipped.items()]
        lines.append(" | ".join([head, *parts]))
    return "\n".join(lines)


def _ratios(row: Row, peer: Figure) -> str:
    """``55x``, or with several repeats ``55x, runs 53x 55x 57x``."""
    text = fmt_ratio(row.ratio(peer))
    runs = row.run_ratios(peer)
    if len(runs) > 1:
        text += ", runs " + " ".join(fmt_ratio(x) for x in runs)
    return text


#: Repeats of one figure further apart than this make its row "noisy".
NOISY_SPREAD = 1.5


def format_noise(rows: Iterable[Row], limit: float = NOISY_SPREAD) -> str:
    """One line per figure whose repeats differ by more than ``limit`` times
    (the machine was busy with something else for part of the run: a ratio
    taken from such a row may move on the next run); empty if none."""
    lines = []
    for r in rows:
        for f in r.figures:
            runs = [x for x in f.runs if x > 0]
            if len(runs) > 1 and max(runs) / min(runs) > limit:
                lines.append(f"  {r.title}, {f.label}: repeats {fmt(min(runs))} to {fmt(max(runs))} {r.unit}"
                             f" ({max(runs) / min(runs):.1f}x apart)")
    if not lines:
        return ""
    return "\n".join([f"noisy (repeats more than {limit:g}x apart; read these ratios with care):", *lines])


def format_goals(goals: Iterable[Goal]) -> str:
    """The goals with this run's value and ``met`` / ``MISSED`` / ``not measured``."""
    goals = list(goals)
    if not goals:
        return ""
    tw = max(len(g.text) for g in goals)
    vw = max(len(g.value) for g in goals)
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    lines = ["goals:"]
    for g in goals:
        lines.append(f"  {g.text:<{tw}}  {g.value:<{vw}}  {verdict[g.met]}")
    met = sum(1 for g in goals if g.met)
    measured = sum(1 for g in goals if g.met is not None)
    lines.append(f"  {met} of {measured} measured goals met")
    return "\n".join(lines)
