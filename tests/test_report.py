"""``SHRIMPIO_REPORT``: one line for every connection a process had, however
it ends.

A connection closed by the program writes its line when it closes; one
still open when the process exits (a ``makefile()`` never closed, a socket
the program just left, a transport never closed) writes its line at exit,
marked ``"open_at_exit": true``, and only that one line.  The programs run as
real processes against the README's example echo server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from program_runner import SHM, TCP, CLIENT_TIMEOUT, _env, read_report, server, server_records

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> str:
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not here (installed package without the source tree)")
    return str(path)


def _run(args: list, report: Path, *, patched: bool = True, env: dict | None = None,
         check_rc: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + (["-m", "shrimpio", "run"] if patched else []) + [str(a) for a in args]
    res = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL,
                         env=_env(report, env), timeout=CLIENT_TIMEOUT)
    assert res.returncode == check_rc, (res.returncode, res.stdout.decode(), res.stderr.decode())
    return res


def test_readme_echo_client_reports_to_stderr(tmp_path):
    """The README's line: ``SHRIMPIO_REPORT=/dev/stderr shrimpio run
    examples/echo_client.py PORT`` prints its connection's line (the
    example's makefile() is never closed: the line is written at exit)."""
    with server(_example("echo_server.py"), patched=True) as srv:
        res = _run([_example("echo_client.py"), srv.port, 50], tmp_path / "unused",
                   env={"SHRIMPIO_REPORT": "/dev/stderr"})
        assert res.stdout.decode().startswith("50 round trips, median "), res.stdout
        lines = [json.loads(line) for line in res.stderr.decode().splitlines() if line.startswith("{")]
        assert len(lines) == 1, res.stderr.decode()
        rec = lines[0]
        assert rec["path"] == SHM and rec["reason"] == "" and rec["open_at_exit"] is True, rec
        sent = sum(len(b"ping %d\n" % i) for i in range(50))
        assert rec["bytes_sent"] == rec["bytes_received"] == sent, rec
        served = server_records(srv, 1)
        assert served[0]["bytes_received"] == sent and "open_at_exit" not in served[0], served


# Each program connects to the server (port in argv[1]), sends b"ping\n",
# reads the echo, then ends as its name says without closing the socket.
_ENDINGS = {
    "end-of-script": ("", 0),
    "sys-exit": ("sys.exit(3)", 3),
    "uncaught-exception": ("raise RuntimeError('the program fails')", 1),
    "closed-then-exit": ("sock.close()", 0),
    "makefile-never-closed": ("f = sock.makefile('rwb'); sock.close()", 0),
}

_PROGRAM = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"ping\\n")
got = b""
while not got.endswith(b"\\n"):
    got += sock.recv(100)
{ending}
"""


@pytest.mark.parametrize("ending", list(_ENDINGS))
def test_one_line_per_connection_however_the_program_ends(tmp_path, ending):
    code, rc = _ENDINGS[ending]
    prog = tmp_path / "prog.py"
    prog.write_text(_PROGRAM.format(ending=code))
    report = tmp_path / "client.report"
    with server(_example("echo_server.py"), patched=True) as srv:
        _run([prog, srv.port], report, check_rc=rc)
        records = read_report(report)
        assert len(records) == 1, records
        rec = records[0]
        assert rec["path"] == SHM and rec["bytes_sent"] == rec["bytes_received"] == 5, rec
        assert rec.get("open_at_exit", False) is (ending != "closed-then-exit"), rec
        server_records(srv, 1)


_MP_PROGRAM = """
import multiprocessing, socket, sys

kept = []

def child(port):
    sock = socket.create_connection(("127.0.0.1", port))
    kept.append(sock)
    sock.sendall(b"from the child\\n")
    got = b""
    while not got.endswith(b"\\n"):
        got += sock.recv(100)
    # left open: the child ends by os._exit, after multiprocessing's finalizers

if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    p = multiprocessing.Process(target=child, args=(int(sys.argv[1]),))
    p.start()
    p.join()
    assert p.exitcode == 0, p.exitcode
"""


def test_multiprocessing_child_reports_its_open_connection(tmp_path):
    prog = tmp_path / "mp_prog.py"
    prog.write_text(_MP_PROGRAM)
    report = tmp_path / "client.report"
    with server(_example("echo_server.py"), patched=True) as srv:
        _run([prog, srv.port], report)
        records = read_report(report)
        assert len(records) == 1, records
        assert records[0]["path"] == SHM and records[0]["open_at_exit"] is True, records
        assert records[0]["bytes_sent"] == len(b"from the child\n"), records
        server_records(srv, 1)


_ASYNC_PROGRAM = """
import asyncio, sys

async def main(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping\\n")
    assert await reader.readline() == b"ping\\n"
    return writer                    # never closed

loop = asyncio.new_event_loop()
kept = loop.run_until_complete(main(int(sys.argv[1])))
# neither the transport nor the loop is closed
"""


@pytest.mark.parametrize("server_patched", [True, False], ids=["shm", "tcp-fallback"])
def test_asyncio_transport_never_closed_is_reported(tmp_path, server_patched):
    """A transport still open at exit: the shrimpio loop's over shared
    memory, and uvloop's on kernel TCP (its counts from the kernel)."""
    prog = tmp_path / "async_prog.py"
    prog.write_text(textwrap.dedent(_ASYNC_PROGRAM))
    report = tmp_path / "client.report"
    with server(_example("echo_server.py"), patched=server_patched) as srv:
        _run([prog, srv.port], report)
        records = read_report(report)
        assert len(records) == 1, records
        rec = records[0]
        assert rec["path"] == (SHM if server_patched else TCP), rec
        assert rec["open_at_exit"] is True and rec["bytes_sent"] == rec["bytes_received"] == 5, rec


_CLOSE_RACE = """
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    sock = socket.create_connection(("127.0.0.1", port))
    keep = sock.dup() if i % 2 else None        # a second object on the connection
    sock.sendall(b"ping\\n")
    got = b""
    while not got.endswith(b"\\n"):
        got += sock.recv(100)
    start = threading.Barrier(3)
    def closer():
        start.wait()
        sock.close()
    threads = [threading.Thread(target=closer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sock.fileno() == -1
    if keep is not None:
        # The connection is the dup's still: one close, however many threads made it.
        keep.sendall(b"still here\\n")
        got = b""
        while not got.endswith(b"\\n"):
            got += keep.recv(100)
        assert got == b"still here\\n", got
        keep.close()
print("done")
"""


def test_a_socket_closed_by_several_threads_at_once_closes_once(tmp_path):
    """Three threads close one socket at the same moment (paramiko's
    transport thread and its owner do): the connection is let go once (a
    dup of it keeps working) and reported once, with its addresses; the
    stdlib's close is idempotent under the same race."""
    n = 30
    prog = tmp_path / "prog.py"
    prog.write_text(_CLOSE_RACE)
    report = tmp_path / "client.report"
    with server(_example("echo_server.py"), patched=True) as srv:
        res = _run([prog, srv.port, n], report)
        assert res.stdout.decode().strip() == "done", res
        records = read_report(report)
        # One line per socket object: the n closed by the threads, and the
        # n/2 dups; each with the connection's TCP addresses.
        odd = [r for r in records if r["peer"] != ["127.0.0.1", int(srv.port)] or r["path"] != SHM]
        assert not odd, odd
        # (Ports are not a key: a closed connection's port comes back.)
        assert len(records) == n + n // 2, records
        server_records(srv, n)
