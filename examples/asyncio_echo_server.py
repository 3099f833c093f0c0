"""An ordinary asyncio streams echo server; under ``shrimpio run`` it serves
shrimpio clients over shared memory as it is (``--shrimpio-run`` is the explicit way).

    shrimpio run examples/asyncio_echo_server.py [port]            # plain asyncio.run, patched
    python examples/asyncio_echo_server.py [port] --shrimpio-run   # shrimpio.run(main()), no patch
"""

import asyncio
import sys


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main(port):
    server = await asyncio.start_server(echo, "127.0.0.1", port, reuse_address=True)
    print(f"asyncio echo server on port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--shrimpio-run"]
    port = int(args[0]) if args else 8010
    try:
        if "--shrimpio-run" in sys.argv:
            import shrimpio
            shrimpio.run(main(port))      # as uvloop.run: the shrimpio loop, no patch needed
        else:
            asyncio.run(main(port))
    except KeyboardInterrupt:
        pass
