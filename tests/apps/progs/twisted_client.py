"""twisted client: ``twisted_client.py port``: sends small messages and 2 MB
through an echo server, checks every byte came back."""

import sys

from twisted.internet import protocol, reactor

from appdata import TIMEOUT, blob, digest

PAYLOAD = b"".join(b"message %d\n" % i for i in range(100)) + blob(2_000_000)
result = {}


class Client(protocol.Protocol):
    def connectionMade(self):
        self.got = bytearray()
        for i in range(0, len(PAYLOAD), 65536):
            self.transport.write(PAYLOAD[i:i + 65536])

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= len(PAYLOAD):
            result["got"] = bytes(self.got)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        reactor.stop()


class Factory(protocol.ClientFactory):
    protocol = Client

    def clientConnectionFailed(self, connector, reason):
        result["error"] = reason
        reactor.stop()


reactor.connectTCP("127.0.0.1", int(sys.argv[1]), Factory(), timeout=TIMEOUT)
reactor.callLater(20, reactor.stop)
reactor.run()
assert result.get("got") == PAYLOAD, (result.get("error"), len(result.get("got", b"")))
print(f"echoed {len(PAYLOAD)} {digest(PAYLOAD)}")
print("done")
