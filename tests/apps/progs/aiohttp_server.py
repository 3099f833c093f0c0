"""aiohttp server: GET /pid, POST /echo, GET /blob/N.
``aiohttp_server.py [port]``; prints "aiohttp server on port N"."""

import asyncio
import os
import signal
import sys

from aiohttp import web

from appdata import blob, digest


async def pid(request):
    return web.Response(text=str(os.getpid()))


async def echo(request):
    body = await request.read()
    return web.Response(text=f"{len(body)} {digest(body)}")


async def get_blob(request):
    return web.Response(body=blob(int(request.match_info["n"])))


async def main():
    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.get("/pid", pid), web.post("/echo", echo), web.get("/blob/{n}", get_blob)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    await site.start()
    print(f"aiohttp server on port {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


asyncio.run(main())
