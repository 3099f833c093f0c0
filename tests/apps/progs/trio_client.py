"""trio client: ``trio_client.py port``: three concurrent streams through an
echo server, each 100 small request/response exchanges (a wait for
readability each) and then 2 MB written while a task reads the echo (waits
for writability on a full ring), then end of stream (send_eof) and the
server's close seen as end of stream; every byte checked."""

import sys

import trio

from appdata import TIMEOUT, blob, digest

PAYLOAD = blob(2_000_000)


async def one(port, k, results):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for i in range(100):
            msg = b"stream %d message %d\n" % (k, i)
            await stream.send_all(msg)
            got = b""
            while len(got) < len(msg):
                data = await stream.receive_some(65536)
                assert data, "end of stream in the middle of an echo"
                got += data
            assert got == msg, (got, msg)
        echoed = bytearray()

        async def reader():
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    return
                echoed.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(0, len(PAYLOAD), 65536):
                await stream.send_all(PAYLOAD[i:i + 65536])
            await stream.send_eof()
        results[k] = bytes(echoed)


async def main(port):
    results = {}
    with trio.fail_after(4 * TIMEOUT):
        async with trio.open_nursery() as nursery:
            for k in range(3):
                nursery.start_soon(one, port, k, results)
    for k in range(3):
        assert results[k] == PAYLOAD, (k, len(results[k]))
    print(f"3 streams echoed {len(PAYLOAD)} {digest(PAYLOAD)}")


trio.run(main, int(sys.argv[1]))
print("done")
