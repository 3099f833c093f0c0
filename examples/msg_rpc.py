"""A small request/response RPC on shrimpio.msg, timed beside XML-RPC over
patched sockets (shared memory too).

    python examples/msg_rpc.py [calls]

The server takes ``(method, args)`` from any client with one ``recv`` and
answers on the channel it came by, with the request's tag, so a client may
have several calls in flight and match the answers by tag.
"""

import os
import statistics
import sys
import time

import shrimpio.patch  # noqa: F401  (the XML-RPC side: its sockets on shared memory)
from shrimpio import msg

FUNCS = {"add": lambda a, b: a + b, "reverse": lambda s: s[::-1], "null": lambda: None}


def serve(lst: msg.MsgListener) -> None:
    while True:
        m = lst.recv()
        if m.payload is None:
            break
        name, args = m.payload
        try:
            result = ("ok", FUNCS[name](*args))
        except Exception as e:              # the error goes back to the caller
            result = ("error", repr(e))
        m.source.send(result, tag=m.tag)


class Client:
    def __init__(self, address) -> None:
        self.ch = msg.connect(address)
        self.next = 1

    def call(self, name: str, *args):
        tag, self.next = self.next, self.next + 1
        self.ch.send((name, args), tag=tag)
        status, value = self.ch.recv(tag=tag).payload
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        self.ch.send(None)
        self.ch.close()


def timed(call, n: int) -> float:
    for _ in range(200):
        call()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e6


def xmlrpc_server(port_w: int) -> None:
    from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

    class Quiet(SimpleXMLRPCRequestHandler):
        def log_message(self, *args):
            pass

    with SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=Quiet, allow_none=True) as srv:
        for name, f in FUNCS.items():
            srv.register_function(f, name)
        os.write(port_w, str(srv.server_address[1]).encode())
        srv.serve_forever()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    lst = msg.listen()
    pid = os.fork()
    if pid == 0:
        serve(lst)
        os._exit(0)
    c = Client(lst.address)
    lst.close()
    assert c.call("add", 2, 3) == 5 and c.call("reverse", "abc") == "cba"
    us_msg = timed(lambda: c.call("add", 2, 3), n)
    c.close()
    os.waitpid(pid, 0)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        xmlrpc_server(w)
        os._exit(0)
    os.close(w)
    port = int(os.read(r, 16))
    os.close(r)
    import xmlrpc.client
    with xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}", allow_none=True) as proxy:
        assert proxy.add(2, 3) == 5
        us_xml = timed(lambda: proxy.add(2, 3), max(200, n // 10))
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    print(f"add(2, 3), median of {n} calls: shrimpio.msg RPC {us_msg:.1f} us, "
          f"XML-RPC over patched sockets {us_xml:.1f} us ({us_xml / us_msg:.0f}x)")


if __name__ == "__main__":
    main()
