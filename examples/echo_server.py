"""An ordinary socketserver echo server: nothing here knows about shrimpio.

    shrimpio run examples/echo_server.py [port]
"""

import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8007
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Echo) as server:
        print(f"echo server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
