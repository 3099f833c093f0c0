"""Unmodified asyncio programs for ``tests/test_async_programs.py``.

Nothing here knows about shrimpio: each program is what one would write for
plain asyncio (streams, a ``Protocol``, aiohttp, websockets, httpx).  The
test runs them with ``python -m shrimpio run`` (patched) or plain
``python``.  Servers take ``port [host]`` (port 0 picks one) and print a
first line ending in ``on port N``; clients take the port and print a
transcript that the test compares with ``expected_*`` below (made with the
helpers of ``tests/programs.py``).
"""

from __future__ import annotations

import random

from programs import download_line, echo_lines, post_line, sha256_hex

# ---------------------------------------------------------------------------
# asyncio streams

#: ``asyncio.start_server`` echoing whatever it reads, chunk by chunk.
STREAMS_ECHO_SERVER = '''
import asyncio
import sys


async def echo(reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main(port, host):
    server = await asyncio.start_server(echo, host, port)
    print(f"asyncio streams echo server on port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8010
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    try:
        asyncio.run(main(port, host))
    except KeyboardInterrupt:
        pass
'''

#: An ``asyncio.Protocol`` echo server (``loop.create_server``).
PROTOCOL_ECHO_SERVER = '''
import asyncio
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False          # close our side too


async def main(port, host):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port)
    print(f"asyncio protocol echo server on port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8011
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    try:
        asyncio.run(main(port, host))
    except KeyboardInterrupt:
        pass
'''

#: Streams client: three concurrent connections; each sends 20 lines one at
#: a time and checks every echo, then streams 1 MB (four times a default
#: ring) while reading the echo concurrently, so that both sides' flow
#: control (``drain``, pause/resume reading) is exercised.
STREAMS_ECHO_CLIENT = '''
import asyncio
import hashlib
import sys

BIG = bytes(i % 251 for i in range(1_000_000))


async def one(port, c):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(20):
        line = b"conn %d line %d\\n" % (c, i)
        writer.write(line)
        await writer.drain()
        reply = await reader.readexactly(len(line))
        assert reply == line, (reply, line)

    async def send():
        for k in range(0, len(BIG), 100_000):
            writer.write(BIG[k:k + 100_000])
            await writer.drain()

    sender = asyncio.create_task(send())
    reply = await reader.readexactly(len(BIG))
    await sender
    assert reply == BIG
    writer.write_eof()
    assert await reader.read() == b""          # the server closes after our EOF
    writer.close()
    await writer.wait_closed()
    return f"connection {c}: 20 lines and {len(reply)} bytes echoed, sha256 {hashlib.sha256(reply).hexdigest()[:16]}"


async def main(port):
    for line in await asyncio.gather(*(one(port, c) for c in range(3))):
        print(line)


asyncio.run(main(int(sys.argv[1])))
'''

# ---------------------------------------------------------------------------
# aiohttp

AIOHTTP_SERVER = '''
import asyncio
import hashlib
import sys

from aiohttp import web


async def hello(request):
    return web.Response(text=f"hello {request.match_info['name']}")


async def blob(request):
    n = int(request.match_info["n"])
    return web.Response(body=bytes(i % 256 for i in range(n)), content_type="application/octet-stream")


async def post(request):
    body = await request.read()
    return web.Response(text=f"{len(body)} bytes sha256 {hashlib.sha256(body).hexdigest()}")


async def main(port, host):
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.add_routes([web.get("/hello/{name}", hello), web.get("/bytes/{n}", blob), web.post("/post", post)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"aiohttp server on port {site.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8012
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    try:
        asyncio.run(main(port, host))
    except KeyboardInterrupt:
        pass
'''

#: One ClientSession (keep-alive): sequential GETs, a 400 kB body, a 300 kB
#: POST, then five GETs at once (more pooled connections).
AIOHTTP_CLIENT = '''
import asyncio
import hashlib
import sys

import aiohttp


async def main(port):
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            async with session.get(f"{base}/hello/aiohttp{i}") as r:
                print(r.status, await r.text())
        async with session.get(f"{base}/bytes/400000") as r:
            body = await r.read()
            print(r.status, len(body), hashlib.sha256(body).hexdigest())
        payload = bytes(range(256)) * 1200
        async with session.post(f"{base}/post", data=payload) as r:
            print(r.status, await r.text())

        async def get(i):
            async with session.get(f"{base}/hello/concurrent{i}") as r:
                return r.status, await r.text()

        for status, text in await asyncio.gather(*(get(i) for i in range(5))):
            print(status, text)


asyncio.run(main(int(sys.argv[1])))
'''

# ---------------------------------------------------------------------------
# httpx (anyio on asyncio) against the aiohttp server

HTTPX_CLIENT = '''
import asyncio
import hashlib
import sys

import httpx


async def main(port):
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(5):
            r = await client.get(f"{base}/hello/httpx{i}")
            print(r.status_code, r.text)
        r = await client.get(f"{base}/bytes/400000")
        print(r.status_code, len(r.content), hashlib.sha256(r.content).hexdigest())
        payload = bytes(range(256)) * 1200
        r = await client.post(f"{base}/post", content=payload)
        print(r.status_code, r.text)


asyncio.run(main(int(sys.argv[1])))
'''

# ---------------------------------------------------------------------------
# websockets

WEBSOCKETS_SERVER = '''
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(websocket):
    async for message in websocket:
        await websocket.send(message)


async def main(port, host):
    async with serve(echo, host, port) as server:
        print(f"websockets server on port {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8013
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    try:
        asyncio.run(main(port, host))
    except KeyboardInterrupt:
        pass
'''

#: Text messages one at a time, a 500 kB binary message (random bytes, so
#: that compression leaves it large), then 50 messages sent before reading
#: any reply.
WEBSOCKETS_CLIENT = '''
import asyncio
import hashlib
import random
import sys

from websockets.asyncio.client import connect


async def main(port):
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        for i in range(5):
            await ws.send(f"message {i}")
            print(await ws.recv())
        blob = random.Random(7).randbytes(500_000)      # incompressible (permessage-deflate)
        await ws.send(blob)
        reply = await ws.recv()
        print(type(reply).__name__, len(reply), hashlib.sha256(reply).hexdigest())
        for i in range(50):
            await ws.send(f"burst {i}")
        replies = [await ws.recv() for _ in range(50)]
        assert replies == [f"burst {i}" for i in range(50)], replies
        print(f"{len(replies)} burst messages echoed in order")


asyncio.run(main(int(sys.argv[1])))
'''

PROGRAMS = {
    "streams_echo_server.py": STREAMS_ECHO_SERVER,
    "protocol_echo_server.py": PROTOCOL_ECHO_SERVER,
    "streams_echo_client.py": STREAMS_ECHO_CLIENT,
    "aiohttp_server.py": AIOHTTP_SERVER,
    "aiohttp_client.py": AIOHTTP_CLIENT,
    "httpx_client.py": HTTPX_CLIENT,
    "websockets_server.py": WEBSOCKETS_SERVER,
    "websockets_client.py": WEBSOCKETS_CLIENT,
}

# ---------------------------------------------------------------------------
# Expected transcripts


def expected_streams_echo() -> str:
    return echo_lines(bytes(i % 251 for i in range(1_000_000)), 3)


def expected_aiohttp() -> str:
    lines = [f"200 hello aiohttp{i}" for i in range(5)] + [download_line(), post_line()]
    lines += [f"200 hello concurrent{i}" for i in range(5)]
    return "\n".join(lines) + "\n"


def expected_httpx() -> str:
    return "\n".join([f"200 hello httpx{i}" for i in range(5)] + [download_line(), post_line()]) + "\n"


def expected_websockets() -> str:
    blob = random.Random(7).randbytes(500_000)
    lines = [f"message {i}" for i in range(5)]
    lines += [f"bytes {len(blob)} {sha256_hex(blob)}", "50 burst messages echoed in order"]
    return "\n".join(lines) + "\n"
