"""Content shared by the app-matrix programs and tests: deterministic bytes
(a reordered, lost or repeated chunk changes the digest)."""

import hashlib
import random


def blob(n: int) -> bytes:
    """``n`` pseudo-random bytes, the same for every caller."""
    return random.Random(n).randbytes(n)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]

def echo_exchange(sock, f, name: bytes) -> tuple[int, str]:
    """The line-echo clients' exchange on a connected ``sock`` (and
    ``f = sock.makefile("rb")``): 20 small lines, then one 300 kB line,
    each echo checked.  (the big line's length, the digest of its echo)"""
    for i in range(20):
        line = b"%s line %d\n" % (name, i)
        sock.sendall(line)
        got = f.readline()
        assert got == line, (got, line)
    big = blob(300_000).replace(b"\n", b".") + b"\n"
    sock.sendall(big)
    reply = f.readline()
    assert reply == big, len(reply)
    return len(big), digest(reply)


#: Each network operation's limit in the clients (seconds): generous for a
#: loaded machine, short enough that a hang fails fast.
TIMEOUT = 6


def run_all(fn, n, threads):
    """``fn(0..n-1)`` on ``threads`` threads: the results; the first failure
    is raised at once, the calls not yet started are cancelled."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    pool = ThreadPoolExecutor(threads)
    try:
        futures = [pool.submit(fn, i) for i in range(n)]
        wait(futures, return_when=FIRST_EXCEPTION)
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
