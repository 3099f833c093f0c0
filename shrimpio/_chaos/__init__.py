"""The chaos and fuzz suite: hostile, dying and greedy peers in real
processes against every API (docs/chaos.md).

``shrimpio chaos [--minutes N] [--seed S] [--fuzz-seconds N]`` runs rounds
of randomly chosen scenarios (scenarios.py) with random parameters for a
while, then (``--fuzz-seconds``) each fuzz target (fuzz.py) under atheris,
and prints the counts.  ``tests/chaos/`` runs a fixed, fast subset of the
same rounds in the default test run, and replays the fuzz corpus.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Optional

from .harness import KINDS


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from .scenarios import SCENARIOS
    ap.add_argument("--minutes", type=float, default=5.0,
                    help="how long to run rounds (default 5; 0: no rounds)")
    ap.add_argument("--seed", type=int, default=None,
                    help="first round's seed (default: random); round k uses seed+k")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="run only this scenario (may be repeated)")
    ap.add_argument("--fuzz-seconds", type=float, default=0.0,
                    help="then fuzz every parser target for this long in all (needs atheris)")
    ap.add_argument("--keep", action="store_true",
                    help="keep every round's directory (the ones with findings are always kept)")


def run_rounds(minutes: float, seed: int, names: "list[str] | None" = None,
               out: Callable[[str], None] = print, keep: bool = False) -> dict:
    """Rounds until ``minutes`` are up: {"rounds", kinds..., "by_scenario"}."""
    from .scenarios import SCENARIOS, run_round
    names = names or sorted(SCENARIOS)
    pick = random.Random(seed)
    totals: Counter = Counter()
    by: dict[str, Counter] = {}
    end = time.monotonic() + minutes * 60
    k = 0
    while time.monotonic() < end:
        name = pick.choice(names)
        t0 = time.monotonic()
        rnd = run_round(name, seed + k, keep=keep)
        counts = rnd.counts()
        totals["rounds"] += 1
        totals.update(counts)
        by.setdefault(name, Counter())["rounds"] += 1
        by[name].update(counts)
        bad = {kind: n for kind, n in counts.items() if n}
        line = (f"round {k} {name} seed={seed + k} {rnd.notes.get('params')} "
                f"{time.monotonic() - t0:.1f}s")
        out(line + (f" FAILED {bad} (kept in {rnd.tmp})" if bad else " ok"))
        for kind, who, detail in rnd.findings:
            out(f"    {kind} [{who}] {detail[:2000]}")
        k += 1
    return {"totals": dict(totals), "by_scenario": {n: dict(c) for n, c in by.items()}}


def corpus_dir() -> Optional[str]:
    """The repository's seed corpus (tests/chaos/fuzz/corpus), if this is a
    source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, os.pardir, os.pardir, "tests", "chaos", "fuzz", "corpus")
    return os.path.normpath(path) if os.path.isdir(path) else None


def run_fuzz(seconds: float, out: Callable[[str], None] = print) -> dict:
    """Each target under atheris for ``seconds``/4, in a scratch copy of
    the corpus: {target: "ok" | "crash ..." | "skipped ..."}."""
    from .fuzz import TARGETS, write_seeds
    try:
        import atheris  # noqa: F401
    except ImportError:
        out("fuzzing skipped: atheris is not installed (pip install atheris)")
        return {t: "skipped (no atheris)" for t in TARGETS}
    results = {}
    scratch = tempfile.mkdtemp(prefix="shrimpio-fuzz-")
    src = corpus_dir()
    if src:
        shutil.copytree(src, os.path.join(scratch, "corpus"))
    else:
        write_seeds(os.path.join(scratch, "corpus"))
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_atheris.py")
    each = max(1, int(seconds / len(TARGETS)))
    for name in TARGETS:
        art = os.path.join(scratch, f"{name}-")
        cmd = [sys.executable, runner, name, f"-max_total_time={each}", f"-artifact_prefix={art}",
               "-rss_limit_mb=1024", "-timeout=10", os.path.join(scratch, "corpus", name)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=each * 3 + 60)
        runs = [ln for ln in res.stderr.splitlines() if ln.startswith("Done ")]
        crashes = [f for f in os.listdir(scratch) if f.startswith(name + "-")]
        if res.returncode == 0 and not crashes:
            results[name] = f"ok ({runs[0] if runs else 'no summary'})"
        else:
            results[name] = f"FAILED (exit {res.returncode}, inputs kept: {crashes})"
            out(res.stderr[-3000:])
        out(f"fuzz {name}: {results[name]}")
    if all(v.startswith("ok") for v in results.values()):
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        out(f"fuzz scratch directory kept: {scratch}")
    return results


def main(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"shrimpio chaos: seed {seed}, {args.minutes} minutes, fuzz {args.fuzz_seconds}s")
    sys.stdout.flush()

    def out(line: str) -> None:
        print(line, flush=True)

    failed = False
    if args.minutes > 0:
        res = run_rounds(args.minutes, seed, args.scenario, out, args.keep)
        tot = res["totals"]
        print("\nscenario         rounds " + " ".join(f"{k:>6}" for k in KINDS + ("aborted",)))
        for name, c in sorted(res["by_scenario"].items()):
            print(f"{name:16} {c.get('rounds', 0):6} "
                  + " ".join(f"{c.get(k, 0):6}" for k in KINDS + ("aborted",)))
        print(f"{'total':16} {tot.get('rounds', 0):6} "
              + " ".join(f"{tot.get(k, 0):6}" for k in KINDS + ("aborted",)))
        failed = any(tot.get(k) for k in KINDS + ("aborted",))
    if args.fuzz_seconds > 0:
        fres = run_fuzz(args.fuzz_seconds, out)
        failed = failed or any(v.startswith("FAILED") for v in fres.values())
    return 1 if failed else 0
