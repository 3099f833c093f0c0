"""``shrimpio bench-asyncio`` measures what it says: each of its
measurements, run briefly, completes, and its connections took the path the
figure is labelled with (shared memory for the shrimpio loop, TCP for
uvloop); the report prints every figure and ratio."""

from __future__ import annotations

import pytest

from shrimpio import _bench_asyncio as bench

MEASUREMENTS = [("rtt", 200), ("echo-protocol", 0.1), ("echo-streams", 0.1), ("aiohttp", 0.1)]


@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("test,amount", MEASUREMENTS)
def test_measurement_runs_on_its_path(kind, test, amount):
    if test == "aiohttp":
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


def test_report_lists_every_figure():
    stats = {"median_us": 9.0, "p99_us": 20.0, "n": 10}
    res = {"machine": {"cpu": "cpu", "cores": 2, "python": "3.11", "kernel": "6"}, "load_before": 0.1,
           "settings": {"echo_clients": 10, "echo_bytes": 1024, "http_concurrency": 4},
           "rtt_64B": {"shrimpio": stats, "uvloop": dict(stats, median_us=90.0)},
           "echo_1KiB": {s: {"shrimpio": {"rps": 300000.0}, "uvloop": {"rps": 100000.0}}
                         for s in ("protocol", "streams")},
           "aiohttp": {"shrimpio": {"rps": 15000.0}, "uvloop": {"rps": 10000.0}},
           "ratios": {"rtt_uvloop_over_shrimpio": 10.0, "echo_protocol_shrimpio_over_uvloop": 3.0,
                      "echo_streams_shrimpio_over_uvloop": 3.0, "aiohttp_shrimpio_over_uvloop": 1.5}}
    text = bench.report(res)
    for needle in ("9.00 us", "90.00 us", "300000", "100000", "15000", "10000",
                   "10.0x faster than uvloop TCP", "3.00x (protocol server)", "3.00x (streams server)",
                   "aiohttp: shrimpio/uvloop = 1.50x"):
        assert needle in text, (needle, text)
