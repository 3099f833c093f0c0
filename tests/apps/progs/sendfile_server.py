"""Receives a stream to EOF, replies "<length> <digest>\\n", then sends the
same bytes back from a file with ``mode`` (socket: sock.sendfile, os:
os.sendfile): ``sendfile_server.py mode``.  Prints "sendfile server on port N"."""

import os
import socket
import sys
import tempfile

from appdata import digest

mode = sys.argv[1]


def send_file(sock, f, size):
    if mode == "socket":
        sock.sendfile(f)
        return
    offset = 0
    while offset < size:
        offset += os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)


with socket.create_server(("127.0.0.1", 0)) as listener:
    print(f"sendfile server on port {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = bytearray()
            while chunk := conn.recv(1 << 20):
                data += chunk
            conn.sendall(f"{len(data)} {digest(bytes(data))}\n".encode())
            with tempfile.TemporaryFile() as f:
                f.write(data)
                f.flush()
                f.seek(0)
                send_file(conn, f, len(data))
