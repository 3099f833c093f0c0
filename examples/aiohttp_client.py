"""An ordinary aiohttp client: N keep-alive requests, a few in flight, timed.

    shrimpio run examples/aiohttp_client.py [port] [requests] [in_flight]

aiohttp makes its own stdlib sockets and hands them to the loop's
``sock_connect``; the shrimpio loop connects those over shared memory too,
so ``shrimpio.run(main())`` works as well as the patch.
"""

import asyncio
import sys
import time

import aiohttp


async def main(port, n, in_flight):
    url = f"http://127.0.0.1:{port}/"
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        async with session.get(url) as r:            # warm-up, and a look at the answer
            first = await r.text()

        async def worker():
            for _ in todo:
                async with session.get(url) as r:
                    assert r.status == 200 and await r.read() == b"Hello, World!"

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
    print(f"{first!r}: {n} keep-alive requests, {in_flight} in flight, {n / elapsed:.0f} requests/s")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8012
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    in_flight = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    asyncio.run(main(port, n, in_flight))
