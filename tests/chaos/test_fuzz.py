"""The fuzz targets (shrimpio/_chaos/fuzz.py): the seed corpus in
tests/chaos/fuzz/corpus is replayed in the default run (no atheris
needed); ``pytest -m chaos`` also fuzzes each target for a while with
atheris when it is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from children import child_env

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "corpus")
TARGETS = ["hello", "control", "ring", "notes"]


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target):
    """In a child: a target that crashed would take pytest with it."""
    res = subprocess.run([sys.executable, "-m", "shrimpio._chaos.fuzz", "replay",
                          os.path.join(CORPUS, target)], capture_output=True, text=True,
                         env=child_env(drop=("SHRIMPIO_PATCH",)), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failures" in res.stdout and "replayed 0 " not in res.stdout


def test_seeds_are_in_the_corpus():
    """The corpus holds at least the built-in seeds (fuzz.SEEDS)."""
    from shrimpio._chaos.fuzz import SEEDS
    for target, seeds in SEEDS.items():
        have = set()
        for name in os.listdir(os.path.join(CORPUS, target)):
            with open(os.path.join(CORPUS, target, name), "rb") as f:
                have.add(f.read())
        assert set(seeds()) <= have, target


@pytest.mark.chaos
@pytest.mark.timeout(0)
def test_fuzz_each_target():
    pytest.importorskip("atheris")
    from shrimpio._chaos import run_fuzz
    seconds = float(os.environ.get("SHRIMPIO_FUZZ_SECONDS", "120"))
    out: list[str] = []
    res = run_fuzz(seconds, out.append)
    assert all(v.startswith("ok") for v in res.values()), "\n".join(out)
