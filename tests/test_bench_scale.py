"""The scale rows of ``shrimpio bench``: many idle connections to one server
over shared memory and over TCP, the same programs; every connection's path
is checked on both ends, one run gives a mode's three rows, and the goals
read them."""

from __future__ import annotations

import pytest

from shrimpio.bench import common, runner
from shrimpio.bench.rows import scale
from shrimpio.bench.goals import goals
from shrimpio.bench.table import Figure, Row


@pytest.mark.parametrize("mode", scale.MODES)
def test_one_run_per_kind(mode):
    with common.private_registry():
        for kind in scale.KINDS:
            res = scale.run_one(mode, kind, 40)     # checks both ends' paths
            assert res["n"] == 40 and res["errors"] == 0 and res["connect_per_s"] > 0
            for part in ("idle", "closed"):
                assert set(res[part]) >= {"server_pss", "client_pss", "slab", "page_tables", "shmem", "total"}
            assert res["idle"]["server_pss"] > 0
            if kind == "shrimpio":
                # One page of rings per connection, half in each process's Pss.
                assert res["idle"]["pss_shmem"] >= 4000
                assert res["server_fds"] >= 2 * 40


def test_a_mode_s_rows_share_its_runs(monkeypatch):
    calls = []
    real = scale.run_one

    def counted(mode, kind, n, timeout=300):
        calls.append((mode, kind, n))
        return real(mode, kind, n, timeout)

    monkeypatch.setattr(scale, "run_one", counted)
    s = runner.Settings(scale_asyncio=30, repeats=1)
    res = runner.run(s, rows=["scale_asyncio", "scale_asyncio_closed", "scale_asyncio_rate"])
    assert sorted(calls) == [("asyncio", "shrimpio", 30), ("asyncio", "tcp", 30)]
    assert [r["key"] for r in res["rows"]] == ["scale_asyncio", "scale_asyncio_closed", "scale_asyncio_rate"]
    units = [r["unit"] for r in res["rows"]]
    assert units == ["KB", "KB", "conn/s"]
    shm = res["rows"][0]["figures"][0]
    assert shm["label"] == "shm" and shm["extra"]["n"] == 30 and shm["extra"]["paths"] == ["shm"]


def test_quick_leaves_the_scale_rows_out_unless_named():
    quick = [sp.key for sp in runner.chosen_specs(runner.QUICK)]
    full = [sp.key for sp in runner.chosen_specs(runner.FULL)]
    assert not any(k.startswith("scale_") for k in quick)
    assert {"scale_asyncio", "scale_threaded_rate"} <= set(full) and set(quick) < set(full)
    assert [sp.key for sp in runner.chosen_specs(runner.QUICK, ["scale_threaded"])] == \
        ["scale_threaded"]


def test_scale_goals():
    def row(key, unit, shm, tcp):
        return Row(key, key, unit, [Figure("shm", shm), Figure("TCP", tcp)])
    rows = {r.key: r for r in [
        row("scale_asyncio", "KB", 30.0, 18.0), row("scale_threaded", "KB", 50.0, 40.0),
        row("scale_asyncio_closed", "KB", 12.5, 12.0), row("scale_threaded_closed", "KB", 14.0, 12.0),
        row("scale_asyncio_rate", "conn/s", 3000.0, 2500.0)]}
    got = {g.text: g for g in goals(rows)}
    mem = got["memory per idle connection within 2x of TCP's"]
    assert mem.met is True and mem.value == "1.67x asyncio (30.0 vs 18.0 KB), 1.25x threaded (50.0 vs 40.0 KB)"
    assert got["after close, memory back to baseline (as TCP's, +1 KB)"].met is False   # threaded: +2 KB
    assert got["connect rate at scale no worse than TCP's"].met is True
    rows["scale_threaded"] = row("scale_threaded", "KB", 81.0, 40.0)
    assert {g.text: g for g in goals(rows)}["memory per idle connection within 2x of TCP's"].met is False
    # Missed by a hair: the ratio is printed with the digits that show it.
    rows["scale_threaded"] = row("scale_threaded", "KB", 80.1, 40.0)
    mem = {g.text: g for g in goals(rows)}["memory per idle connection within 2x of TCP's"]
    assert mem.met is False and "2.002x threaded" in mem.value, mem.value
