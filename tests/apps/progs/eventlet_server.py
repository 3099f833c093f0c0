"""eventlet echo server (monkey_patch, a green thread per connection): line
echo.  Prints "eventlet echo server on port N"."""

import eventlet

eventlet.monkey_patch()


def handle(sock, addr):
    with sock, sock.makefile("rb") as f:
        for line in f:
            sock.sendall(line)


server = eventlet.listen(("127.0.0.1", 0))
print(f"eventlet echo server on port {server.getsockname()[1]}", flush=True)
eventlet.serve(server, handle)
