"""TLS over shrimpio shared memory vs the stdlib's TLS over kernel TCP
loopback: the same blocking code (``SSLContext.wrap_socket``, ``sendall``,
``recv_into``) in two processes pinned to two cores.

* 64-byte round trip: the client sends 64 bytes, the server answers 64;
* 1 MiB bandwidth: the client sends 1 MiB, the server reads it all and
  answers 8 bytes; with the CPU time each side spent per MiB (a busy-poll
  wait counts as CPU: shared memory spins before it sleeps).

Each kind runs in a fresh interpreter (``shm``: ``shrimpio.patch`` enabled;
``tcp``: nothing patched), the kinds interleaved over ``--rounds`` rounds;
the report gives the median of the rounds' medians and the ratio.  Needs
``trustme`` (the ``test`` extra) for the certificate.

    python -m shrimpio.bench.rows.tls [--rounds 3] [-n 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from ..common import MIB, child_python
from ..common import pin as _pin


def _recv_exact(sock, view, n: int) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def _child(kind: str, rounds: int, big_rounds: int) -> dict:
    """One measurement in this (fresh) interpreter."""
    if kind == "shm":
        import shrimpio.patch  # noqa: F401
    import socket
    import ssl

    import trustme

    import shrimpio
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(sctx)
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    lst = socket.create_server(("127.0.0.1", 0))
    rfd, wfd = os.pipe()             # the server's CPU time for the bandwidth part
    pid = os.fork()
    if pid == 0:                                   # the server
        try:
            _pin(1)
            conn, _ = lst.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lst.close()
            s = sctx.wrap_socket(conn, server_side=True)
            buf = memoryview(bytearray(MIB))
            for _ in range(rounds):
                _recv_exact(s, buf, 64)
                s.sendall(buf[:64])
            cpu = time.process_time()
            for _ in range(big_rounds):
                _recv_exact(s, buf, MIB)
                s.sendall(b"r" * 8)
            os.write(wfd, repr(time.process_time() - cpu).encode())
            s.close()
        finally:
            os._exit(0)
    _pin(0)
    raw = socket.create_connection(lst.getsockname())
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as rows/sockets.py (no Nagle stalls)
    s = cctx.wrap_socket(raw, server_hostname="127.0.0.1")
    path = shrimpio.info(s)["path"]
    assert path == ("shm" if kind == "shm" else "tcp"), path
    msg, big = b"p" * 64, b"b" * MIB
    buf = memoryview(bytearray(64))
    clock = time.perf_counter_ns
    rtt = []
    for _ in range(rounds):
        t0 = clock()
        s.sendall(msg)
        _recv_exact(s, buf, 64)
        rtt.append(clock() - t0)
    t0, cpu = clock(), time.process_time()
    for _ in range(big_rounds):
        s.sendall(big)
        _recv_exact(s, buf, 8)
    elapsed = (clock() - t0) / 1e9
    writer_cpu = time.process_time() - cpu
    s.close()
    lst.close()
    os.close(wfd)
    reader_cpu = float(os.read(rfd, 100))
    os.close(rfd)
    os.waitpid(pid, 0)
    rtt.sort()
    return {"kind": kind, "path": path, "rtt_us": rtt[len(rtt) // 2] / 1000,
            "p99_us": rtt[int(len(rtt) * 0.99)] / 1000, "mib_s": big_rounds / elapsed,
            "send_cpu_ms": writer_cpu / big_rounds * 1000,
            "recv_cpu_ms": reader_cpu / big_rounds * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m shrimpio.bench.rows.tls",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=5000, help="64-byte round trips per run")
    ap.add_argument("--mib", type=int, default=500, help="MiB sent per run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.n, args.mib)))
        return
    results: dict = {"shm": [], "tcp": []}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="shrimpio-bench-") as reg:
        env["SHRIMPIO_REGISTRY"] = reg
        for _ in range(args.rounds):
            for kind in ("shm", "tcp"):
                out = subprocess.run([*child_python(), "-m", "shrimpio.bench.rows.tls", "--child", kind, "-n", str(args.n),
                                      "--mib", str(args.mib)], capture_output=True, env=env,
                                     check=True).stdout
                results[kind].append(json.loads(out))
    summary = {k: {m: statistics.median(r[m] for r in rs) for m in ("rtt_us", "p99_us", "mib_s", "send_cpu_ms", "recv_cpu_ms")}
               for k, rs in results.items()}
    summary["ratio"] = {"rtt": summary["tcp"]["rtt_us"] / summary["shm"]["rtt_us"],
                        "bandwidth": summary["shm"]["mib_s"] / summary["tcp"]["mib_s"]}
    if args.json:
        print(json.dumps({"summary": summary, "runs": results}, indent=1))
        return
    print(f"{'':28}{'TLS over shm':>14}{'TLS over TCP':>14}{'ratio':>8}")
    s, t = summary["shm"], summary["tcp"]
    print(f"{'64 B round trip (median)':28}{s['rtt_us']:>11.1f} us{t['rtt_us']:>11.1f} us"
          f"{summary['ratio']['rtt']:>7.2f}x")
    print(f"{'64 B round trip (p99)':28}{s['p99_us']:>11.1f} us{t['p99_us']:>11.1f} us")
    print(f"{'1 MiB bandwidth':28}{s['mib_s']:>9.0f} MiB/s{t['mib_s']:>9.0f} MiB/s"
          f"{summary['ratio']['bandwidth']:>7.2f}x")
    print(f"{'  CPU per MiB, sender':28}{s['send_cpu_ms']:>11.2f} ms{t['send_cpu_ms']:>11.2f} ms")
    print(f"{'  CPU per MiB, receiver':28}{s['recv_cpu_ms']:>11.2f} ms{t['recv_cpu_ms']:>11.2f} ms")


if __name__ == "__main__":
    main()
