"""waitress serving wsgi_app: its own select/poll loop (wasyncore) in the
main thread, the app in 4 worker threads.  Prints "waitress server on port N"."""

from waitress import create_server

from wsgi_app import app

server = create_server(app, host="127.0.0.1", port=0, threads=4)
print(f"waitress server on port {server.effective_port}", flush=True)
server.run()
