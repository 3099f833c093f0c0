"""tornado HTTP server: GET /pid, POST /echo, GET /blob/N.
``tornado_server.py [port]``; prints "tornado server on port N"."""

import asyncio
import os
import signal
import sys

import tornado.httpserver
import tornado.netutil
import tornado.web

from appdata import blob, digest


class Pid(tornado.web.RequestHandler):
    def get(self):
        self.write(str(os.getpid()))


class Echo(tornado.web.RequestHandler):
    def post(self):
        body = self.request.body
        self.write(f"{len(body)} {digest(body)}")


class Blob(tornado.web.RequestHandler):
    def get(self, n):
        self.set_header("Content-Type", "application/octet-stream")
        self.write(blob(int(n)))


async def main():
    app = tornado.web.Application([(r"/pid", Pid), (r"/echo", Echo), (r"/blob/(\d+)", Blob)])
    server = tornado.httpserver.HTTPServer(app, max_body_size=64 << 20)
    sockets = tornado.netutil.bind_sockets(int(sys.argv[1]) if len(sys.argv) > 1 else 0, "127.0.0.1")
    server.add_sockets(sockets)
    print(f"tornado server on port {sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.stop()
    await server.close_all_connections()


asyncio.run(main())
