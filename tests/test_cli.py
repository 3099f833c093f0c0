"""The ``shrimpio`` command: ``run`` (file and -m), argument and exit-code
pass-through, errors; ``patch.enable``/``disable`` round trip."""

from __future__ import annotations

import os
import select
import selectors
import socket
import subprocess
import sys
import textwrap

import shrimpio
import shrimpio.patch as patch
from children import PKG_PARENT, child_env
from shrimpio.socket import StdSocket

patch.disable()        # importing shrimpio.patch enabled it; tests here choose

PROBE = textwrap.dedent("""
    import socket, subprocess, sys
    print(socket.socket.__module__, sys.argv[1:])
    child = subprocess.run([sys.executable, "-c", "import socket; print(socket.socket.__module__)"],
                           capture_output=True, text=True, check=True)
    print("child", child.stdout.strip())
    sys.exit(7)
""")


def _env() -> dict:
    """A child's environment: unpatched, with only the shrimpio under test on
    its path (no ``shrimpio.patch`` boot directory an earlier test left)."""
    return child_env(drop=("SHRIMPIO_PATCH",), inherit_pythonpath=False)


def _shrimpio(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shrimpio", *args], capture_output=True,
                          text=True, env=_env(), timeout=60)


def test_run_file_patches_program_and_children_and_passes_args_and_exit_code(tmp_path):
    prog = tmp_path / "probe.py"
    prog.write_text(PROBE)
    res = _shrimpio("run", str(prog), "a", "--flag")
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == ["shrimpio.socket ['a', '--flag']", "child shrimpio.socket"]


def test_run_module(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), PKG_PARENT])
    res = subprocess.run([sys.executable, "-m", "shrimpio", "run", "-m", "probe_mod", "x"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines()[0] == "shrimpio.socket ['x']"


def test_unpatched_program_stays_unpatched(tmp_path):
    prog = tmp_path / "probe.py"
    prog.write_text(PROBE)
    res = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert res.stdout.splitlines() == ["socket []", "child socket"]


def test_run_errors():
    res = _shrimpio("run", "/nonexistent/prog.py")
    assert res.returncode == 2 and "no such file" in res.stderr
    res = _shrimpio("run", "-m")
    assert res.returncode == 2 and "-m needs a module" in res.stderr
    res = _shrimpio("run")
    assert res.returncode == 2


def test_enable_disable_round_trip():
    patch.disable()                         # whatever an earlier test left
    saved_path = os.environ.get("PYTHONPATH")
    try:
        assert socket.socket is StdSocket and not patch.enabled()
        orig_select, orig_poll = select.select, select.poll
        patch.enable()
        patch.enable()                      # idempotent
        assert socket.socket is shrimpio.socket.socket
        assert select.select is not orig_select and select.poll is not orig_poll
        assert selectors.PollSelector._selector_cls is select.poll
        assert os.environ["SHRIMPIO_PATCH"] == "1"
        assert patch.BOOT_DIR in os.environ["PYTHONPATH"].split(os.pathsep)
        patch.disable()
        assert socket.socket is StdSocket
        assert select.select is orig_select and select.poll is orig_poll
        assert "SHRIMPIO_PATCH" not in os.environ
        assert os.environ.get("PYTHONPATH") == saved_path
    finally:
        patch.disable()
