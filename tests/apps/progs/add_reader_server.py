"""asyncio echo server driven by loop.add_reader / add_writer on the fds of
accepted sockets (as tornado and dask do).  Prints "add_reader server on
port N"."""

import asyncio
import signal
import socket


class Conn:
    def __init__(self, loop, sock):
        self.loop, self.sock, self.out = loop, sock, bytearray()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self):
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            return
        self.out += data
        self.writable()

    def writable(self):
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        del self.out[:n]
        if self.out:
            self.loop.add_writer(self.sock.fileno(), self.writable)
        else:
            self.loop.remove_writer(self.sock.fileno())


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(f"add_reader server on port {listener.getsockname()[1]}", flush=True)
    accepting = asyncio.ensure_future(accept_loop(loop, listener))
    await stop.wait()
    accepting.cancel()
    listener.close()


async def accept_loop(loop, listener):
    while True:
        sock, _ = await loop.sock_accept(listener)
        Conn(loop, sock)


asyncio.run(main())
