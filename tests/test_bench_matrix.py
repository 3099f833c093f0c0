"""``shrimpio bench``: the matrix runs the rows asked for, its JSON and table
agree with the measured numbers, connect+accept really went over shared
memory, the idle-CPU measurement tells an idle pair from a spinning process,
``--plot`` writes a PNG (or says clearly that matplotlib is missing), and
the three older benchmark commands print through the shared table."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

import shrimpio
from children import child_env
from shrimpio.bench import common, runner
from shrimpio.bench.rows import aio, connect, sockets, vmmc, zmq_ipc
from shrimpio.__main__ import main
from shrimpio.bench.goals import goals
from shrimpio.bench.table import Figure, Row, format_goals, format_noise, format_table

TINY = runner.Settings(rtt_rounds=200, bw_rounds=5, connects=20, async_rtt_rounds=100,
                              seconds=0.1, idle_seconds=0.5, repeats=1)
PNG = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "cpu", "cores": 2, "python": "3.11", "kernel": "6"}


@pytest.fixture
def tiny(monkeypatch):
    """``shrimpio bench`` without --quick measures TINY amounts."""
    monkeypatch.setattr(runner, "FULL", TINY)


def _bench_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["bench", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_has_every_requested_row_with_consistent_ratios(tiny, capsys):
    affinity = os.sched_getaffinity(0)
    wanted = ["vmmc_rtt", "socket_rtt", "socket_bw", "connect"]
    rc, out, err = _bench_cli(capsys, "--json", "--rows", ",".join(wanted))
    assert rc == 0, err
    assert os.sched_getaffinity(0) == affinity          # pinning undone
    res = json.loads(out)
    assert [r["key"] for r in res["rows"]] == wanted and res["skipped_rows"] == []
    for row in res["rows"]:
        lower = row["unit"] == "us"
        assert row["better"] == ("lower" if lower else "higher")
        subject, *peers = row["figures"]
        for f in row["figures"]:
            assert f["median"] > 0 and f["runs"] == [f["median"]]
            # p99 is the slow tail: a longer time, or a lower rate
            assert (f["p99"] >= f["median"]) if lower else (f["p99"] <= f["median"])
        assert set(row["ratios"]) == {p["label"] for p in peers}
        for p in peers:
            want = p["median"] / subject["median"] if lower else subject["median"] / p["median"]
            assert row["ratios"][p["label"]] == pytest.approx(want)
    labels = {r["key"]: [f["label"] for f in r["figures"]] for r in res["rows"]}
    assert labels["vmmc_rtt"] == ["VMMC", "Unix", "floor"]
    assert labels["connect"] == ["shm", "TCP", "Unix"]
    for key in ("socket_rtt", "socket_bw"):
        row = next(r for r in res["rows"] if r["key"] == key)
        if zmq_ipc.available():
            assert "zmq ipc" in labels[key]
        else:
            assert row["skipped"] == {"zmq ipc": "pyzmq not installed"}
    # connect+accept: every connection, seen from both ends, took the path it is labelled with
    conn_row = next(r for r in res["rows"] if r["key"] == "connect")
    assert [f["extra"]["paths"] for f in conn_row["figures"]] == [["shm"], ["tcp"], ["unix"]]
    assert all(f["extra"]["n"] == TINY.connects for f in conn_row["figures"])
    # goals: the measured ones are judged from those same ratios, the rest "not measured"
    g = {x["text"]: x for x in res["goals"]}
    tcp = next(r for r in res["rows"] if r["key"] == "socket_rtt")["ratios"]["TCP"]
    assert g["socket 64 B rtt >= 30x faster than kernel TCP"]["met"] == (tcp >= 30)
    assert g["asyncio echo >= 3x uvloop TCP"]["met"] is None
    assert res["machine"]["cores"] == os.cpu_count() and "load_before" in res
    assert res["versions"]["shrimpio"] == shrimpio.__version__
    # progress on stderr, plain lines when it is not a terminal
    steps = [line for line in err.splitlines() if line.startswith("[")]
    total = len(steps)
    assert steps[0].startswith(f"[1/{total}] VMMC 64 B") and steps[-1].startswith(f"[{total}/{total}] ")


def test_table_text_and_missing_pyzmq(tiny, capsys, monkeypatch):
    monkeypatch.setattr(zmq_ipc, "available", lambda: False)
    rc, out, _ = _bench_cli(capsys, "--rows", "socket_bw")
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("socket 1 MiB"))
    assert "| TCP " in line and "| Unix " in line and "zmq ipc: pyzmq not installed" in line
    assert "machine: " in out and "versions: shrimpio" in out and "goals:" in out
    assert "socket 1 MiB bandwidth >= 2x Unix socket" in out and "wall time" in out


def test_progress_counts_no_repeats_of_a_missing_peer(capsys, monkeypatch):
    """pyzmq missing, two repeats: its peer is tried once, and the progress
    count still ends at its total."""
    monkeypatch.setattr(zmq_ipc, "available", lambda: False)
    monkeypatch.setattr(runner, "FULL", runner.Settings(**{**TINY.__dict__, "repeats": 2}))
    rc, out, err = _bench_cli(capsys, "--rows", "socket_bw")
    assert rc == 0 and "zmq ipc: pyzmq not installed" in out
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert len(steps) == 2 * 4 + 1                       # shm, TCP, Unix, memcpy twice; zmq once
    assert steps[-1].startswith(f"[{len(steps)}/{len(steps)}] ")
    assert sum("zmq ipc" in line for line in steps) == 1


def test_shrimpio_figure_on_the_wrong_path_is_a_failure(tiny, capsys, monkeypatch):
    real = connect.bench_connect

    def fell_back(kind: str, n: int) -> dict:
        res = real(kind, n)
        return dict(res, paths=["tcp"]) if kind == "shrimpio" else res

    monkeypatch.setattr(connect, "bench_connect", fell_back)
    rc, out, _ = _bench_cli(capsys, "--json", "--rows", "connect")
    res = json.loads(out)
    assert rc == 1 and res["rows"] == []
    assert "expected shm" in res["skipped_rows"][0]["reason"]


def test_unknown_row(capsys):
    rc, out, err = _bench_cli(capsys, "--rows", "socket_rtt,nope")
    assert rc == 2 and out == "" and "unknown row(s) nope" in err and "connect" in err


@pytest.mark.parametrize("kind", ["socket", "asyncio"])
def test_idle_pair_uses_little_cpu(kind):
    res = connect.idle_pair(kind, 0.5)
    assert res["paths"] == ["shm", "shm"]
    assert len(res["per_process"]) == 2 and res["percent"] == pytest.approx(sum(res["per_process"]))
    assert res["percent"] < 5, res             # 1 clock tick is 2 % of 0.5 s


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def test_cpu_measurement_sees_a_spinning_process():
    """A spinning process uses CPU, a sleeping one none.  How much the
    spinner gets depends on the host's load (on a busy host a fraction of a
    core): it must be clearly above the clock tick (1 % over 1 s)."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    spinner = ctx.Process(target=_spin, args=(stop,))
    sleeper = ctx.Process(target=stop.wait)
    spinner.start()
    sleeper.start()
    try:
        spun, slept = connect.cpu_percent([spinner.pid, sleeper.pid], 1.0)
    finally:
        stop.set()
        spinner.join(30)
        sleeper.join(30)
    assert spinner.exitcode == 0 and sleeper.exitcode == 0
    assert spun >= 3, (spun, slept)
    assert slept <= 2, (spun, slept)


@pytest.fixture(scope="module")
def matplotlib_fonts(tmp_path_factory):
    """matplotlib keeps the font files it has used open for the life of the
    process (its font cache): load them before the leak check looks."""
    pytest.importorskip("matplotlib")
    from shrimpio.bench.plot import plot
    row = _row("socket_rtt", "us", ("shm", 1.0), ("TCP", 85.7))
    plot({"machine": MACHINE, "rows": [row.to_json()]}, str(tmp_path_factory.mktemp("fonts") / "warm.png"))


def test_plot_writes_a_png(matplotlib_fonts, tiny, capsys, tmp_path):
    png = tmp_path / "bench.png"
    rc, _, err = _bench_cli(capsys, "--rows", "vmmc_bw,socket_rtt", "--plot", str(png))
    assert rc == 0 and "chart written" in err
    assert png.read_bytes()[:8] == PNG


def test_plot_without_matplotlib_says_so(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from shrimpio.__main__ import main\n"
            "sys.exit(main(['bench', '--rows', 'connect', '--plot', 'x.png']))")
    env = child_env(inherit_pythonpath=False)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert "--plot needs matplotlib" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_zmq_peer_measures():
    pytest.importorskip("zmq")
    samples = zmq_ipc.bench_zmq(50, 64, 64)
    assert len(samples) == 50 and min(samples) > 0


def test_progress_rewrites_its_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = runner.Progress(2, out)
    p.step("socket 64 B round trip: TCP")
    p.step("connect+accept+close: shm")
    p.done()
    assert out.getvalue() == ("\r\x1b[K[1/2] socket 64 B round trip: TCP"
                              "\r\x1b[K[2/2] connect+accept+close: shm\r\x1b[K")


def _words(text: str) -> str:
    """``text`` with runs of blanks (column padding) made one space."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def _row(key: str, unit: str, *figs: tuple[str, float]) -> Row:
    return Row(key, key, unit, [Figure(label, med, med * 2 if unit == "us" else None) for label, med in figs])


def test_goals_and_table_from_figures():
    rows = {r.key: r for r in [
        _row("socket_rtt", "us", ("shm", 1.0), ("TCP", 85.7), ("floor", 0.4)),
        _row("socket_bw", "MiB/s", ("shm", 5000.0), ("Unix", 3000.0)),
        _row("connect", "us", ("shm", 50.0), ("TCP", 70.0)),
        _row("idle_socket", "%", ("shm", 0.2)),
        _row("idle_asyncio", "%", ("shm", 1.4)),
        _row("echo_protocol", "req/s", ("shm", 300.0), ("uvloop TCP", 100.0)),
    ]}
    table = _words(format_table(rows.values()))
    assert "shm 1.00 p99 2.00 | TCP 85.7 (86x) | floor 0.40 (0.40x)" in table
    assert "| Unix 3000 (1.67x)" in table
    got = {g.text: g for g in goals(rows)}
    assert got["socket 64 B rtt >= 30x faster than kernel TCP"].met is True
    assert got["socket 64 B rtt within 8x of the Cython spin loop"].value == "2.5x the floor"
    assert got["socket 1 MiB bandwidth >= 2x Unix socket"].met is False
    assert got["connect+accept no slower than kernel TCP"].met is True
    assert got["idle connected pair < 1% of a core"].met is False      # the asyncio pair's 1.4 %
    assert got["asyncio echo >= 3x uvloop TCP"].met is True             # protocol only was measured
    assert got["aiohttp >= 1.5x uvloop TCP"].met is None
    text = format_goals(goals(rows))
    assert "MISSED" in text and "not measured" in text and "4 of 6 measured goals met" in text


def test_ratio_per_repeat_and_goals_on_the_worst():
    """Three repeats: each repeat's ratio is shown, and a goal is met only
    if it held in every repeat (here the median says 2x, one run 1.2x)."""
    shm = Figure("shm", 100.0, None, [100.0, 100.0, 120.0])
    tcp = Figure("TCP", 200.0, None, [200.0, 210.0, 144.0])
    row = Row("aiohttp_4", "aiohttp_4", "req/s", [Figure("shm", 100.0, None, [20.0, 30.0, 30.0]),
                                                  Figure("uvloop TCP", 10.0, None, [10.0, 10.0, 25.0])])
    assert row.run_ratios(row.peer("uvloop TCP")) == [2.0, 3.0, 1.2]
    assert row.worst_ratio(row.peer("uvloop TCP")) == 1.2
    us = Row("socket_rtt", "socket_rtt", "us", [shm, tcp])
    assert us.run_ratios(tcp) == [2.0, 2.1, 1.2] and us.worst_ratio(tcp) == 1.2
    assert "(2.00x, runs 2.00x 2.10x 1.20x)" in format_table([us])
    assert us.to_json()["worst_ratios"] == {"TCP": 1.2}
    by_key = {"aiohttp_4": row}
    met = {g.text: g.met for g in goals(by_key)}
    assert met["aiohttp >= 1.5x uvloop TCP"] is False
    # Repeats that do not pair up: the median's ratio.
    odd = Row("x", "x", "us", [Figure("shm", 1.0, None, [1.0, 1.0]), Figure("TCP", 3.0, None, [3.0])])
    assert odd.run_ratios(odd.peer("TCP")) == [] and odd.worst_ratio(odd.peer("TCP")) == 3.0


def test_bandwidth_rows_64k_1m_16m_beside_unix_tcp_and_memcpy(tiny, capsys):
    """The three message sizes, each over shared memory, TCP and a Unix
    socket in the same run, with one memcpy of the message as the floor;
    every figure moved its rows' messages on the path it is labelled with."""
    wanted = ["socket_bw_64k", "socket_bw", "socket_bw_16m"]
    rc, out, err = _bench_cli(capsys, "--json", "--rows", ",".join(wanted))
    assert rc == 0, err
    res = json.loads(out)
    assert [r["key"] for r in res["rows"]] == wanted
    titles = [r["title"] for r in res["rows"]]
    assert titles == ["socket 64 KiB sendall + 8 B ack", "socket 1 MiB sendall + 8 B ack",
                      "socket 16 MiB sendall + 8 B ack"]
    for row, size in zip(res["rows"], (64 << 10, 1 << 20, 16 << 20)):
        figs = {f["label"]: f for f in row["figures"]}
        assert row["unit"] == "MiB/s" and row["figures"][0]["label"] == "shm"
        assert {"shm", "TCP", "Unix", "memcpy"} <= set(figs)
        for label, path in (("shm", "shm"), ("TCP", "tcp"), ("Unix", "unix")):
            assert figs[label]["extra"]["paths"] == [path]
        assert all(f["extra"]["n"] == sockets.bw_rounds(TINY, size) for f in figs.values())
        assert all(f["median"] > 0 for f in figs.values())
        assert set(row["worst_ratios"]) >= {"TCP", "Unix", "memcpy"}
    goal = next(g for g in res["goals"] if g["text"] == "socket 1 MiB bandwidth >= 2x Unix socket")
    unix = [r for r in res["rows"] if r["key"] == "socket_bw"][0]["worst_ratios"]["Unix"]
    assert goal["met"] == (unix >= 2)
    assert "(64 KiB " in goal["value"] and ", 16 MiB " in goal["value"]


def test_bandwidth_goal_reads_the_1mib_row_worst_repeat():
    def row(key, shm_runs, unix_runs):
        return Row(key, key, "MiB/s", [Figure("shm", sorted(shm_runs)[1], None, shm_runs),
                                       Figure("Unix", sorted(unix_runs)[1], None, unix_runs)])
    rows = {"socket_bw": row("socket_bw", [9000.0, 8000.0, 9000.0], [3000.0, 4000.0, 3000.0]),
            "socket_bw_16m": row("socket_bw_16m", [3000.0, 3000.0, 3000.0], [3000.0, 3000.0, 3000.0])}
    got = {g.text: g for g in goals(rows)}["socket 1 MiB bandwidth >= 2x Unix socket"]
    assert got.met is True and got.value == "2.00x (16 MiB 1.00x)"      # worst repeat: 8000 / 4000
    assert {g.text: g for g in goals({"socket_bw_16m": rows["socket_bw_16m"]})}[
        "socket 1 MiB bandwidth >= 2x Unix socket"].value == "-"          # the goal's row not measured
    rows["socket_bw"] = row("socket_bw", [9000.0, 5000.0, 9000.0], [3000.0, 3000.0, 3000.0])
    assert {g.text: g for g in goals(rows)}["socket 1 MiB bandwidth >= 2x Unix socket"].met is False


def test_noisy_figures_are_named_under_the_table():
    """A figure whose repeats are more than 1.5x apart is listed (the run's
    ratios from it may move); steady figures and single repeats are not."""
    rows = [Row("socket_bw", "socket 1 MiB", "MiB/s", [Figure("shm", 9000.0, None, [8000.0, 9000.0, 9500.0]),
                                                       Figure("TCP", 2000.0, None, [1200.0, 2000.0, 2900.0])]),
            Row("connect", "connect", "us", [Figure("shm", 90.0, 300.0, [90.0])])]
    text = format_noise(rows)
    assert text.splitlines() == ["noisy (repeats more than 1.5x apart; read these ratios with care):",
                                 "  socket 1 MiB, TCP: repeats 1200 to 2900 MiB/s (2.4x apart)"]
    assert format_noise(rows[1:]) == ""


def test_aiohttp_goal_needs_every_in_flight_row():
    """One request in flight (the wait for the peer counts) and four (the
    client's own code counts): the goal holds only if both reach 1.5x, and
    the text names each with the client's CPU."""
    def row(key, shm, tcp):
        return Row(key, key, "req/s", [Figure("shm", shm, None, extra={"client_cpu_percent": 60.0}),
                                       Figure("uvloop TCP", tcp, None, extra={"client_cpu_percent": 50.0})])
    rows = {"aiohttp_1": row("aiohttp_1", 6000.0, 3000.0), "aiohttp_4": row("aiohttp_4", 12000.0, 10000.0)}
    got = {g.text: g for g in goals(rows)}["aiohttp >= 1.5x uvloop TCP"]
    assert got.met is False
    assert got.value == "2.00x 1 in flight (client CPU 60%/50%), 1.20x 4 in flight (client CPU 60%/50%)"
    rows["aiohttp_4"] = row("aiohttp_4", 15000.0, 10000.0)
    assert {g.text: g for g in goals(rows)}["aiohttp >= 1.5x uvloop TCP"].met is True
    # in the order of the table, in flight counted as numbers; the loaded row named as such
    rows["aiohttp_16"] = row("aiohttp_16", 20000.0, 10000.0)
    rows["aiohttp_4_load"] = row("aiohttp_4_load", 8000.0, 4000.0)
    value = {g.text: g for g in goals(rows)}["aiohttp >= 1.5x uvloop TCP"].value
    assert [part.split(" (")[0] for part in value.split("), ")] == [
        "2.00x 1 in flight", "1.50x 4 in flight", "2.00x 16 in flight", "2.00x 4 in flight, a core busy"]


def _stats(us: float) -> dict:
    return {"median_us": us, "p99_us": 2 * us, "n": 10}


def test_pingpong_and_bench_socket_print_through_the_shared_table():
    res = {"machine": MACHINE, "rtt_64B": {"reference": _stats(0.4), "vmmc": _stats(0.8), "unix": _stats(64.0)},
           "put_1MiB": {"vmmc": _stats(40.0), "unix": _stats(250.0), "memcpy": _stats(32.0)}}
    text = _words(vmmc.report(res))
    assert "VMMC 0.80 p99 1.60 | Unix 64.0 (80x) | floor 0.40 (0.50x)" in text
    assert "VMMC 25000 p99 12500 | Unix 4000 (6.25x) | memcpy 31250 (0.80x)" in text
    res = {"machine": MACHINE, "rtt_64B": {"shrimpio": _stats(1.0), "tcp": _stats(85.0), "unix": _stats(65.0)},
           "bw_1MiB": {"shrimpio": _stats(100.0), "tcp": _stats(300.0), "unix": _stats(400.0)}}
    text = _words(sockets.report(res))
    assert "shm 1.00 p99 2.00 | TCP 85.0 (85x) | Unix 65.0 (65x)" in text
    assert "shm 10000 p99 5000 | TCP 3333 (3.00x) | Unix 2500 (4.00x)" in text
    assert [r.key for r in sockets.rows(res)] == ["socket_rtt", "socket_bw"]
    assert [r.key for r in aio.rows({"settings": {"echo_clients": 10, "echo_bytes": 1024,
                                                             "http_in_flight": [1, 4]},
                                                "rtt_64B": {"shrimpio": _stats(7.0)},
                                                "echo_1KiB": {}})] == ["asyncio_rtt"]


def test_python_m_shrimpio_bench_is_the_bench_command(tmp_path):
    env = child_env(inherit_pythonpath=False)
    res = subprocess.run([sys.executable, "-m", "shrimpio.bench", "--rows", "nope"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert "unknown row(s) nope" in res.stderr and "socket_bw_16m" in res.stderr


def test_connect_rounds_in_fresh_interpreters(tmp_path):
    """``python -m shrimpio.bench.rows.connect``: each kind measured in its
    own interpreter per round, every connection on its labelled path (the
    child raises otherwise), the rounds' medians and pooled percentiles."""
    env = child_env(inherit_pythonpath=False)
    res = subprocess.run([sys.executable, "-m", "shrimpio.bench.rows.connect", "--rounds", "2", "-n", "20",
                          "--json"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    table = json.loads(res.stdout)
    assert list(table) == ["shrimpio", "tcp", "unix"]
    for t in table.values():
        assert t["n"] == 2 * 20 and len(t["round_medians_us"]) == 2
        assert 0 < t["p50_us"] <= t["p90_us"] <= t["p99_us"]


def test_tls_over_shm_beside_tls_over_tcp(tmp_path):
    pytest.importorskip("trustme")
    env = child_env(inherit_pythonpath=False)
    res = subprocess.run([sys.executable, "-m", "shrimpio.bench.rows.tls", "--rounds", "1", "-n", "50",
                          "--mib", "2", "--json"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["path"] for r in out["runs"]["shm"]] == ["shm"] and [r["path"] for r in out["runs"]["tcp"]] == ["tcp"]
    assert out["summary"]["shm"]["mib_s"] > 0 and out["summary"]["ratio"]["rtt"] > 0


def test_idle_row_registers_silent_connections_on_every_path(tiny, capsys, monkeypatch):
    """``socket_idle_rtt``: the poll-before-read loop with more connections
    open and registered in the server's selector; each figure on the path
    it is labelled with, and the goal judged beside TCP."""
    monkeypatch.setattr(sockets, "IDLE", 50)
    rc, out, err = _bench_cli(capsys, "--json", "--rows", "socket_idle_rtt")
    assert rc == 0, err
    res = json.loads(out)
    row = res["rows"][0]
    assert row["key"] == "socket_idle_rtt" and "50 idle connections" in row["title"]
    figs = {f["label"]: f for f in row["figures"]}
    for label, path in (("shm", "shm"), ("TCP", "tcp"), ("Unix", "unix")):
        assert figs[label]["extra"]["paths"] == [path]
        assert figs[label]["extra"]["n"] == TINY.rtt_rounds
    goal = next(g for g in res["goals"] if "idle connections" in g["text"])
    assert goal["met"] == (row["worst_ratios"]["TCP"] >= 3)
