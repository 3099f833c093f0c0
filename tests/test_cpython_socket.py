"""CPython's own socket tests, patched: the TCP classes of ``test.test_socket``
(those gevent-style monkey-patch testing runs) pass with ``import
shrimpio.patch`` done first exactly as they pass on the stdlib.

The classes (``cpython_socket_runner.CLASSES``) run twice, each time in a
child interpreter: patched and unpatched.  Every test must pass patched, or
have there the outcome it has on the stdlib (a skip for the same reason, or
a failure the stdlib run has too: the machine's, not shrimpio's).  The
patched run reports its connections (``SHRIMPIO_REPORT``), each under the
test that made it: they must all have been over shared memory, so the test
cannot pass by falling back to TCP; the one exception, a connection that
escaped by design, is listed in ``EXPECTED_TCP`` with its reason.

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
import time

import pytest

from children import child_env

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpython_socket_runner.py")
#: Longest the two runs of the classes (at once) may take: about 30 s on an
#: idle machine, 2 min on two cores at a load of 10; most of it the tests'
#: own sleeps and timeouts.
RUN_TIMEOUT = 300


_DETACH_RACE = (
    ("fd escaped: detach()", "kernel socket from a file descriptor"),
    "socket(fileno=f) after detach() takes a connection back onto shared memory "
    "only if no byte moved through the escape's relay yet; here the peer's MSG, "
    "sent concurrently, may have been relayed to the kernel stream first, so the "
    "new socket stays on it (the bytes arrive, in order: the test passes either way). "
    "Once the relay has also passed the peer's close on (a loaded machine may run "
    "the peer's whole side first), the escape is over and the new object is a "
    "kernel socket made from an fd, reported as such (the relay reported the "
    "connection, 'fd escaped: detach()', when it ended)")

#: Tests whose connection may end up off shared memory: the reasons shrimpio
#: may report, and why that is its design, not a fallback.
EXPECTED_TCP = {
    "test.test_socket.BasicTCPTest.testDetach": _DETACH_RACE,
    "test.test_socket.BasicTCPTest2.testDetach": _DETACH_RACE,
}


_PASS = {"outcome": "pass"}


def _have_test_socket() -> bool:
    try:
        return importlib.util.find_spec("test.test_socket") is not None
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _have_test_socket(),
                                reason="CPython's test package (test.test_socket) is not installed")


def _start(out: str, patched: bool, report: str, log: str) -> subprocess.Popen:
    """Start one run of the classes, writing its outcomes to ``out`` and its
    output (ResourceWarnings shown) to ``log``."""
    # No SHRIMPIO_* setting of ours reaches the children but the registry
    # (the conftest's, checked for leftovers) and, patched, the report.
    ours = [k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"]
    env = child_env({"SHRIMPIO_REPORT": report} if patched else {}, drop=ours)
    args = ([sys.executable, "-W", "always::ResourceWarning", RUNNER]
            + (["--patched"] if patched else []) + [out])
    with open(log, "wb") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, what: str, log: str, deadline: float) -> str:
    """Wait (until ``deadline``) for a run to end well; its output."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the {what} run took over {RUN_TIMEOUT}s:\n" + _read(log)[-4000:])
    assert proc.returncode == 0, f"the {what} run failed:\n" + _read(log)[-4000:]
    return _read(log)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def _unclosed(output: str) -> list[str]:
    """The ResourceWarnings of objects left unclosed in a run's output."""
    return [line for line in output.splitlines() if "ResourceWarning: unclosed" in line]


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_cpython_tcp_socket_tests_pass_patched(tmp_path):
    std_out, shm_out = str(tmp_path / "stdlib.json"), str(tmp_path / "patched.json")
    report = str(tmp_path / "report.jsonl")
    # Both at once: the runs spend most of their time asleep.
    deadline = time.monotonic() + RUN_TIMEOUT
    procs = []
    try:
        for what, out, patched in (("stdlib", std_out, False), ("patched", shm_out, True)):
            log = str(tmp_path / f"{what}.log")
            procs.append((_start(out, patched, report, log), what, log))
        std_output, shm_output = (_finish(proc, what, log, deadline) for proc, what, log in procs)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(std_out) as f:
        std = json.load(f)["outcomes"]
    with open(shm_out) as f:
        shm = json.load(f)["outcomes"]

    assert std, "no test ran"
    # (A subtest has an outcome only where it failed: its id is its test's
    # and a description, after a space.)
    tests = {tid for tid in std if " " not in tid}
    assert tests == {tid for tid in shm if " " not in tid}, (
        "the runs ran different tests: "
        f"{sorted(tests ^ {tid for tid in shm if ' ' not in tid})}")
    bad = {tid: out for tid, out in shm.items()
           if out["outcome"] != "pass" and out["outcome"] != std.get(tid, _PASS)["outcome"]}
    assert not bad, "\n\n".join(
        f"{tid}: {out['outcome']} (stdlib: {std.get(tid, _PASS)['outcome']})\n"
        f"{out.get('details', '')}" for tid, out in sorted(bad.items()))

    # Nothing of shrimpio's left unclosed for the program to be warned of.
    assert len(_unclosed(shm_output)) <= len(_unclosed(std_output)), (
        "patched: " + "\n".join(_unclosed(shm_output))
        + "\nstdlib: " + "\n".join(_unclosed(std_output)))

    # Every connection the patched tests made was over shared memory, but
    # for the escapes of EXPECTED_TCP.
    by_test = _report_by_test(report)
    shm = sum(1 for recs in by_test.values() for r in recs if r["path"] == "shm")
    assert shm > 0, "no connection over shared memory"
    tcp = [f"{tid}: {r['path']} ({r['reason']})"
           for tid, recs in sorted(by_test.items()) for r in recs
           if r["path"] != "shm" and r["reason"] not in EXPECTED_TCP.get(tid, ((),))[0]]
    assert not tcp, "connections not over shared memory:\n" + "\n".join(tcp)


def _report_by_test(path: str) -> dict[str, list[dict]]:
    """The patched run's report lines, by the test that made them (each
    follows the runner's marker of its test)."""
    out: dict[str, list[dict]] = collections.defaultdict(list)
    test = "(before the tests)"
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "test" in record:
                test = record["test"]
            else:
                out[test].append(record)
    return out
