"""multiprocessing.connection Listener: ``mpconn_server.py``; echoes every
object (recv/send) and byte message (recv_bytes/send_bytes) until "bye".
Prints "listener on port N"."""

from multiprocessing.connection import Listener

with Listener(("127.0.0.1", 0), authkey=b"app matrix") as listener:
    print(f"listener on port {listener.address[1]}", flush=True)
    while True:
        with listener.accept() as conn:
            while True:
                kind = conn.recv()
                if kind == "bye":
                    break
                if kind == "bytes":
                    conn.send_bytes(conn.recv_bytes())
                else:
                    conn.send(conn.recv())
