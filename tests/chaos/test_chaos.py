"""The chaos suite (docs/chaos.md), fast subset: one round of each kind of
trouble, with pinned parameters and seeds, in real processes; every pass
criterion is checked by the harness (shrimpio/_chaos/harness.py).

``pytest -m chaos`` runs the same scenarios for longer with random seeds
(``SHRIMPIO_CHAOS_MINUTES``, default 5), as ``shrimpio chaos`` does.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from children import child_env
from shrimpio._chaos.scenarios import run_round

# (scenario, parameters, seed): each kind of trouble against each API at least once.
FAST = [
    ("honest", {"api": "selectors", "client_api": "asyncio"}, 1),
    ("kill", {"api": "blocking", "doomed": "client"}, 1),
    ("kill", {"api": "nonblocking", "doomed": "server"}, 2),
    ("kill", {"api": "selectors", "doomed": "client"}, 3),
    ("kill", {"api": "asyncio", "doomed": "server"}, 4),
    ("scribble", {"api": "blocking", "hostile": "client"}, 1),
    ("scribble", {"api": "selectors", "hostile": "server"}, 2),
    ("scribble", {"api": "asyncio", "hostile": "client"}, 3),
    ("scribble", {"api": "nonblocking", "hostile": "server"}, 4),
    ("hellos", {"api": "nonblocking"}, 1),
    ("hellos", {"api": "asyncio"}, 2),
    ("hellos", {"api": "blocking"}, 3),
    ("vmmc", {"case": "kill_importer"}, 1),
    ("vmmc", {"case": "kill_exporter"}, 2),
    ("vmmc", {"case": "hostile"}, 3),
    ("vmmc", {"case": "fake_endpoint"}, 4),
    ("handoff", {"how": "send_fds"}, 1),
    ("handoff", {"how": "spawn"}, 2),
    ("handoff", {"how": "pass_fds"}, 3),
    ("exhaust", {"side": "client", "api": "blocking", "tight": True}, 1),
    ("exhaust", {"side": "server", "api": "selectors", "tight": True}, 2),
    ("exhaust", {"side": "server", "api": "asyncio", "tight": False}, 3),
]


def _id(p) -> str:
    name, params, seed = p.values if hasattr(p, "values") else p
    return "-".join([name, *map(str, params.values()), str(seed)])


def _check(rnd) -> None:
    counts = rnd.counts()
    details = "\n".join(f"{kind} [{who}]: {detail[:3000]}" for kind, who, detail in rnd.findings)
    assert not any(counts.values()), f"{counts} (kept in {rnd.tmp})\n{details}\n{rnd.notes}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,params,seed", FAST, ids=[_id(p) for p in FAST])
def test_round(name, params, seed):
    _check(run_round(name, seed, params))


@pytest.mark.chaos
@pytest.mark.timeout(0)
def test_long_run():
    from shrimpio._chaos import run_rounds
    minutes = float(os.environ.get("SHRIMPIO_CHAOS_MINUTES", "5"))
    seed = int(os.environ.get("SHRIMPIO_CHAOS_SEED", random.SystemRandom().randrange(1 << 31)))
    lines: list[str] = []
    res = run_rounds(minutes, seed, out=lines.append)
    print("\n".join(lines))
    print(res)
    bad = {k: v for k, v in res["totals"].items() if k != "rounds" and v}
    assert not bad, "\n".join(ln for ln in lines if not ln.endswith(" ok"))


def test_cli_runs_rounds_and_prints_counts():
    res = subprocess.run([sys.executable, "-m", "shrimpio", "chaos", "--minutes", "0.01",
                          "--seed", "7", "--scenario", "honest"], capture_output=True, text=True,
                         env=child_env(drop=("SHRIMPIO_PATCH",)), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 0 honest seed=7" in res.stdout
    total = [ln for ln in res.stdout.splitlines() if ln.startswith("total")]
    assert total and total[0].split()[1:] == ["1", "0", "0", "0", "0", "0", "0"], res.stdout


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "shrimpio", "chaos", "--help"], capture_output=True,
                         text=True, env=child_env(drop=("SHRIMPIO_PATCH",)), timeout=60)
    assert res.returncode == 0
    for opt in ("--minutes", "--seed", "--fuzz-seconds", "--scenario"):
        assert opt in res.stdout
