"""pyftpdlib FTP server: ``ftp_server.py homedir [port]``; user "user",
password "secret"; prints "ftp server on port N"."""

import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

authorizer = DummyAuthorizer()
authorizer.add_user("user", "secret", sys.argv[1], perm="elradfmw")
handler = FTPHandler
handler.authorizer = authorizer
server = FTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), handler)
print(f"ftp server on port {server.address[1]}", flush=True)
server.serve_forever()
