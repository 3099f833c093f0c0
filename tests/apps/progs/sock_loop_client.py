"""asyncio loop.sock_connect / sock_sendall / sock_recv on a socket of the
stdlib's own class (one that bypasses any replacement of socket.socket, as
libraries that keep the original class do): ``sock_loop_client.py port``,
line echo through a line-echo server."""

import asyncio
import socket
import sys

try:                      # the stdlib's class, even when socket.socket is replaced
    from shrimpio.socket import StdSocket
except ImportError:
    StdSocket = socket.socket

from appdata import TIMEOUT, blob, digest

port = int(sys.argv[1])


async def readline(loop, sock, buf):
    while b"\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} bytes")
        buf += chunk
    i = buf.index(b"\n") + 1
    line = bytes(buf[:i])
    del buf[:i]
    return line


async def main():
    loop = asyncio.get_running_loop()
    sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    with sock:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
        buf = bytearray()
        for i in range(20):
            line = b"line %d\n" % i
            await asyncio.wait_for(loop.sock_sendall(sock, line), TIMEOUT)
            assert await asyncio.wait_for(readline(loop, sock, buf), 10) == line
        big = blob(1_000_000).replace(b"\n", b".") + b"\n"
        await asyncio.wait_for(loop.sock_sendall(sock, big), TIMEOUT)
        reply = await asyncio.wait_for(readline(loop, sock, buf), TIMEOUT)
        assert reply == big, len(reply)
        print(f"20 lines and {len(big)} bytes echoed, {digest(reply)}")


asyncio.run(main())
print("done")
