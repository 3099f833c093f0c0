"""``shrimpio bench``'s web framework rows: real uvicorn (its defaults) and
tornado servers with an ``http.client`` keep-alive client, each run as a
separate program, over shared memory under ``shrimpio run`` and over kernel
TCP unpatched.  The plumbing is checked, not the timings: each measurement
completes, both ends' connections took the path the figure is labelled
with, the client reports its window's rate, latencies and both processes'
CPU, and the matrix turns them into rows, a goal line and skipped rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shrimpio.bench import common, runner
from shrimpio.bench.rows import web
from shrimpio.__main__ import main
from shrimpio.bench.goals import goals
from shrimpio.bench.table import Figure, Row, format_goals

pytestmark = pytest.mark.timeout(300)

TINY = runner.Settings(rtt_rounds=200, bw_rounds=5, connects=20, async_rtt_rounds=100,
                              seconds=0.1, idle_seconds=0.5, repeats=1)


def _needs(framework: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not web.available(framework), reason=f"{framework} not installed")


@pytest.mark.parametrize("framework", [pytest.param(fw, marks=_needs(fw)) for fw in web.FRAMEWORKS])
def test_each_kind_runs_on_its_path(framework):
    """Over shared memory both ends report shm (SHRIMPIO_REPORT of the
    server and the client; with a connection per request, the client's
    check of each); over TCP the client's socket is a kernel one.
    The client's window gives a rate, a median and a p99, and the CPU of
    both processes."""
    with common.private_registry():
        for kind in web.KINDS:
            res = web.run_one(framework, kind, 0.1)      # raises on the wrong path
            want = "shm" if kind == "shrimpio" else "tcp"
            assert set(res["paths"]) == {want}, res
            if kind == "shrimpio" and framework != "threading":
                assert len(res["paths"]) >= 3, res              # the client's view and both reports
            elif kind == "shrimpio":
                assert res["paths"] == ["shm"], res             # every connection, the client's view
            assert res["rps"] > 0 and res["n"] >= 1
            assert 0 < res["median_us"] <= res["p99_us"]
            for side in ("client", "server"):
                assert 0 <= res[f"{side}_cpu_percent"] < 150, res


def test_commands_are_the_same_programs_patched_or_not():
    """The TCP figure is the very program of the shm one, without
    ``shrimpio run``; uvicorn keeps its defaults (no --loop, --http or
    --workers), only its access log is off."""
    for fw in web.FRAMEWORKS:
        shm, tcp = (web.server_command(fw, k) for k in web.KINDS)
        assert shm[1:4] == ["-m", "shrimpio", "run"] and shm[4:] == tcp[1:]
    uv = web.server_command("uvicorn", "tcp")
    assert not {"--loop", "--http", "--workers"} & set(uv) and "--no-access-log" in uv
    env = web._env("tcp", None)
    assert env["SHRIMPIO_DISABLE"] == "1" and "SHRIMPIO_REPORT" not in env
    with pytest.raises(ValueError):
        web.server_command("flask", "tcp")


def test_server_that_dies_is_a_failure_not_a_hang(monkeypatch):
    monkeypatch.setattr(web, "TORNADO_APP", "raise SystemExit('no server today')\n")
    with common.private_registry(), pytest.raises(RuntimeError, match="no server today"):
        web.run_one("tornado", "tcp", 0.1)


@pytest.mark.skipif(not all(map(web.available, web.FRAMEWORKS)), reason="uvicorn or tornado missing")
def test_matrix_rows_and_goal_lines(monkeypatch, capsys):
    monkeypatch.setattr(runner, "FULL", TINY)
    rc = main(["bench", "--json", "--rows", "uvicorn,tornado"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert [r["key"] for r in res["rows"]] == ["uvicorn", "tornado"]
    for row in res["rows"]:
        assert row["unit"] == "req/s" and [f["label"] for f in row["figures"]] == ["shm", "TCP"]
        assert [f["extra"]["paths"] for f in row["figures"]] == [["shm"], ["tcp"]]
        for f in row["figures"]:
            assert {"median_us", "p99_us", "client_cpu_percent", "server_cpu_percent"} <= set(f["extra"])
    g = {x["text"]: x for x in res["goals"]}
    for fw in ("uvicorn (defaults)", "tornado"):
        goal = g[f"{fw} >= 1.5x its kernel TCP speed"]
        assert goal["met"] is not None and "CPU client" in goal["value"]
    assert {"uvicorn", "tornado", "h11"} <= set(res["versions"])


def test_missing_framework_is_a_skipped_row(monkeypatch, capsys):
    real = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tornado" else real(name, *a))
    monkeypatch.setattr(runner, "FULL", TINY)
    rc = main(["bench", "--json", "--rows", "tornado"])
    res = json.loads(capsys.readouterr()[0])
    assert rc == 0 and res["rows"] == []
    assert res["skipped_rows"] == [{"key": "tornado", "title": web.title("tornado"),
                                    "reason": "tornado not installed"}]


def test_goal_line_from_figures():
    def row(key, shm, tcp):
        extra = {"p99_us": 400.0, "client_cpu_percent": 40.0, "server_cpu_percent": 55.0}
        return Row(key, key, "req/s", [Figure("shm", shm, None, extra=dict(extra, p99_us=250.0)),
                                       Figure("TCP", tcp, None, extra=extra)])
    rows = {"uvicorn": row("uvicorn", 4500.0, 3000.0), "tornado": row("tornado", 3000.0, 2500.0)}
    got = {g.text: g for g in goals(rows)}
    uv, tor = got["uvicorn (defaults) >= 1.5x its kernel TCP speed"], got["tornado >= 1.5x its kernel TCP speed"]
    assert uv.met is True and tor.met is False
    assert uv.value == "1.50x (p99 250 vs 400 us; CPU client 40%/40%, server 55%/55%)"
    assert "1 of 2 measured goals met" in format_goals(goals(rows))
    # With each request's median time and the share of the window in
    # requests over 1 ms (a loaded host's waits for a CPU), the line says both.
    for f, med, slow in zip(rows["uvicorn"].figures, (120.0, 210.0), (70.0, 80.0)):
        f.extra.update(median_us=med, slow_time_percent=slow)
    uv = {g.text: g for g in goals(rows)}["uvicorn (defaults) >= 1.5x its kernel TCP speed"]
    assert uv.value == ("1.50x (median 120 vs 210 us; p99 250 vs 400 us; time in requests > 1 ms 70%/80%;"
                        " CPU client 40%/40%, server 55%/55%)")


def test_client_program_reads_cpu_of_another_process(tmp_path):
    """The client's /proc reading (utime + stime of the server) works on
    a process that is not itself: checked against a busy child."""
    code = web.CLIENT.split("conn = http.client")[0] + (
        "import subprocess\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 0.3: pass'])\n"
        "p.wait()\n")
    # cpu_seconds of an exited child is gone: read it while it is a zombie instead
    code = code.replace("p.wait()\n", "os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)\n"
                        "print(cpu_seconds(p.pid))\np.wait()\n")
    prog = tmp_path / "c.py"
    prog.write_text(code)
    out = subprocess.run([sys.executable, str(prog), "0", "0", "0"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) >= 0.25
