"""paramiko client: ``paramiko_client.py port``: two SSH connections, one
after the other; on each a session channel through the echo server: 100
small request/response exchanges, then 2 MB written while a thread reads
the echo; every byte checked.  (paramiko's transport thread reads the
socket with a timeout, and the transport's close races that thread's.)"""

import sys
import threading

import paramiko

from appdata import TIMEOUT, blob, digest

PAYLOAD = blob(2_000_000)


def one(port):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port, username="user", password="secret", timeout=TIMEOUT,
                   look_for_keys=False, allow_agent=False)
    chan = client.get_transport().open_session(timeout=TIMEOUT)
    chan.settimeout(TIMEOUT)
    for i in range(100):
        msg = b"message %d\n" % i
        chan.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += chan.recv(len(msg) - len(got))
        assert got == msg, (got, msg)
    echoed = bytearray()

    def reader():
        while len(echoed) < len(PAYLOAD):
            data = chan.recv(1 << 20)
            if not data:
                return
            echoed.extend(data)

    t = threading.Thread(target=reader)
    t.start()
    chan.sendall(PAYLOAD)
    t.join(4 * TIMEOUT)
    assert bytes(echoed) == PAYLOAD, len(echoed)
    chan.close()
    client.close()


for _ in range(2):
    one(int(sys.argv[1]))
print(f"2 connections echoed {len(PAYLOAD)} {digest(PAYLOAD)}")
print("done")
