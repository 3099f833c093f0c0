"""paramiko SSH server (a thread per client, paramiko's transport thread
each); every session channel echoes what it receives until end of stream.
Prints "paramiko server on port N"."""

import socket
import threading

import paramiko

KEY = paramiko.ECDSAKey.generate()


class Server(paramiko.ServerInterface):
    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_auth_password(self, username, password):
        return paramiko.AUTH_SUCCESSFUL if password == "secret" else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return "password"


def serve(conn):
    transport = paramiko.Transport(conn)
    transport.add_server_key(KEY)
    transport.start_server(server=Server())
    chan = transport.accept(20)
    if chan is not None:
        while True:
            data = chan.recv(65536)
            if not data:
                break
            chan.sendall(data)
        chan.close()
    transport.close()


lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(8)
print(f"paramiko server on port {lst.getsockname()[1]}", flush=True)
while True:
    conn, _ = lst.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
