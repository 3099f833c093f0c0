"""An ordinary echo client that times its round trips.

    shrimpio run examples/echo_client.py [port] [rounds]
"""

import socket
import statistics
import sys
import time

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8007
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
with socket.create_connection(("127.0.0.1", port)) as sock:
    f = sock.makefile("rwb", buffering=0)
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        sock.sendall(b"ping %d\n" % i)
        reply = f.readline()
        times.append(time.perf_counter() - t0)
        assert reply == b"ping %d\n" % i, reply
    print(f"{rounds} round trips, median {statistics.median(times) * 1e6:.1f} us")
