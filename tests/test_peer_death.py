"""A peer process SIGKILLed: every API sees it as kernel TCP would, and no
API spins afterwards.

Kernel TCP, when the peer dies: a non-blocking ``recv`` gives the data that
came first, then end of file (``b""``), or ``ConnectionResetError`` once if
bytes of ours were left unread by the peer (its kernel answered with a
reset), then end of file; a ``send`` on a full buffer fails with ``EPIPE``.
Over shared memory the rings cannot tell, so the calls that would
otherwise say "try again" ask the doorbell.

Each case kills a real child process, then measures this process's CPU
time (``getrusage``) over a bounded window of the API waiting: a spin costs
the whole window, a sleep almost nothing.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import select
import selectors
import signal
import socket
import threading
import time

import pytest

import shrimpio.patch
import shrimpio.socket as ss
from shrimpio import _poll

from conftest import wait_for
from result_thread import ResultThread

shrimpio.patch.disable()

DEADLINE = 10.0
#: The window over which an idle waiter's CPU time is measured (seconds),
#: and the most of it a waiter that sleeps may use.
WINDOW = 0.5
IDLE_CPU = 0.15


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Peer:
    """A child process connected to ``addr`` over shared memory: it sends
    ``data`` and, if ``read`` is False, never reads; then waits to be
    killed."""

    def __init__(self, addr: tuple, data: bytes = b"", read: bool = True,
                 kernel: bool = False) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # pragma: no cover - child
            code = 1
            try:
                os.close(r)
                sock = (socket.socket if kernel else ss.socket)(socket.AF_INET,
                                                                socket.SOCK_STREAM)
                sock.connect(addr)
                assert kernel or ss.info(sock)["path"] == "shm"
                sock.sendall(data)
                os.write(w, b"k")
                if read:
                    while sock.recv(1 << 16):
                        pass
                signal.pause()
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._pipe = pid, r
        ready, _, _ = select.select([r], [], [], DEADLINE)
        assert ready and os.read(r, 1) == b"k", "the peer did not connect"

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            assert os.WIFSIGNALED(status)
            self.pid = 0
            os.close(self._pipe)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


@pytest.fixture(autouse=True, scope="module")
def _uvloop_pipe() -> None:
    """uvloop opens a process-wide pipe with its first loop and keeps it:
    have it opened before the leak checks count fds."""
    import uvloop

    async def nothing() -> None:
        pass
    uvloop.run(nothing())


@pytest.fixture
def listener():
    lst = ss.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst.settimeout(DEADLINE)
    try:
        yield lst
    finally:
        lst.close()


def _accept(lst):
    srv, _ = lst.accept()
    assert ss.info(srv)["path"] == "shm"
    return srv


def _nonblocking_read_all(sock, flags: int = 0) -> list:
    """Read as a hand-written non-blocking loop does: select, then recv
    until EAGAIN; stop at end of file or an error.  Returns what each recv
    gave (bytes, or the exception's type); fails if it loops more than a
    few times per byte, or runs past the deadline."""
    out: list = []
    deadline = time.monotonic() + DEADLINE
    for _ in range(1000):
        assert time.monotonic() < deadline, out[-5:]
        _poll.select([sock], [], [], 1.0)
        while True:
            try:
                data = sock.recv(1 << 16, flags)
            except BlockingIOError:
                break
            except ConnectionResetError:
                out.append(ConnectionResetError)
                continue
            out.append(data)
            if not data:
                return out
    raise AssertionError(f"no end of file after 1000 rounds: {out[-5:]}")


@pytest.mark.parametrize("how", ["setblocking", "MSG_DONTWAIT"])
@pytest.mark.parametrize("case", ["idle", "data_first", "unread_by_peer"])
def test_nonblocking_recv_sees_the_death(listener, how, case):
    data = b"sent before dying" if case == "data_first" else b""
    with Peer(listener.getsockname(), data, read=case != "unread_by_peer") as peer:
        srv = _accept(listener)
        with srv:
            flags = 0
            if how == "setblocking":
                srv.setblocking(False)
            else:
                flags = socket.MSG_DONTWAIT
            if case == "unread_by_peer":
                srv.sendall(b"never read")
            if data:
                wait_for(lambda: srv._shm.rx.readable() == len(data), what="the data")
            if not data:
                with pytest.raises(BlockingIOError):
                    srv.recv(10, flags)               # alive: try again
            peer.kill()
            got = _nonblocking_read_all(srv, flags)
            want = ([data] if data else []) + \
                ([ConnectionResetError] if case == "unread_by_peer" else []) + [b""]
            assert got == want
            assert srv.recv(10, flags) == b""         # and end of file from then on


def test_msg_peek_on_a_dead_peer_is_end_of_file(listener):
    with Peer(listener.getsockname()) as peer:
        srv = _accept(listener)
        with srv:
            with pytest.raises(BlockingIOError):
                srv.recv(10, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            peer.kill()
            wait_for(lambda: srv.recv(10, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"",
                     what="peek to see end of file")


@pytest.mark.parametrize("call", ["send", "sendall", "sendmsg"])
def test_nonblocking_send_to_a_dead_reader_is_epipe(listener, call):
    with Peer(listener.getsockname(), read=False) as peer:
        srv = _accept(listener)
        with srv:
            srv.setblocking(False)
            chunk = b"x" * 65536
            with pytest.raises(BlockingIOError):
                while True:
                    srv.send(chunk)                   # fill the ring
            peer.kill()
            t0 = cpu()
            with pytest.raises(BrokenPipeError) as e:
                for _ in range(1000):
                    try:
                        if call == "send":
                            srv.send(chunk)
                        elif call == "sendall":
                            srv.sendall(chunk)
                        else:
                            srv.sendmsg([chunk])
                    except BlockingIOError:
                        _poll.select([], [srv], [], 1.0)
            assert e.value.errno == errno.EPIPE
            assert cpu() - t0 < 2.0


@pytest.mark.parametrize("kind", ["shm", "tcp"])
@pytest.mark.parametrize("blocking", [False, True], ids=["nonblocking", "blocking"])
def test_writes_to_a_dead_reader_fail_soon(kind, blocking):
    """A reader killed before it read a byte: the writer hears of it within
    a few sends, as over TCP (the dead peer's kernel answers the first
    segment with a reset), not after a ring's worth (4 MiB) of bytes sent
    into nothing.  Small sends, blocking or not, counted until the error."""
    lst = (ss.socket if kind == "shm" else socket.socket)(socket.AF_INET, socket.SOCK_STREAM)
    with lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        lst.settimeout(DEADLINE)
        with Peer(lst.getsockname(), read=False, kernel=kind == "tcp") as peer:
            srv, _ = lst.accept()
            with srv:
                assert kind == "tcp" or ss.info(srv)["path"] == "shm"
                peer.kill()
                srv.settimeout(DEADLINE if blocking else 0.0)
                chunk = b"w" * 4096
                sent = 0
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    while sent < 16 << 20:
                        try:
                            sent += srv.send(chunk)
                        except BlockingIOError:
                            _poll.select([], [srv], [], 1.0)
    if kind == "shm":
        # One look per 256 KiB written while the reader takes nothing.
        assert sent <= 256 * 1024 + len(chunk), sent


def test_blocked_sendall_fails_when_the_reader_dies(listener):
    with Peer(listener.getsockname(), read=False) as peer:
        srv = _accept(listener)
        with srv:
            # (more than the ring holds: the sendall blocks)
            t = ResultThread(srv.sendall, b"y" * (2 * srv._shm.tx.capacity), deadline=DEADLINE)
            t.start()
            wait_for(lambda: srv._shm.tx.free() == 0, what="the ring to fill")
            peer.kill()
            with pytest.raises(BrokenPipeError):
                t.result()


def test_blocking_recv_wakes_and_stays_quiet(listener):
    with Peer(listener.getsockname()) as peer:
        srv = _accept(listener)
        with srv:
            t = ResultThread(srv.recv, 10, deadline=DEADLINE)
            t.start()
            peer.kill()
            assert t.result() == b""
            srv.settimeout(WINDOW)
            t0 = cpu()
            assert srv.recv(10) == b""                # at once, and nothing spins after
            assert cpu() - t0 < IDLE_CPU


@pytest.fixture
def patched():
    shrimpio.patch.enable()
    try:
        yield
    finally:
        shrimpio.patch.disable()


@pytest.mark.parametrize("api", ["select", "poll", "epoll", "DefaultSelector"])
def test_selectors_loop_sees_eof_and_then_sleeps(listener, patched, api):
    """A hand-written event loop: the dead peer's socket is reported ready,
    its recv ends it; the loop then waits on its other sockets without
    burning a core."""
    with Peer(listener.getsockname(), b"last words") as peer:
        srv = _accept(listener)
        srv.setblocking(False)
        quiet_a, quiet_b = socket.socketpair()
        try:
            sel = selectors.DefaultSelector() if api == "DefaultSelector" else None
            if sel is not None:
                sel.register(srv, selectors.EVENT_READ)
                sel.register(quiet_a, selectors.EVENT_READ)
            elif api == "poll":
                p = select.poll()
                p.register(srv, select.POLLIN)
                p.register(quiet_a, select.POLLIN)
            elif api == "epoll":
                ep = select.epoll()
                ep.register(srv, select.EPOLLIN)
                ep.register(quiet_a, select.EPOLLIN)

            def ready(timeout):
                if sel is not None:
                    return [k.fileobj.fileno() for k, _ in sel.select(timeout)]
                if api == "poll":
                    return [fd for fd, _ in p.poll(timeout * 1000)]
                if api == "epoll":
                    return [fd for fd, _ in ep.poll(timeout)]
                socks = [quiet_a] + ([srv] if srv.fileno() >= 0 else [])
                return [s.fileno() for s in select.select(socks, [], [], timeout)[0]]

            wait_for(lambda: srv._shm.rx.readable(), what="the data")
            peer.kill()
            got = b""
            deadline = time.monotonic() + DEADLINE
            while srv.fileno() >= 0:
                assert time.monotonic() < deadline, got
                if srv.fileno() in ready(1.0):
                    try:
                        data = srv.recv(100)
                    except BlockingIOError:
                        continue
                    got += data
                    if not data:
                        if sel is not None:
                            sel.unregister(srv)
                        elif api == "poll":
                            p.unregister(srv)
                        elif api == "epoll":
                            ep.unregister(srv)
                        srv.close()
            assert got == b"last words"
            t0 = cpu()
            assert ready(WINDOW) == []
            assert cpu() - t0 < IDLE_CPU
            if sel is not None:
                sel.close()
            elif api == "epoll":
                ep.close()
        finally:
            srv.close()
            quiet_a.close()
            quiet_b.close()


def test_asyncio_transport_loses_the_connection_and_the_loop_sleeps(listener):
    """The shrimpio loop's transport of an accepted connection: the peer's
    death is connection_lost (or EOF), and the loop then idles."""
    import shrimpio.transport as tr
    with Peer(listener.getsockname(), b"hi") as peer:
        srv = _accept(listener)

        async def main():
            loop = asyncio.get_running_loop()
            events = []
            done = loop.create_future()

            class Proto(asyncio.Protocol):
                def data_received(self, data):
                    events.append(data)

                def eof_received(self):
                    events.append("eof")

                def connection_lost(self, exc):
                    events.append("lost")
                    done.set_result(None)

            transport, _ = await loop.connect_accepted_socket(Proto, srv)
            await asyncio.sleep(0)
            peer.kill()
            await asyncio.wait_for(done, DEADLINE)
            assert events[0] == b"hi" and events[-1] == "lost", events
            t0 = cpu()
            await asyncio.sleep(WINDOW)
            assert cpu() - t0 < IDLE_CPU
            transport.close()

        loop = tr.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()


def test_asyncio_writer_to_a_dead_reader_fails_and_the_loop_sleeps(listener):
    import shrimpio.transport as tr
    with Peer(listener.getsockname(), read=False) as peer:
        srv = _accept(listener)
        ring = srv._shm.tx.capacity

        async def main():
            reader, writer = await asyncio.open_connection(sock=srv)
            writer.write(b"z" * (2 * ring))             # more than the ring holds: buffered
            await asyncio.sleep(0)
            peer.kill()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                await asyncio.wait_for(writer.drain(), DEADLINE)
            t0 = cpu()
            await asyncio.sleep(WINDOW)
            assert cpu() - t0 < IDLE_CPU
            writer.close()

        loop = tr.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()


# --------------------------------------------------------------------------- VMMC

def _importer(chan, name):
    from shrimpio.vmmc import Endpoint
    ep = Endpoint(name)
    imp = ep.import_buffer("exp", "buf")
    imp.send(b"hi", 0, notify=True)
    chan.send("sent")
    signal.pause()


def _exporter(chan):
    from shrimpio.vmmc import Endpoint
    ep = Endpoint("exp")
    ep.export("buf", 4096)
    chan.send("ready")
    signal.pause()


def test_vmmc_exporter_waiting_on_a_dead_importer_sleeps():
    from shrimpio._control import Registry
    from shrimpio.vmmc import Endpoint
    from vmmc_helpers import Child
    with Endpoint("exp") as ep:
        exp = ep.export("buf", 4096)
        with Child(_importer, "imp") as child:
            child.expect("sent")
            assert exp.wait(DEADLINE) == (0, 2)
            child.kill()
            wait_for(lambda: exp.wait(0.05) is None and exp.importers == 0,
                     what="the dead importer to be dropped")
            t0 = cpu()
            assert exp.wait(WINDOW) is None
            assert cpu() - t0 < IDLE_CPU
    assert Registry.open().sweep() == ["imp"]


def test_vmmc_importer_of_a_dead_exporter_fails_and_does_not_spin():
    from shrimpio._control import Registry
    from shrimpio.vmmc import Endpoint
    from vmmc_helpers import Child
    with Child(_exporter) as child:
        child.expect("ready")
        with Endpoint("imp") as ep:
            imp = ep.import_buffer("exp", "buf")
            child.kill()
            t0 = cpu()
            with pytest.raises(ConnectionResetError):
                deadline = time.monotonic() + DEADLINE
                while time.monotonic() < deadline:
                    imp.send(b"x", 0, notify=True)
                    threading.Event().wait(0.01)       # a sender's own pace
            assert cpu() - t0 < 1.0
            imp.close()
    assert Registry.open().sweep() == ["exp"]
