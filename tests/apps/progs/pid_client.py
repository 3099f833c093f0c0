"""``pid_client.py port connections threads``: each connection sends a line
and reads the serving process's id; prints how many each process served."""

import collections
import json
import socket
import sys

from appdata import TIMEOUT, run_all

port, conns, threads = map(int, sys.argv[1:4])


def one(_):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        sock.sendall(b"pid?\n")
        return int(f.readline())


served = collections.Counter(run_all(one, conns, threads))
print("pids: " + json.dumps(served, sort_keys=True))
print("done")
