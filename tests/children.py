"""Helpers for the child processes that tests start: the environment of a
child ``python`` (the shrimpio under test importable), reaping a child with
a deadline, and a forked child's drop to user ``nobody``.

Children run in the test's directory (conftest chdirs to tmp_path), never in
the source tree, whose ``shrimpio/`` may be uncompiled: they find the
package through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Iterable, Optional

import shrimpio

#: Where the ``shrimpio`` under test lives (the installed package, or an
#: in-place build): child interpreters get it first on their path.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(shrimpio.__file__)))

#: The uid and gid of user ``nobody``.
NOBODY = 65534


def child_env(extra: Optional[dict] = None, *, drop: Iterable[str] = (),
              inherit_pythonpath: bool = True) -> dict:
    """The environment for a child ``python``: ours less the names in
    ``drop``, with ``PKG_PARENT`` first on ``PYTHONPATH`` (followed by the
    rest of ours if ``inherit_pythonpath``, else alone), updated by ``extra``."""
    dropped = set(drop)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    paths = env.get("PYTHONPATH", "").split(os.pathsep) if inherit_pythonpath else []
    env["PYTHONPATH"] = os.pathsep.join([PKG_PARENT] + [p for p in paths if p and p != PKG_PARENT])
    env.update(extra or {})
    return env


def reap(pid: int, timeout: float) -> int:
    """Reap child ``pid``, which must exit by itself within ``timeout``
    (else it is killed, reaped, and this fails); its exit code."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child {pid} did not exit within {timeout}s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def drop_to_nobody() -> None:
    """In a forked child: give up root for user and group ``nobody``."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
