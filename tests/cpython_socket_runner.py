"""Run TCP classes of CPython's own ``test.test_socket`` and write, as JSON,
one outcome per test id.  Run as a child process by
tests/test_cpython_socket.py, once with ``--patched`` (``import
shrimpio.patch`` before anything imports ``socket``'s users) and once
without, so the two can be compared test by test::

    python cpython_socket_runner.py [--patched] OUT.json [CLASS ...]

An outcome is ``"pass"``, ``"fail"``, ``"error"``, ``"skip: <reason>"``,
``"xfail"`` or ``"xpass"``; failures and errors also give their traceback
(under ``"details"``).

Patched, with ``SHRIMPIO_REPORT`` set, the runner writes a marker line
``{"test": <id>}`` into the report before each test (and ``{"test":
"(exit)"}`` after the last), so each connection's line follows the marker of
the test that made it: a test's sockets are closed (and reported) before the
next test starts, the runner collecting garbage and waiting for escaped
connections' relay to let go of them first.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

#: The classes run (the TCP ones; those gevent-style monkey-patch testing runs).
CLASSES = (
    "BasicTCPTest", "BasicTCPTest2",
    "SendmsgTCPTest", "RecvmsgTCPTest", "RecvmsgIntoTCPTest",
    "NonBlockingTCPTests",
    "FileObjectClassTestCase", "UnbufferedFileObjectClassTestCase",
    "LineBufferedFileObjectClassTestCase", "SmallBufferedFileObjectClassTestCase",
    "UnicodeReadFileObjectClassTestCase", "UnicodeWriteFileObjectClassTestCase",
    "UnicodeReadWriteFileObjectClassTestCase",
    "SendfileUsingSendTest", "SendfileUsingSendfileTest",
    "CreateServerTest", "CreateServerFunctionalTest",
    "NetworkConnectionNoServer", "NetworkConnectionAttributesTest",
    "NetworkConnectionBehaviourTest",
    "InterruptedSendTimeoutTest", "TCPCloserTest", "TCPTimeoutTest",
    "ContextManagersTest", "BufferIOTest",
    # The socket class itself (creation, options, fds, timeouts, errors).
    "GeneralModuleTests", "InheritanceTest", "NonblockConstantTest", "TestExceptions",
    "BasicSocketPairTest",
)

#: Longest the runner waits after a test for escaped connections' relay to
#: let them go (it normally takes a millisecond).
RELAY_WAIT = 30.0


def _mark(test_id: str) -> None:
    """Write the marker of ``test_id`` into the report (patched runs)."""
    path = os.environ.get("SHRIMPIO_REPORT")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps({"test": test_id}) + "\n").encode())
    finally:
        os.close(fd)


def _settle() -> None:
    """After a test: its unreferenced sockets closed, and its escaped
    connections let go by the relay, so their report lines come before the
    next test's marker."""
    gc.collect()
    from shrimpio import _escape
    deadline = time.monotonic() + RELAY_WAIT
    while _escape.relay_count() and time.monotonic() < deadline:
        time.sleep(0.001)


def main(argv: list[str]) -> int:
    patched = "--patched" in argv
    args = [a for a in argv if a != "--patched"]
    out_path, names = args[0], args[1:] or list(CLASSES)
    if patched:
        import shrimpio.patch  # noqa: F401  (before test.test_socket imports socket)
    import unittest
    from test import test_socket

    outcomes: dict[str, dict] = {}

    class Result(unittest.TestResult):
        def startTest(self, test):
            if patched:
                _mark(test.id())
            super().startTest(test)

        def stopTest(self, test):
            super().stopTest(test)
            if patched:
                _settle()

        def addSuccess(self, test):
            outcomes[test.id()] = {"outcome": "pass"}

        def addFailure(self, test, err):
            outcomes[test.id()] = {"outcome": "fail", "details": self._exc_info_to_string(err, test)}

        def addError(self, test, err):
            tid = test.id() if hasattr(test, "id") else str(test)
            outcomes[tid] = {"outcome": "error", "details": self._exc_info_to_string(err, test)}

        def addSkip(self, test, reason):
            outcomes[test.id()] = {"outcome": f"skip: {reason}"}

        def addExpectedFailure(self, test, err):
            outcomes[test.id()] = {"outcome": "xfail"}

        def addUnexpectedSuccess(self, test):
            outcomes[test.id()] = {"outcome": "xpass"}

        def addSubTest(self, test, subtest, err):
            if err is not None:
                kind = "fail" if issubclass(err[0], test.failureException) else "error"
                outcomes[subtest.id()] = {"outcome": kind,
                                          "details": self._exc_info_to_string(err, test)}

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in names:
        suite.addTests(loader.loadTestsFromTestCase(getattr(test_socket, name)))
    t0 = time.monotonic()
    suite.run(Result())
    if patched:
        _mark("(exit)")
    with open(out_path, "w") as f:
        json.dump({"patched": patched, "seconds": time.monotonic() - t0,
                   "outcomes": outcomes}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
