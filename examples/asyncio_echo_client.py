"""An ordinary asyncio streams client that times its round trips.

    shrimpio run examples/asyncio_echo_client.py [port] [rounds]
    python examples/asyncio_echo_client.py [port] [rounds] --shrimpio-run   # shrimpio.run, no patch
    python examples/asyncio_echo_client.py [port] [rounds]                  # plain asyncio, kernel TCP
"""

import asyncio
import statistics
import sys
import time


async def main(port, rounds):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msg = b"x" * 63 + b"\n"
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        writer.write(msg)
        reply = await reader.readexactly(len(msg))
        times.append(time.perf_counter() - t0)
        assert reply == msg, reply
    writer.close()
    await writer.wait_closed()
    loop = type(asyncio.get_running_loop())
    print(f"{rounds} round trips of {len(msg)} bytes, median {statistics.median(times) * 1e6:.1f} us"
          f" ({loop.__module__}.{loop.__qualname__})")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--shrimpio-run"]
    port = int(args[0]) if args else 8010
    rounds = int(args[1]) if len(args) > 1 else 10000
    if "--shrimpio-run" in sys.argv:
        import shrimpio
        shrimpio.run(main(port, rounds))
    else:
        asyncio.run(main(port, rounds))
