"""twisted echo server (a Protocol); prints "twisted echo server on port N"."""

from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
print(f"twisted echo server on port {port.getHost().port}", flush=True)
reactor.run()
