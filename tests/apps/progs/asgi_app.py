"""A tiny ASGI app (uvicorn, hypercorn): GET /pid, POST /echo, GET /blob/N."""

import os

from appdata import blob, digest


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = bytearray()
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path = scope["path"]
    status = 200
    if path == "/pid":
        out = str(os.getpid()).encode()
    elif path == "/echo":
        out = f"{len(body)} {digest(bytes(body))}".encode()
    elif path.startswith("/blob/"):
        out = blob(int(path[len("/blob/"):]))
    else:
        status, out = 404, b"not found"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
