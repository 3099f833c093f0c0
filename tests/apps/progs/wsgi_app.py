"""A tiny WSGI app (gunicorn): GET /pid, POST /echo, GET /blob/N."""

import os

from appdata import blob, digest


def app(environ, start_response):
    path = environ["PATH_INFO"]
    status = "200 OK"
    if path == "/pid":
        out = str(os.getpid()).encode()
    elif path == "/echo":
        n = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(n)
        out = f"{len(body)} {digest(body)}".encode()
    elif path.startswith("/blob/"):
        out = blob(int(path[len("/blob/"):]))
    else:
        status, out = "404 Not Found", b"not found"
    start_response(status, [("Content-Type", "application/octet-stream"),
                            ("Content-Length", str(len(out)))])
    return [out]
