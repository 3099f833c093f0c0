"""The msg rows of shrimpio bench, measured small: each kind runs and
gives samples; the posted receive counts no receiver copy."""

from __future__ import annotations

import importlib.util

import pytest

from shrimpio.bench.rows import msg as B
from shrimpio.bench.runner import Figure, Spec, specs

pytest.importorskip("numpy")


def test_rows_registered():
    keys = [sp.key for sp in specs()]
    assert {"msg_rtt", "msg_1m", "msg_64m"} <= set(keys)
    assert [label for label, _ in B.specs(Spec, Figure)[0].kinds][0] == "shrimpio.msg"


@pytest.mark.parametrize("fn", [B.rtt_msg, B.rtt_mp])
def test_rtt_kinds(fn):
    samples = fn(50)
    assert len(samples) == 50 and all(s > 0 for s in samples)


def test_msg_posted_no_receiver_copy():
    samples, extra = B.bw_msg(3, 1 << 20)
    assert len(samples) == 3
    if B._cma_ok():
        assert extra["receiver_copied"] == 0


def test_bw_peers():
    assert len(B.bw_mp(2, 1 << 20)) == 2
    assert len(B.bw_memcpy(2, 1 << 20)) == 2


@pytest.mark.skipif(importlib.util.find_spec("zmq") is None, reason="pyzmq not installed")
def test_zmq_kinds():
    assert len(B.rtt_zmq(20)) == 20
    assert len(B.bw_zmq(2, 1 << 20)) == 2


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed")
def test_mpi_kinds():
    assert len(B.rtt_mpi(20)) == 20
    assert len(B.bw_mpi(2, 1 << 20)) == 2


def test_missing_package_is_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("zmq", "mpi4py") else real(name, *a))
    with pytest.raises(B.NotInstalled, match="pyzmq not installed"):
        B.rtt_zmq(1)
    with pytest.raises(B.NotInstalled, match="mpi4py not installed"):
        B.rtt_mpi(1)
