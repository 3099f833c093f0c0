"""``shrimpio bench-asyncio`` measures what it says: each of its
measurements, run briefly, completes, and its connections took the path the
figure is labelled with (shared memory for the shrimpio loop, TCP for
uvloop); the report prints every figure and ratio (through the table shared
with ``shrimpio bench``)."""

from __future__ import annotations

import pytest

from shrimpio.bench.rows import aio as bench

MEASUREMENTS = [("rtt", 200), ("echo-protocol", 0.1), ("echo-streams", 0.1), ("aiohttp-1", 0.1),
                ("aiohttp-4", 0.1)]


@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("test,amount", MEASUREMENTS)
def test_measurement_runs_on_its_path(kind, test, amount):
    if test.startswith("aiohttp"):
        pytest.importorskip("aiohttp")
    res = bench.run_one(kind, test, amount)     # raises if a connection took the other path
    want = "shm" if kind == "shrimpio" else "tcp"
    assert res["paths"] and set(res["paths"]) == {want}, res["paths"]
    if test == "rtt":
        assert len(res["samples"]) == amount and min(res["samples"]) > 0
    else:
        assert res["rps"] > 0
        if test.startswith("echo"):
            assert len(res["paths"]) == bench.ECHO_CLIENTS
        # The client's own CPU over the window, and each side's CPU per
        # request over the same window: each side did work for the
        # requests, at most a core's worth (one thread; a margin for where
        # the readings fall).
        assert 0 < res["client_cpu_percent"] < 150, res
        for side in ("client_cpu_us", "server_cpu_us"):
            assert 0 < res[side] <= 1.5e6 / res["rps"], (side, res)


def test_report_lists_every_figure():
    stats = {"median_us": 9.0, "p99_us": 20.0, "n": 10}
    res = {"machine": {"cpu": "cpu", "cores": 2, "python": "3.11", "kernel": "6"}, "load_before": 0.1,
           "settings": {"echo_clients": 10, "echo_bytes": 1024, "http_in_flight": [1, 4]},
           "rtt_64B": {"shrimpio": stats, "uvloop": dict(stats, median_us=90.0)},
           "echo_1KiB": {s: {"shrimpio": {"rps": 300000.0}, "uvloop": {"rps": 100000.0}}
                         for s in ("protocol", "streams")},
           "aiohttp_1": {"shrimpio": {"rps": 6000.0}, "uvloop": {"rps": 3000.0}},
           "aiohttp_4": {"shrimpio": {"rps": 15000.0}, "uvloop": {"rps": 10000.0}},
           "ratios": {"rtt_uvloop_over_shrimpio": 10.0, "echo_protocol_shrimpio_over_uvloop": 3.0,
                      "echo_streams_shrimpio_over_uvloop": 3.0, "aiohttp_1_shrimpio_over_uvloop": 2.0,
                      "aiohttp_4_shrimpio_over_uvloop": 1.5}}
    text = " ".join(bench.report(res).split())      # columns are padded: compare words
    for needle in ("shm 9.00 p99 20.0 | uvloop TCP 90.0 (10x)",
                   "shm 300000 p99 - | uvloop TCP 100000 (3.00x)",
                   "shm 15000 p99 - | uvloop TCP 10000 (1.50x)", "shm 6000 p99 - | uvloop TCP 3000 (2.00x)",
                   "aiohttp hello world, 1 in flight",
                   "asyncio echo 10x1 KiB, Protocol server", "asyncio echo 10x1 KiB, streams server",
                   "aiohttp hello world, 4 in flight", "load average 0.10 at the start"):
        assert needle in text, (needle, text)


def test_streams_bound_runs_the_echo_server_code():
    """The bound of the streams echo is asyncio's own server code on a
    transport that costs nothing: it completes requests, many per second
    (thousands even on a loaded machine; 0 if the loop-back broke), each
    for some CPU (at most a core's worth of the window per request)."""
    res = bench.streams_bound(0.2)
    assert res["rps"] > 1000, res
    assert 0 < res["cpu_us"] <= 1.5e6 / res["rps"], res
