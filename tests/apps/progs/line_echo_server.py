"""socketserver line-echo server (threads): prints "echo server on port N"."""

import socketserver


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
    print(f"echo server on port {server.server_address[1]}", flush=True)
    server.serve_forever()
