"""Pre-fork servers: one listening socket used by several worker processes
accepts over shared memory in every worker, each connection served once,
the load spread over the workers, as the kernel does for TCP.  Real
processes under ``shrimpio run``; the workers answer with their pid."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from children import child_env

SERVER = """
import multiprocessing as mp, os, socket, sys

def serve(lsock, ready):
    ready.put(os.getpid())
    while True:
        conn, _ = lsock.accept()
        with conn:
            data = conn.recv(100)
            if data == b"stop":
                return
            conn.sendall(b"%d" % os.getpid())

if __name__ == "__main__":
    how, start = sys.argv[1], sys.argv[2]
    ctx = mp.get_context(start)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    if how == "parent-listens":
        lsock.listen(128)          # the parent listens, the workers accept
    # else uvicorn's way: bound in the parent, each worker calls listen()
    ready = ctx.Queue()
    target = serve if how == "parent-listens" else listen_then_serve
    workers = [ctx.Process(target=target, args=(lsock, ready)) for _ in range(2)]
    for w in workers:
        w.start()
    pids = sorted(ready.get(timeout=30) for _ in workers)
    print(lsock.getsockname()[1], *pids, flush=True)
    for w in workers:
        w.join(60)
        assert w.exitcode == 0, w.exitcode
    lsock.close()
"""

# The worker of the bound-in-the-parent case listens first.
SERVER = SERVER.replace('if __name__ == "__main__":', '''def listen_then_serve(lsock, ready):
    lsock.listen(128)
    serve(lsock, ready)

if __name__ == "__main__":''')


def _run(tmp_path, how: str, start: str, connections: int = 40):
    report = tmp_path / "report.jsonl"
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(SERVER))
    env = child_env({"SHRIMPIO_REPORT": str(report)})
    # Its own process group: the workers it starts go with it, whatever happens.
    server = subprocess.Popen([sys.executable, "-m", "shrimpio", "run", str(script), how, start],
                              env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = server.stdout.readline().split()
        assert len(line) == 3, line
        port, workers = int(line[0]), {int(p) for p in line[1:]}
        client_py = tmp_path / "client.py"
        client_py.write_text(textwrap.dedent(f"""
            import socket
            for i in range({connections}):
                with socket.create_connection(("127.0.0.1", {port}), timeout=10) as c:
                    c.sendall(b"hi")
                    print(c.recv(100).decode(), flush=True)
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", {port}), timeout=10) as c:
                    c.sendall(b"stop")
                    c.recv(1)
        """))
        client = subprocess.run([sys.executable, "-m", "shrimpio", "run", str(client_py)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert server.wait(timeout=60) == 0
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)       # the workers too, if the test failed
        except ProcessLookupError:
            pass
        server.wait()
        server.stdout.close()
    served = collections.Counter(int(x) for x in client.stdout.split())
    records = [json.loads(x) for x in report.read_text().splitlines()]
    return workers, served, records


@pytest.mark.parametrize("start", ["spawn", "fork"])
@pytest.mark.parametrize("how", ["parent-listens", "workers-listen"])
def test_workers_share_a_listener_over_shared_memory(tmp_path, how, start):
    workers, served, records = _run(tmp_path, how, start)
    assert sum(served.values()) == 40
    assert set(served) <= workers, (served, workers)       # never the parent
    assert len(served) == 2, served                         # both workers served
    tcp = [r for r in records if r["path"] != "shm"]
    assert not tcp, tcp
