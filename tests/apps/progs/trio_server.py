"""trio echo server (trio.serve_tcp); prints "trio echo server on port N".
A client's end of stream ends its handler, which closes the connection."""

import trio


async def echo(stream):
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"trio echo server on port {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(echo, listeners)


trio.run(main)
