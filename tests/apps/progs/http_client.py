"""HTTP client (requests): ``http_client.py port [connections [threads]]``.

Keep-alive requests to an app that serves GET /pid (its process id), POST
/echo ("<length> <digest>" of the body) and GET /blob/N (appdata.blob(N)),
content checked; then ``connections`` requests each on a new connection,
from ``threads`` threads, and the process ids that served them."""

import collections
import json
import sys

import requests

from appdata import TIMEOUT, blob, digest, run_all

port = int(sys.argv[1])
conns = int(sys.argv[2]) if len(sys.argv) > 2 else 0
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
base = f"http://127.0.0.1:{port}"
T = TIMEOUT

with requests.Session() as s:
    for _ in range(10):
        r = s.get(f"{base}/pid", timeout=T)
        r.raise_for_status()
        assert r.text.isdigit(), r.text
    print("pid requests: 10")
    body = blob(1_000_000)
    r = s.post(f"{base}/echo", data=body, timeout=T)
    r.raise_for_status()
    assert r.text == f"{len(body)} {digest(body)}", r.text
    print(f"echo {r.text}")
    r = s.get(f"{base}/blob/2000000", timeout=T)
    r.raise_for_status()
    assert r.content == blob(2_000_000), (len(r.content), digest(r.content))
    print(f"blob {len(r.content)} {digest(r.content)}")


def one(_):
    r = requests.get(f"{base}/pid", headers={"Connection": "close"}, timeout=T)
    r.raise_for_status()
    return r.text


if conns:
    served = collections.Counter(run_all(one, conns, threads))
    print("pids: " + json.dumps(served, sort_keys=True))
print("done")
