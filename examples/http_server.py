"""An ordinary http.server: nothing here knows about shrimpio.

    shrimpio run examples/http_server.py [port]
"""

import http.server
import sys


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"hello from {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8008
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), Hello) as server:
        print(f"http server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
