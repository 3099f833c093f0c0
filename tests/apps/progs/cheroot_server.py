"""cheroot (CherryPy's WSGI server) serving wsgi_app: a thread pool whose
workers hand each kept-alive connection back to the selector its main
thread waits in.  Prints "cheroot server on port N".

The selector's timeout (cheroot's ``expiration_interval``, 0.5 s by default)
is set long, so that a connection whose readiness the selector missed
shows as a hang rather than as a half-second delay."""

from cheroot import wsgi

from wsgi_app import app

server = wsgi.Server(("127.0.0.1", 0), app, numthreads=4)
server.expiration_interval = 60
server.prepare()
print(f"cheroot server on port {server.bind_addr[1]}", flush=True)
try:
    server.serve()
finally:
    server.stop()           # its worker threads are not daemons
