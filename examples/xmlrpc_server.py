"""An ordinary XML-RPC service.

    shrimpio run examples/xmlrpc_server.py [port]
"""

import sys
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer


class Quiet(SimpleXMLRPCRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8009
    with SimpleXMLRPCServer(("127.0.0.1", port), requestHandler=Quiet, allow_none=True) as server:
        server.register_function(lambda a, b: a + b, "add")
        server.register_function(lambda s: s[::-1], "reverse")
        print(f"xmlrpc server on port {server.server_address[1]}", flush=True)
        server.serve_forever()
