"""aiohttp client: ``aiohttp_client.py port`` (keep-alive session)."""

import asyncio
import sys

import aiohttp

from appdata import blob, digest

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"


async def main():
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        pids = set()
        for _ in range(10):
            async with s.get(f"{base}/pid") as r:
                pids.add(await r.text())
        assert len(pids) == 1, pids
        print("keep-alive pid requests: 10")
        body = blob(1_000_000)
        async with s.post(f"{base}/echo", data=body) as r:
            text = await r.text()
        assert text == f"{len(body)} {digest(body)}", text
        print(f"echo {text}")
        async with s.get(f"{base}/blob/2000000") as r:
            data = await r.read()
        assert data == blob(2_000_000), (len(data), digest(data))
        print(f"blob {len(data)} {digest(data)}")


asyncio.run(main())
print("done")
