"""CPython's own socket tests, patched: the TCP classes of ``test.test_socket``
(those gevent-style monkey-patch testing runs) pass with ``import
shrimpio.patch`` done first exactly as they pass on the stdlib.

The classes (``cpython_socket_runner.CLASSES``) run twice, each time in a
child interpreter: patched and unpatched.  Every test must pass patched, or
have there the outcome it has on the stdlib (a skip for the same reason, or
a failure the stdlib run has too: the machine's, not shrimpio's).  The
patched run reports its connections (``SHRIMPIO_REPORT``): they must all
have been over shared memory, so the test cannot pass by falling back to
TCP.

``test.test_socket`` ships with CPython's test package, which some Python
builds leave out: then this skips.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from children import child_env

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpython_socket_runner.py")
#: Longest one run of the classes may take (about 25 s alone, most of it the
#: tests' own sleeps and timeouts).
RUN_TIMEOUT = 300


def _have_test_socket() -> bool:
    try:
        return importlib.util.find_spec("test.test_socket") is not None
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _have_test_socket(),
                                reason="CPython's test package (test.test_socket) is not installed")


def _start(out: str, patched: bool, report: str) -> subprocess.Popen:
    # No SHRIMPIO_* setting of ours reaches the children but the registry
    # (the conftest's, checked for leftovers) and, patched, the report.
    ours = [k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"]
    env = child_env({"SHRIMPIO_REPORT": report} if patched else {}, drop=ours)
    args = [sys.executable, RUNNER] + (["--patched"] if patched else []) + [out]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, what: str) -> None:
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"the {what} run took over {RUN_TIMEOUT}s:\n"
                             + output.decode(errors="replace")[-4000:])
    assert proc.returncode == 0, f"the {what} run failed:\n" + output.decode(errors="replace")[-4000:]


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_cpython_tcp_socket_tests_pass_patched(tmp_path):
    std_out, shm_out = str(tmp_path / "stdlib.json"), str(tmp_path / "patched.json")
    report = str(tmp_path / "report.jsonl")
    # Both at once: the runs spend most of their time asleep.
    procs = [(_start(std_out, False, report), "stdlib"), (_start(shm_out, True, report), "patched")]
    try:
        for proc, what in procs:
            _finish(proc, what)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(std_out) as f:
        std = json.load(f)["outcomes"]
    with open(shm_out) as f:
        shm = json.load(f)["outcomes"]

    assert std, "no test ran"
    assert set(shm) == set(std), ("the runs ran different tests: "
                                  f"{sorted(set(shm) ^ set(std))}")
    bad = {tid: out for tid, out in shm.items()
           if out["outcome"] != "pass" and out["outcome"] != std[tid]["outcome"]}
    assert not bad, "\n\n".join(
        f"{tid}: {out['outcome']} (stdlib: {std[tid]['outcome']})\n{out.get('details', '')}"
        for tid, out in sorted(bad.items()))

    # Every connection the patched tests made was over shared memory.
    with open(report) as f:
        records = [json.loads(line) for line in f]
    paths = collections.Counter(r["path"] for r in records)
    assert paths["shm"] > 0, f"no connection over shared memory: {paths}"
    tcp = collections.Counter(r["reason"] for r in records if r["path"] != "shm")
    assert not tcp, f"connections over TCP (reason: count): {dict(tcp)}"
