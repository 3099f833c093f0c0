"""Pre-fork servers: one listening socket, several worker processes
accepting on it.  ``prefork_server.py kind workers``, kind one of:

  socketserver  a socketserver.TCPServer made in the parent, each forked
                worker runs its serve_forever()
  forking       socketserver.ForkingTCPServer (the parent accepts, a forked
                child serves each connection)
  mp-fork       a listener made in the parent, passed to
  mp-spawn      multiprocessing.Process workers (fork / spawn context) that
                accept on it

Each connection is answered with one line: the serving process's id.
Prints "<kind> server on port N" once its workers are started."""

import multiprocessing
import os
import signal
import socket
import socketserver
import sys


class Pid(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d\n" % os.getpid())


def serve(listener):
    """A multiprocessing worker: accept and answer, forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            f.readline()
            conn.sendall(b"%d\n" % os.getpid())


def main(kind, workers):
    if kind == "forking":
        with socketserver.ForkingTCPServer(("127.0.0.1", 0), Pid) as server:
            print(f"{kind} server on port {server.server_address[1]}", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
        return
    if kind == "socketserver":
        with socketserver.TCPServer(("127.0.0.1", 0), Pid) as server:
            pids = []
            for _ in range(workers):
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    try:
                        server.serve_forever()
                    finally:
                        os._exit(0)
                pids.append(pid)
            print(f"{kind} server on port {server.server_address[1]}", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
        return
    ctx = multiprocessing.get_context(kind.split("-")[1])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        procs = [ctx.Process(target=serve, args=(listener,), daemon=True) for _ in range(workers)]
        for p in procs:
            p.start()
        print(f"{kind} server on port {listener.getsockname()[1]}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        for p in procs:
            p.terminate()
            p.join()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
