"""A listener that runs out of fds, one or two short: TCP's accept() fails
with EMFILE and the client waits in the backlog until the server has an fd
again; nothing is lost.  Found by the chaos suite (scenario ``exhaust``):
over shared memory the listener took the client from the registry, could
not receive the hello's fds (the kernel drops fds it cannot install) and
dropped the client, which read EOF.  (tests/test_scale.py: many clients
and a listener short of fds.)"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys

import pytest

import shrimpio
import shrimpio.patch
import shrimpio.socket as ss
from children import child_env

shrimpio.patch.disable()

CLIENT = r"""
import socket, sys
import shrimpio.patch
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
print(__import__("shrimpio").info(c)["path"], flush=True)
c.sendall(b"ping")
got = b""
while len(got) < 4:
    d = c.recv(4)
    if not d:
        break
    got += d
print(got.decode(), flush=True)
"""


def limit_leaving(free: int) -> int:
    """The fd limit under which exactly ``free`` more fds can be opened in
    this process: fd numbers are the lowest free ones, and the limit bounds
    the number, not the count (earlier tests leave holes below the highest
    open fd)."""
    lowest = os.open(os.devnull, os.O_RDONLY)      # the number listdir's own fd takes
    os.close(lowest)
    used = {int(fd) for fd in os.listdir("/proc/self/fd")} - {lowest}
    holes = [n for n in range(max(used) + free + 1) if n not in used]
    return holes[free - 1] + 1 if free else holes[0]


ASYNC_CLIENT = r"""
import asyncio, sys
import shrimpio, shrimpio.patch


async def main():
    r, w = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    print(w.get_extra_info("shrimpio")["path"], flush=True)
    w.write(b"ping")
    print((await r.readexactly(4)).decode(), flush=True)
    w.close()
    await w.wait_closed()


asyncio.run(main())
"""


@pytest.mark.parametrize("client,headroom", [("blocking", 0), ("asyncio", 0), ("asyncio", 1)])
def test_a_listener_out_of_fds_keeps_its_client_waiting(client, headroom):
    """No fd free at all: accept() fails with EMFILE, as TCP's, and the
    client waits in the registry's backlog; served over shared memory once
    fds are free.  An asyncio client (whose transport reads the rings
    itself: it cannot follow a late fallback, and its hello does not say
    "late") waits so one fd short too, rather than being sent to TCP."""
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    child = subprocess.Popen([sys.executable, "-c", CLIENT if client == "blocking" else ASYNC_CLIENT,
                              str(lst.getsockname()[1])],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = None
    try:
        assert child.stdout.readline().strip() == "shm"
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(headroom), saved[1]))
        try:
            lst.settimeout(2)
            try:
                srv, _ = lst.accept()         # enough fds after all: fine
            except OSError as exc:
                assert exc.errno in (errno.EMFILE, errno.ENFILE), exc   # as TCP
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is None:
            srv, _ = lst.accept()             # the client waited, as in TCP's backlog
        srv.settimeout(10)
        assert srv.recv(4) == b"ping"
        srv.sendall(b"pong")
        assert child.stdout.readline().strip() == "pong"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is not None:
            srv.close()
        lst.close()
        child.kill()
        child.wait()
        child.stdout.close()


ASYNC_SERVER = r"""
import asyncio, json, os, resource, sys
import shrimpio.patch

OUT = "socket.accept() out of system resource"


def cpu():
    t = os.times()
    return t.user + t.system


async def main(headroom):
    loop = asyncio.get_running_loop()
    messages = []
    paused = asyncio.Event()

    def handler(loop, context):
        messages.append(context["message"])
        if context["message"] == OUT:
            paused.set()

    loop.set_exception_handler(handler)
    served = asyncio.Event()

    async def handle(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        served.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    have = len(os.listdir("/proc/self/fd")) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (have + headroom, saved[1]))
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.wait_for(paused.wait(), 30)
    c0 = cpu()
    await asyncio.sleep(0.5)          # (a window to measure the CPU used while paused)
    used = cpu() - c0
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    await asyncio.wait_for(served.wait(), 30)
    srv.close()
    await srv.wait_closed()
    print(json.dumps({"cpu": used, "messages": messages}), flush=True)


asyncio.run(main(int(sys.argv[1])))
"""


def test_an_asyncio_server_out_of_fds_pauses_and_keeps_its_client():
    """Found by the chaos suite (scenario ``exhaust``, asyncio server): the
    shrimpio loop's server, out of fds for a shared-memory client, called
    its exception handler with "shrimpio accept failed" and went straight
    back to the registry socket, still readable: a core spun, a log line a
    turn.  As asyncio's accept does for kernel TCP, it now says "out of
    system resource" and stops accepting for a second; the client waits and
    is served once fds are free.  (One or two fds short, it serves the
    client by TCP at once: see the late fallback tests below.)"""
    import json
    srv = subprocess.Popen([sys.executable, "-c", ASYNC_SERVER, "0"],
                           stdout=subprocess.PIPE, text=True, env=child_env())
    cli = None
    try:
        port = srv.stdout.readline().strip()
        assert port.isdigit(), port
        cli = subprocess.Popen([sys.executable, "-c", CLIENT, port], stdout=subprocess.PIPE,
                               text=True, env=child_env())
        assert cli.stdout.readline().strip() == "shm"
        assert cli.stdout.readline().strip() == "ping"      # served, nothing lost
        out = json.loads(srv.stdout.readline())
        assert "socket.accept() out of system resource" in out["messages"], out
        assert "shrimpio accept failed" not in out["messages"], out
        assert out["cpu"] < 0.25, out                         # paused, not spinning
        assert srv.wait(timeout=30) == 0
        assert cli.wait(timeout=30) == 0
    finally:
        for p in (srv, cli):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stdout.close()


TCP_SERVER = r"""
import asyncio, json, os, resource, sys
import shrimpio.patch


async def main(headroom):
    served = asyncio.Event()
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx["message"]))

    async def handle(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        served.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    have = len(os.listdir("/proc/self/fd")) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (have + headroom, saved[1]))
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.wait_for(served.wait(), 30)
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    srv.close()
    await srv.wait_closed()
    print(json.dumps({"errors": errors}), flush=True)


asyncio.run(main(int(sys.argv[1])))
"""


@pytest.mark.parametrize("headroom", [1, 2])
def test_an_asyncio_server_one_fd_short_serves_a_tcp_client(headroom, tmp_path):
    """A kernel TCP client of the shrimpio loop's server needs one fd, as
    with uvloop or asyncio alone: the hand-over of the connection to uvloop
    must not take a second one (it took a dup of the fd, and failed with
    EMFILE one fd short of the limit: a connection TCP serves, lost)."""
    import json
    report = tmp_path / "report"
    srv = subprocess.Popen([sys.executable, "-c", TCP_SERVER, str(headroom)],
                           stdout=subprocess.PIPE, text=True,
                           env=child_env({"SHRIMPIO_REPORT": str(report)}))
    cli = None
    try:
        port = srv.stdout.readline().strip()
        assert port.isdigit(), port
        cli = subprocess.Popen([sys.executable, "-c", CLIENT, port], stdout=subprocess.PIPE,
                               text=True, env=child_env({"SHRIMPIO_DISABLE": "1"}))
        assert cli.stdout.readline().strip() == "tcp"
        assert cli.stdout.readline().strip() == "ping"      # served, nothing lost
        out = json.loads(srv.stdout.readline())
        assert out["errors"] == [], out
        assert srv.wait(timeout=30) == 0
        assert cli.wait(timeout=30) == 0
        # One line for the connection, whichever way it was handed to uvloop.
        lines = [json.loads(x) for x in report.read_text().splitlines()]
        assert len(lines) == 1, lines
        assert lines[0]["path"] == "tcp" and lines[0]["reason"] == "peer is not shrimpio", lines
        assert lines[0]["peer"][0] == "127.0.0.1" and lines[0]["local"][1] == int(port), lines
    finally:
        for p in (srv, cli):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stdout.close()


# -- the late fallback: one or two fds short, a listener serves its
# shared-memory client by TCP, as a kernel listener would have (see
# _accept.refuse, _socklate) ------------------------------------------------------

LATE_CLIENT = r"""
import json, os, selectors, socket, sys
import shrimpio.patch
from shrimpio import info
port, size, blocking, shut = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
data = os.urandom(size)
c = socket.create_connection(("127.0.0.1", port), timeout=20)
before = info(c)
name = c.getsockname()
if not blocking:
    c.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(c, selectors.EVENT_WRITE)
    view = memoryview(data)
    while view:                        # (all of it fits the ring: no wait for the peer)
        sel.select(20)
        view = view[c.send(view):]
    sel.modify(c, selectors.EVENT_READ)
else:
    c.sendall(data)
if shut:
    c.shutdown(socket.SHUT_WR)
print(json.dumps({"written": len(data), "before": before}), flush=True)
got = bytearray()
while True:                            # the listener answers with our bytes, reversed
    if blocking:
        d = c.recv(65536)
    else:
        if not sel.select(10):             # (the registration follows the fd's new file)
            sys.exit("no event in 10 s")
        try:
            d = c.recv(65536)
        except BlockingIOError:
            continue
    if not d:
        break
    got += d
print(json.dumps({"ok": bytes(got) == data[::-1], "got": len(got), "after": info(c),
                  "name": [name, c.getsockname()]}), flush=True)
c.close()
"""


def _serve_late(lst, headroom, size, shut, blocking="1", script=LATE_CLIENT):
    """Start a client (``script``) that connects and writes ``size`` bytes
    (and shuts its writing side if ``shut``), some or all before the
    listener, left ``headroom`` fds, looks; accept it, echo what came
    reversed, close.  The client's two report lines and the accepted
    socket's info."""
    import json
    child = subprocess.Popen([sys.executable, "-c", script, str(lst.getsockname()[1]), str(size),
                              blocking, "1" if shut else "0"],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = None
    try:
        first = json.loads(child.stdout.readline())
        assert first["written"] == size and first["before"]["path"] == "shm", first
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(headroom), saved[1]))
        try:
            lst.settimeout(10)
            srv, _ = lst.accept()      # as TCP's: one fd is enough
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        got_info = shrimpio.info(srv)
        srv.settimeout(20)
        got = bytearray()
        while len(got) < size:
            d = srv.recv(65536)
            if not d:
                break
            got += d
        if shut:
            assert srv.recv(1) == b""  # the client's shutdown came after its bytes
        srv.sendall(bytes(got[::-1]))
        srv.close()
        srv = None
        last = json.loads(child.stdout.readline())
        assert child.wait(timeout=30) == 0
        return last, got_info, len(got)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is not None:
            srv.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def _listener():
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    return lst


@pytest.mark.parametrize("headroom", [1, 2])
def test_a_listener_one_fd_short_serves_its_client_as_tcp_would(headroom):
    """With one fd free, kernel TCP's accept() succeeds; a shared-memory
    client's hello brings two fds more than that.  The listener takes the
    client's control socket alone, sends it to TCP ("fd limit") and accepts
    its TCP connection: the bytes the client wrote into its ring before
    (its connect() had returned) come first, nothing lost or doubled, and
    both sides say why they are not on shared memory."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, headroom, 4, shut=False)
    finally:
        lst.close()
    assert n == 4
    assert srv_info["path"] == "tcp" and srv_info["reason"] == "fd limit", srv_info
    assert last["ok"], last
    assert last["after"]["path"] == "tcp" and last["after"]["reason"] == "fd limit", last
    assert last["name"][0] == last["name"][1], last     # the address it was told stays true


def test_a_refused_client_replays_a_ring_full_of_bytes_and_its_shutdown():
    """What the client wrote before the refusal, more than the ring's small
    area (the large one in use), and its SHUT_WR after them: the kernel
    connection carries all of it, then end of file."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, 1, 200_000, shut=True)
    finally:
        lst.close()
    assert n == 200_000
    assert srv_info["reason"] == "fd limit", srv_info
    assert last["ok"] and last["after"]["reason"] == "fd limit", last


def test_a_non_blocking_selectors_client_goes_on_by_tcp():
    """A non-blocking client driven by selectors: the refusal makes its
    socket readable (its peer looks gone); its recv() moves it to TCP and
    says EAGAIN or returns data, as a kernel socket would, and the
    selector goes on watching the fd (now a kernel socket)."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, 1, 50_000, shut=False, blocking="0")
    finally:
        lst.close()
    assert n == 50_000
    assert srv_info["reason"] == "fd limit", srv_info
    assert last["ok"] and last["after"]["path"] == "tcp" and last["after"]["reason"] == "fd limit", last


BIG_RING_CLIENT = r"""
import json, os, selectors, socket, sys, time
import shrimpio.patch
from shrimpio import info
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * size)     # a ring that holds it all
c.settimeout(20)
c.connect(("127.0.0.1", port))
before = info(c)
c.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(c, selectors.EVENT_WRITE)
view = memoryview(data)
while view:
    sel.select(20)
    view = view[c.send(view):]
print(json.dumps({"written": size, "before": before}), flush=True)
sel.modify(c, selectors.EVENT_READ)
while True:                            # the refusal makes it readable
    if not sel.select(20):
        sys.exit("no refusal in 20 s")
    t0 = time.monotonic()
    try:
        got = c.recv(65536)
    except BlockingIOError:
        got = None
    took = time.monotonic() - t0
    if info(c)["path"] == "tcp":
        break
print(json.dumps({"moved_in": took, "got": got is not None}), flush=True)
got = bytearray()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    sel.select(0.5)                    # (the fd's file changes under the selector)
    try:
        d = c.recv(1 << 20)
    except BlockingIOError:
        continue
    if not d:
        break
    got += d
print(json.dumps({"ok": bytes(got) == data[::-1], "got": len(got), "after": info(c)}), flush=True)
c.close()
"""


def test_a_non_blocking_replay_larger_than_the_kernel_buffers_does_not_block():
    """A non-blocking client whose ring (sized by SO_SNDBUF) holds more
    than the kernel's buffers take before the server reads (~4 MB on
    loopback): the call that finds the refusal returns at once (EAGAIN),
    the rest goes from a thread while its fd says EAGAIN (a kernel socket
    with full buffers), and the server, which reads only once the client
    has gone on, gets every byte.  Before, the call blocked until the
    server read (up to 10 s, then the bytes were lost)."""
    import json
    import select as _sel
    size = 12 << 20
    lst = _listener()
    child = subprocess.Popen([sys.executable, "-c", BIG_RING_CLIENT, str(lst.getsockname()[1]), str(size)],
                             stdout=subprocess.PIPE, env=child_env())
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = None
    try:
        first = json.loads(child.stdout.readline())
        assert first["before"]["path"] == "shm", first
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(1), saved[1]))
        try:
            lst.settimeout(10)
            srv, _ = lst.accept()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        assert shrimpio.info(srv)["reason"] == "fd limit"
        # The client goes on before the server reads a byte.
        ready, _, _ = _sel.select([child.stdout], [], [], 5)
        assert ready, "the client's call blocked until the server reads"
        moved = json.loads(child.stdout.readline())
        assert moved["moved_in"] < 1.0, moved
        srv.settimeout(20)
        got = bytearray()
        while len(got) < size:
            d = srv.recv(1 << 20)
            if not d:
                break
            got += d
        assert len(got) == size
        srv.sendall(bytes(got[::-1]))
        srv.close()
        srv = None
        last = json.loads(child.stdout.readline())
        assert last["ok"] and last["after"]["reason"] == "fd limit", last
        assert child.wait(timeout=30) == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        if srv is not None:
            srv.close()
        lst.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


GONE_LISTENER_CLIENT = r"""
import json, socket, sys
import shrimpio.patch
from shrimpio import info
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
c.sendall(b"ping")
print(json.dumps({"before": info(c)}), flush=True)
sys.stdin.readline()                   # refused meanwhile, and the listener closed
try:
    got = c.recv(10)
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__, "errno": exc.errno, "text": str(exc)}), flush=True)
else:
    print(json.dumps({"got": got.decode()}), flush=True)
c.close()
"""


def test_a_refused_client_whose_listener_is_gone_gets_an_error_not_eof():
    """Refused, then the listener closes before the client's replay: its
    bytes cannot be delivered.  The call says so (ECONNRESET, with why),
    never a clean end of file, which would look like a delivered stream."""
    import json
    lst = _listener()
    child = subprocess.Popen([sys.executable, "-c", GONE_LISTENER_CLIENT, str(lst.getsockname()[1])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert json.loads(child.stdout.readline())["before"]["path"] == "shm"
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(1), saved[1]))
        try:
            lst.settimeout(0.3)
            with pytest.raises(TimeoutError):
                lst.accept()           # refuses it (and waits for its TCP connect, in vain)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        lst.close()
        child.stdin.write("go\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
        assert out.get("error") == "ConnectionResetError" and out["errno"] == errno.ECONNRESET, out
        assert "fd limit" in out["text"] and "4 bytes" in out["text"], out
        assert child.wait(timeout=30) == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        lst.close()
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()


DUP_CLIENT = r"""
import json, os, selectors, socket, sys
import shrimpio.patch
from shrimpio import info
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
c = socket.create_connection(("127.0.0.1", port), timeout=20)
d = c.dup()
before = info(c)
third = size // 3
c.sendall(data[:third])
d.sendall(data[third:2 * third])
print(json.dumps({"written": size, "before": before}), flush=True)
sel = selectors.DefaultSelector()
sel.register(c, selectors.EVENT_READ)
if not sel.select(20):                 # the refusal: c's peer looks gone
    sys.exit("no refusal in 20 s")
sel.close()
c.setblocking(False)
try:
    c.recv(1)                          # c (and its dup) move to TCP
except BlockingIOError:
    pass
c.settimeout(20)
d.sendall(data[2 * third:])            # by the dup, after the move
got = bytearray()
while True:
    x = d.recv(65536)
    if not x:
        break
    got += x
print(json.dumps({"ok": bytes(got) == data[::-1], "got": len(got), "after": info(d),
                  "c": info(c)}), flush=True)
c.close()
d.close()
"""


def test_the_dup_of_a_refused_socket_moves_to_tcp_with_it():
    """A connection shared by two socket objects (``dup()``): the one that
    finds the refusal moves to TCP, and so does the other (its fd is put
    on the same kernel connection), as dup()s of a kernel socket share one
    connection.  Before, the dup kept the abandoned ring: what it wrote
    after the move vanished."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, 1, 60_000, shut=False, script=DUP_CLIENT)
    finally:
        lst.close()
    assert n == 60_000
    assert srv_info["path"] == "tcp" and srv_info["reason"] == "fd limit", srv_info
    assert last["ok"], last
    for side in ("after", "c"):
        assert last[side]["path"] == "tcp" and last[side]["reason"] == "fd limit", last


HANDOFF_CLIENT = r"""
import asyncio, json, os, socket, sys
import shrimpio.patch
from shrimpio import info
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
c = socket.create_connection(("127.0.0.1", port), timeout=20)
before = info(c)
half = size // 2
c.sendall(data[:half])                 # before the hand-over: in the ring
print(json.dumps({"written": size, "before": before}), flush=True)


async def main():
    r, w = await asyncio.open_connection(sock=c)
    w.write(data[half:])
    await w.drain()
    got = await asyncio.wait_for(r.read(), 20)
    after = w.get_extra_info("shrimpio") or info(w.get_extra_info("socket"))
    print(json.dumps({"ok": got == data[::-1], "got": len(got), "after": after}), flush=True)
    w.close()
    await w.wait_closed()


asyncio.run(main())
"""


def test_a_socket_connected_then_given_to_asyncio_follows_a_refusal():
    """A socket connected by its own connect() (its hello says it can
    follow a refusal) and then given to asyncio (``sock=``): the loop's
    transport, which reads the rings itself, is made only once the
    listener has taken the hello or refused it; refused, the socket moves
    to TCP first (what it wrote before goes first) and gets the kernel
    transport.  Before, the transport found its peer gone: the bytes and
    the connection were lost."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, 1, 60_000, shut=False, script=HANDOFF_CLIENT)
    finally:
        lst.close()
    assert n == 60_000
    assert srv_info["path"] == "tcp" and srv_info["reason"] == "fd limit", srv_info
    assert last["ok"], last
    assert last["after"]["path"] == "tcp" and last["after"]["reason"] == "fd limit", last


SOCK_CALLS_CLIENT = r"""
import asyncio, json, os, socket, sys
import shrimpio.patch
from shrimpio import info
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
c = socket.create_connection(("127.0.0.1", port), timeout=20)
before = info(c)
half = size // 2
c.sendall(data[:half])                 # before the loop's calls: in the ring
print(json.dumps({"written": size, "before": before}), flush=True)
c.setblocking(False)


async def main():
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(c, data[half:])
    got = bytearray()
    while True:
        d = await asyncio.wait_for(loop.sock_recv(c, 65536), 20)
        if not d:
            break
        got += d
    print(json.dumps({"ok": bytes(got) == data[::-1], "got": len(got), "after": info(c)}), flush=True)
    c.close()


asyncio.run(main())
"""


def test_a_socket_connected_then_used_by_the_loops_sock_calls_follows_a_refusal():
    """The same socket used by ``loop.sock_sendall``/``sock_recv``, which
    read and write the rings themselves: they first wait (the loop free)
    until the listener has taken the hello or refused it; refused, the
    socket moves to TCP and the calls are the kernel's."""
    lst = _listener()
    try:
        last, srv_info, n = _serve_late(lst, 1, 60_000, shut=False, script=SOCK_CALLS_CLIENT)
    finally:
        lst.close()
    assert n == 60_000
    assert srv_info["path"] == "tcp" and srv_info["reason"] == "fd limit", srv_info
    assert last["ok"], last
    assert last["after"]["path"] == "tcp" and last["after"]["reason"] == "fd limit", last


@pytest.mark.parametrize("headroom", [1, 2])
def test_an_asyncio_server_one_fd_short_serves_a_shm_client_by_tcp(headroom, tmp_path):
    """The shrimpio loop's server, one or two fds short: a shared-memory
    client is sent to TCP and served there, with no error and no pause
    (uvloop's accept takes the one fd), and the report says why."""
    import json
    report = tmp_path / "report"
    srv = subprocess.Popen([sys.executable, "-c", TCP_SERVER, str(headroom)],
                           stdout=subprocess.PIPE, text=True,
                           env=child_env({"SHRIMPIO_REPORT": str(report)}))
    cli = None
    try:
        port = srv.stdout.readline().strip()
        assert port.isdigit(), port
        cli = subprocess.Popen([sys.executable, "-c", CLIENT, port], stdout=subprocess.PIPE,
                               text=True, env=child_env())
        assert cli.stdout.readline().strip() == "shm"      # (connect() returned: then refused)
        assert cli.stdout.readline().strip() == "ping"      # served, nothing lost
        out = json.loads(srv.stdout.readline())
        assert out["errors"] == [], out
        assert srv.wait(timeout=30) == 0
        assert cli.wait(timeout=30) == 0
        lines = [json.loads(x) for x in report.read_text().splitlines()]
        assert len(lines) == 1, lines
        assert lines[0]["path"] == "tcp" and lines[0]["reason"] == "fd limit", lines
    finally:
        for p in (srv, cli):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stdout.close()


# -- a client that writes and closes before a listener short of fds looks ----------
#
# Over TCP its bytes are in the server's kernel by then: the server accepts
# and reads them, then end of file.  The shared-memory client's bytes are in
# its ring, which the listener maps only with the hello's fds.

GONE_SERVER = r"""
import hashlib, json, os, resource, socket, sys
import shrimpio, shrimpio.patch
exec(sys.argv[2])                     # limit_leaving, as in the test module
headroom = int(sys.argv[1])
lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lst.bind(("127.0.0.1", 0))
lst.listen(4)
print(lst.getsockname()[1], flush=True)
sys.stdin.readline()                  # the client has written and closed
saved = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(headroom), saved[1]))
lst.settimeout(15)
try:
    srv, _ = lst.accept()             # as TCP's: one fd is enough
    srv.settimeout(15)
    got = bytearray()
    while True:
        d = srv.recv(65536)
        if not d:
            break
        got += d
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)
print(json.dumps({"n": len(got), "sha": hashlib.sha256(got).hexdigest(),
                  "info": shrimpio.info(srv)}), flush=True)
srv.close()
lst.close()
"""

GONE_CLIENT = r"""
import hashlib, json, os, signal, socket, sys
import shrimpio, shrimpio.patch
port, size, then = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = os.urandom(size)
c = socket.create_connection(("127.0.0.1", port), timeout=20)
path = shrimpio.info(c)["path"]
c.sendall(data)
c.close()                             # before the listener took the connection
print(json.dumps({"path": path, "sha": hashlib.sha256(data).hexdigest()}), flush=True)
if then == "kill":
    os.kill(os.getpid(), signal.SIGKILL)   # gone for good: only the listener can read them
elif then == "stay":
    sys.stdin.readline()              # alive (its close lingering) until the test is done
# (then == "exit": the program ends at once)
"""


def _gone_client(headroom: int, size: int, then: str) -> tuple[dict, dict, int]:
    """A client that connects, writes ``size`` bytes and closes, then
    (``then``) stays alive, exits at once, or dies by SIGKILL; then a
    server left ``headroom`` fds accepts: (client's line, server's line,
    client's exit status).  A client that exits must be gone before the
    server looks: its exit does not wait for the listener (the server
    waits for nothing before it is told)."""
    import json
    import inspect
    env = child_env()
    srv = subprocess.Popen([sys.executable, "-c", GONE_SERVER, str(headroom), inspect.getsource(limit_leaving)],
                           stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env)
    cli = None
    try:
        port = srv.stdout.readline().strip()
        assert port.isdigit(), port
        cli = subprocess.Popen([sys.executable, "-c", GONE_CLIENT, port, str(size), then],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        first = json.loads(cli.stdout.readline())
        assert first["path"] == "shm", first
        if then != "stay":
            # (shrimpio's linger gives up at most 10 s after the close)
            status = cli.wait(timeout=5)
        srv.stdin.write("go\n")
        srv.stdin.flush()
        line = srv.stdout.readline()
        assert line, "the server found no client"
        last = json.loads(line)
        assert srv.wait(timeout=30) == 0
        if then == "stay":
            cli.stdin.close()
            status = cli.wait(timeout=30)
        return first, last, status
    finally:
        for p in (srv, cli):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stdout.close()
                p.stdin.close()


@pytest.mark.parametrize("headroom", [1, 2])
@pytest.mark.parametrize("size", [5, 100_000])
def test_a_client_that_writes_and_closes_before_a_listener_short_of_fds_loses_nothing(headroom, size):
    """The client's close() finds its hello still unread and lingers (as a
    TCP close still delivers): the listener's refusal comes, and the
    lingering client replays its bytes and end of file by TCP."""
    first, last, status = _gone_client(headroom, size, "stay")
    assert last["n"] == size and last["sha"] == first["sha"], (first, last)
    assert last["info"]["path"] == "tcp" and last["info"]["reason"] == "fd limit", last
    assert status == 0


@pytest.mark.parametrize("then", ["exit", "kill"])
@pytest.mark.parametrize("headroom", [1, 2])
@pytest.mark.parametrize("size", [5, 100_000])
def test_a_client_gone_after_its_close_loses_nothing_to_a_listener_short_of_fds(then, headroom, size):
    """The client is gone for good (it exited, which does not wait for the
    listener, or was SIGKILLed) before the listener looks: nobody can
    follow a refusal.  The listener takes the client's segment alone (its
    space doorbell, useless to a closed peer, left to the kernel); one fd
    short (the client's control socket took the last one, where TCP's
    accept needs no more) it borrows one above its soft limit for the
    moment it maps the segment.  It accepts a connection whose peer has
    closed: the bytes, then end of file, as TCP."""
    first, last, status = _gone_client(headroom, size, then)
    assert last["n"] == size and last["sha"] == first["sha"], (first, last)
    assert last["info"]["path"] == "shm", last
    assert status == (0 if then == "exit" else -9)


@pytest.mark.parametrize("at_once", [False, True])
def test_a_replay_whose_port_is_in_a_connection_to_the_listener_goes_from_another(at_once):
    """A refused client replays by TCP from the local address its program
    was told.  That port is not held while the shared-memory connection
    lasts, so another connection (of this process or another) may have
    been given it too and be on TCP to the same listener already: the
    connect then fails (EADDRNOTAVAIL), and the replay goes from a port of
    the kernel's choice, delivering everything (it raised, and the bytes
    were lost: seen in the chaos round exhaust/server/selectors/tight)."""
    from shrimpio import _socklate
    with socket.socket() as lst, socket.socket() as first:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        lst.settimeout(10)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        first.connect(lst.getsockname())
        port = first.getsockname()[1]
        a, _ = lst.accept()
        tcp, rest = _socklate.replay(socket.AF_INET, 0, ("127.0.0.1", port), lst.getsockname(),
                                     b"written before the refusal", True, 10.0, at_once=at_once)
        try:
            assert len(rest) == 0
            assert tcp.getsockname()[1] != port
            b, addr = lst.accept()
            b.settimeout(10)
            with a, b, b.makefile("rb") as f:
                assert addr == tcp.getsockname()
                assert f.read() == b"written before the refusal"     # (then end of file)
        finally:
            tcp.close()
