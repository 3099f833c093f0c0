"""Call the XML-RPC service.

    shrimpio run examples/xmlrpc_client.py [port]
"""

import sys
import time
import xmlrpc.client

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8009
proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/")
print("add(2, 3) =", proxy.add(2, 3))
print("reverse('shrimp') =", proxy.reverse("shrimp"))
t0 = time.perf_counter()
for i in range(500):
    proxy.add(i, i)
print(f"500 calls, {500 / (time.perf_counter() - t0):.0f} calls/s")
