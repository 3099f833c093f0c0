"""tornado HTTP client (AsyncHTTPClient): ``tornado_client.py port``."""

import asyncio
import sys

from tornado.httpclient import AsyncHTTPClient

from appdata import TIMEOUT, blob, digest

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"


async def main():
    client = AsyncHTTPClient(max_body_size=64 << 20)
    for _ in range(5):
        r = await client.fetch(f"{base}/pid", request_timeout=TIMEOUT)
        assert r.body.decode().isdigit(), r.body
    print("pid requests: 5")
    body = blob(1_000_000)
    r = await client.fetch(f"{base}/echo", method="POST", body=body, request_timeout=TIMEOUT,
                           headers={"Content-Type": "application/octet-stream"})
    assert r.body.decode() == f"{len(body)} {digest(body)}", r.body
    print(f"echo {r.body.decode()}")
    r = await client.fetch(f"{base}/blob/2000000", request_timeout=TIMEOUT)
    assert r.body == blob(2_000_000), (len(r.body), digest(r.body))
    print(f"blob {len(r.body)} {digest(r.body)}")
    client.close()


asyncio.run(main())
print("done")
