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


def serve(listener, ready):
    """A multiprocessing worker: accept and answer, forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready.put(os.getpid())
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
            rfd, wfd = os.pipe()
            for _ in range(workers):
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    try:
                        os.write(wfd, b"r")
                        server.serve_forever()
                    finally:
                        os._exit(0)
                pids.append(pid)
            for _ in range(workers):      # every worker is about to serve
                os.read(rfd, 1)
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
        ready = ctx.Queue()
        procs = [ctx.Process(target=serve, args=(listener, ready), daemon=True)
                 for _ in range(workers)]
        for p in procs:
            p.start()
        for _ in procs:                   # every worker is about to accept
            ready.get(timeout=30)
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
