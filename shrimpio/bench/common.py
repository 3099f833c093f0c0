"""What every benchmark row needs: pinning a process to a core, the
statistics of a list of timings, the machine's description and a private
registry for one run."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
from typing import Iterator

__all__ = ["MIB", "child_python", "machine", "pin", "private_registry", "stats"]

MIB = 1 << 20


def child_python() -> list[str]:
    """The command that starts a benchmark's child interpreter: this one,
    with ``-P``, so that a child run as ``-m`` or ``-c`` from a source
    tree of shrimpio (the README's commands run from the clone) imports the
    installed package, not that tree (whose extension is not built)."""
    return [sys.executable, "-P"]


def pin(cpu: int) -> None:
    """Run this process on core ``cpu`` only (modulo the cores there are)."""
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {cpu % os.cpu_count()})


def stats(samples_ns: list[int]) -> dict:
    """``{"median_us", "p99_us", "n"}`` of per-operation times in ns."""
    s = sorted(samples_ns)
    return {"median_us": statistics.median(s) / 1000, "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1000,
            "n": len(s)}


def machine() -> dict:
    """CPU model, core count, Python and kernel versions."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "kernel": platform.release()}


@contextlib.contextmanager
def private_registry() -> Iterator[None]:
    """A throwaway registry for one benchmark run (removed after), unless the
    user chose one with ``SHRIMPIO_REGISTRY``."""
    if "SHRIMPIO_REGISTRY" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-") as tmp:
        os.environ["SHRIMPIO_REGISTRY"] = tmp
        try:
            yield
        finally:
            del os.environ["SHRIMPIO_REGISTRY"]
