"""Fetch a page with urllib and time keep-alive requests with http.client.

    shrimpio run examples/http_client.py [port] [requests]
"""

import http.client
import sys
import time
import urllib.request

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8008
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
print(urllib.request.urlopen(f"http://127.0.0.1:{port}/urllib").read().decode().strip())
conn = http.client.HTTPConnection("127.0.0.1", port)
t0 = time.perf_counter()
for i in range(n):
    conn.request("GET", f"/{i}")
    conn.getresponse().read()
elapsed = time.perf_counter() - t0
conn.close()
print(f"{n} keep-alive requests, {n / elapsed:.0f} requests/s")
