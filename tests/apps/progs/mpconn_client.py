"""multiprocessing.connection Client: ``mpconn_client.py port``."""

import sys
from multiprocessing.connection import Client

from appdata import blob, digest

port = int(sys.argv[1])
for c in range(2):
    with Client(("127.0.0.1", port), authkey=b"app matrix") as conn:
        objs = [{"conn": c, "list": list(range(100))}, ("tuple", 1.5, None), "x" * 100_000]
        for obj in objs:
            conn.send("obj")
            conn.send(obj)
            assert conn.recv() == obj
        for n in (1, 70_000, 1_000_000):
            conn.send("bytes")
            conn.send_bytes(blob(n))
            got = conn.recv_bytes()
            assert got == blob(n), (n, len(got))
        conn.send("bye")
        print(f"connection {c}: 3 objects and 3 byte messages echoed, last {digest(got)}")
print("done")
