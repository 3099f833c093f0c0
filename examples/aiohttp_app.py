"""An ordinary aiohttp hello-world app; under ``shrimpio run`` it serves shrimpio
clients over shared memory as it is (``--shrimpio-loop`` is the explicit way).

    shrimpio run examples/aiohttp_app.py [port]             # web.run_app's loop is shrimpio's
    python examples/aiohttp_app.py [port] --shrimpio-loop   # web.run_app(loop=shrimpio.new_event_loop())
"""

import sys

from aiohttp import web


async def hello(request):
    return web.Response(text="Hello, World!")


def ready(banner):
    # run_app's banner, "======== Running on http://127.0.0.1:8012 ========", says the bound port
    print(f"aiohttp app on port {banner.split()[3].rsplit(':', 1)[1]}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--shrimpio-loop"]
    port = int(args[0]) if args else 8012
    loop = None
    if "--shrimpio-loop" in sys.argv:
        import shrimpio
        loop = shrimpio.new_event_loop()
    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, loop=loop, print=ready)
