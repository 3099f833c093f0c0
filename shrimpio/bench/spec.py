"""What a row of ``shrimpio bench`` is before it is measured: how much to
measure (:class:`Settings`) and, per row, its kinds and how to measure each
once (:class:`Spec`).  Each module of ``rows/`` gives the specs of its
family; the runner measures them and the table prints them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .table import Figure

__all__ = ["FULL", "QUICK", "Measure", "NotInstalled", "Settings", "Spec"]


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


class NotInstalled(Exception):
    """A peer's package is not installed: the row says so (not a failure)."""
