"""Stream servers and clients, one per API: ``blocking`` (a thread per
connection), ``nonblocking`` (a hand-written loop over the patched
``select``/``poll``/``epoll`` with non-blocking calls or ``MSG_DONTWAIT``),
``selectors`` (a selectors loop) and ``asyncio`` (streams on the loop the
patch gives).

A client sends a stream (:func:`common.header`, then the keyed pattern)
and checks the echo; the server checks what it receives and echoes it.
Either may be the victim, an honest peer, the side that is killed, or (with
``scribble``) a hostile peer that scribbles over the ring headers of its
connections: then it checks nothing, and the other side does not check the
bytes of that connection (a hostile peer may send what it likes), only that
it survives.  Connections whose peer died or misbehaved end with
end-of-file or a ``ConnectionError``, counted as ``cut``; anything else
raised is an uncaught exception of the process.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import select
import selectors
import socket
import threading
from collections import Counter
from typing import Optional

from . import scribble as _scribble
from .common import (CHUNK, HEADER, HOSTILE_START, Channel, DataError, Deadline, Echo, HangError, Inbound,
                     Pattern, addr_of, join_all, key_of, make_rng)

#: The address honest clients connect from (hostile ones bind or claim another).
HONEST_HOST = "127.0.0.1"
#: Longest a single connection may take once its peer is gone (seconds).
CONN_DEADLINE = 20.0


class Stats(Counter):
    """Outcomes of a process's connections, reported to the harness, and
    how many of a server's connections are open (``live``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self._lock = threading.Lock()

    def opened(self) -> None:
        with self._lock:
            self.live += 1

    def closed(self) -> None:
        with self._lock:
            self.live -= 1

    def cut(self, exc: Optional[BaseException]) -> None:
        self["cut"] += 1
        self["cut:" + (type(exc).__name__ if exc is not None else "eof")] += 1


def _trusted(args: dict, peer) -> bool:
    """Check the bytes of this client's stream?  Only an honest client's:
    they connect from :data:`HONEST_HOST`.  A hostile hello may claim any
    client address (hello.HOSTILE_HOST, or a mutated one), and a hostile
    peer may send anything, zeros included."""
    return bool(args.get("verify", True) and peer and peer[0] == HONEST_HOST)


def _fd_exhausted(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


# -- per-connection state (servers and clients alike) ------------------------------

class Side:
    """One end of a connection: the server's (check the inbound stream,
    echo it) or the client's (send a stream, check its echo)."""

    def __init__(self, pattern: Pattern, *, client: bool, length: int = 0, start: int = 0,
                 verify: bool = True) -> None:
        self.client = client
        self.verify = verify
        self.echo = Echo(pattern, start, length) if client else None
        self.inbound = None if client else Inbound(pattern)
        self.out = bytearray()       # server: echo owed to the client
        self.eof = False             # client: shut for writing; server: end of file read

    def received(self, data) -> None:
        if self.client:
            if self.verify:
                self.echo.echoed(data)
            else:
                self.echo.got += len(data)
        else:
            if self.verify:
                self.inbound.received(data)
            self.out += data

    def complete(self) -> bool:
        if self.client:
            return self.echo.got == self.echo.total
        return not self.verify or self.inbound.complete


# -- blocking -------------------------------------------------------------------------

def _recv(sock, rng, n: int = 65536):
    how = rng.randrange(4)
    if how == 0:
        return sock.recv(n)
    if how == 1:
        buf = bytearray(n)
        k = sock.recv_into(buf)
        return bytes(buf[:k])
    if how == 2:
        return sock.recvmsg(n)[0]
    buf = bytearray(n)
    k = sock.recvmsg_into([memoryview(buf)[:n // 2], memoryview(buf)[n // 2:]])[0]
    return bytes(buf[:k])


def _send(sock, rng, data) -> None:
    how = rng.randrange(3)
    if how == 0:
        sock.sendall(data)
    elif how == 1:
        mv = memoryview(data)
        while mv:
            mv = mv[sock.send(mv):]
    else:
        mv = memoryview(data)
        while mv:
            mv = mv[sock.sendmsg([mv[:len(mv) // 2], mv[len(mv) // 2:]]):]


def serve_blocking_conn(conn, side: Side, stats: Stats, rng, scribbler=None) -> None:
    conn.settimeout(CONN_DEADLINE)
    try:
        while True:
            data = _recv(conn, rng)
            if not data:
                break
            side.received(data)
            _send(conn, rng, side.out)
            side.out.clear()
        stats["complete" if side.complete() else "cut"] += 1
        if not side.complete():
            stats["cut:eof"] += 1
    except ConnectionError as exc:
        stats.cut(exc)
    except TimeoutError:
        if side.verify:
            raise HangError("a server connection saw nothing for CONN_DEADLINE") from None
        stats.cut(None)        # a hostile peer may stall a stream: TCP would wait too
    finally:
        if scribbler is not None:
            scribbler.forget(conn)
        conn.close()
        stats.closed()


def client_blocking_conn(addr, side: Side, stats: Stats, rng, scribbler=None,
                         bind: "str | None" = None) -> None:
    try:
        if rng.random() < 0.5 and bind is None:
            sock = socket.create_connection(addr, timeout=CONN_DEADLINE)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(CONN_DEADLINE)
            try:
                if bind is not None:
                    sock.bind((bind, 0))
                sock.connect(addr)
            except BaseException:
                sock.close()
                raise
    except ConnectionError as exc:
        stats["refused"] += 1
        stats["refused:" + type(exc).__name__] += 1
        return
    except TimeoutError:
        raise HangError("connect took CONN_DEADLINE") from None
    try:
        echo = side.echo
        while echo.sent < echo.total:
            out = echo.next_out(rng.choice([1, 100, 4096, 65536]))
            _send(sock, rng, out)
            echo.out_done(len(out))
            while echo.got < echo.sent:
                data = _recv(sock, rng, echo.sent - echo.got)
                if not data:
                    raise EOFError
                side.received(data)
                if scribbler is not None and echo.got >= HEADER.size:
                    scribbler.start(sock)
        sock.shutdown(socket.SHUT_WR)
        if _recv(sock, rng) and side.verify:
            raise DataError("bytes after the echo of the whole stream")
        stats["complete"] += 1
    except EOFError:
        stats.cut(None)
    except ConnectionError as exc:
        stats.cut(exc)
    except TimeoutError:
        if side.verify:
            raise HangError("a client connection saw nothing for CONN_DEADLINE") from None
        stats.cut(None)        # a hostile peer may stall a stream: TCP would wait too
    finally:
        if scribbler is not None:
            scribbler.forget(sock)
        sock.close()


# -- non-blocking loops -----------------------------------------------------------------

class _Poller:
    """select / poll / epoll / a selectors class, over (sock -> (read, write)).
    A poll or epoll object is made afresh for each wait (``fresh``: every
    registration is new, as in code that polls once) or kept, its
    registrations updated (as in a long-running loop; a server short of
    fds must not need one for each wait)."""

    def __init__(self, kind: str, fresh: bool = False) -> None:
        self.kind = kind
        self.sel = getattr(selectors, kind)() if kind.endswith("Selector") else None
        self.fresh = fresh
        self.p = None
        self.reg: dict[int, tuple] = {}          # fd -> (sock, mask), when kept
        if kind in ("poll", "epoll") and not fresh:
            self.p = select.poll() if kind == "poll" else select.epoll()

    def _bits(self):
        return ((select.POLLIN, select.POLLOUT) if self.kind == "poll"
                else (select.EPOLLIN, select.EPOLLOUT))

    def wait(self, interests: dict, timeout: float) -> list:
        if self.sel is not None:
            reg = self.sel.get_map()
            for s in list(reg.values()):
                if s.fileobj not in interests:
                    self.sel.unregister(s.fileobj)
            for s, (r, w) in interests.items():
                ev = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
                key = reg.get(s)
                if key is None:
                    self.sel.register(s, ev)
                elif key.events != ev:
                    self.sel.modify(s, ev)
            return [k.fileobj for k, _ in self.sel.select(timeout)]
        if self.kind == "select":
            rl = [s for s, (r, _) in interests.items() if r]
            wl = [s for s, (_, w) in interests.items() if w]
            r, w, _ = select.select(rl, wl, [], timeout)
            return list(set(r) | set(w))
        rb, wb = self._bits()
        if self.p is not None:
            want = {s.fileno(): (s, (rb if r else 0) | (wb if w else 0))
                    for s, (r, w) in interests.items()}
            for fd, (s, _) in list(self.reg.items()):
                if want.get(fd, (None,))[0] is not s:
                    self.forget(s, fd)
            for fd, (s, mask) in want.items():
                cur = self.reg.get(fd)
                if cur is None:
                    self.p.register(s, mask)
                elif cur[1] != mask:
                    self.p.modify(s, mask)
                self.reg[fd] = (s, mask)
            evs = self.p.poll(timeout * 1000 if self.kind == "poll" else timeout)
            return [self.reg[fd][0] for fd, _ in evs if fd in self.reg]
        p = select.poll() if self.kind == "poll" else select.epoll()
        by_fd = {}
        try:
            for s, (r, w) in interests.items():
                p.register(s, (rb if r else 0) | (wb if w else 0))
                by_fd[s.fileno()] = s
            evs = p.poll(timeout * 1000 if self.kind == "poll" else timeout)
        finally:
            if self.kind == "epoll":
                p.close()
        return [by_fd[fd] for fd, _ in evs]

    def forget(self, s, fd: "int | None" = None) -> None:
        """Before ``s`` closes (its fd number may be reused at once)."""
        if self.sel is not None:
            if s in self.sel.get_map():
                self.sel.unregister(s)
            return
        if self.p is None:
            return
        fd = s.fileno() if fd is None else fd
        if self.reg.get(fd, (None,))[0] is s:
            del self.reg[fd]
            try:
                self.p.unregister(fd)
            except (OSError, KeyError):
                pass

    def close(self) -> None:
        if self.sel is not None:
            self.sel.close()
        if self.p is not None and self.kind == "epoll":
            self.p.close()


def nonblocking_loop(args: dict, ch: Channel, stats: Stats, *, lst=None, clients=None) -> None:
    """One thread serving a listener's clients (``lst``) or running client
    connections (``clients``: a callable giving the next (addr, Side) or
    None), with non-blocking calls, until told to finish and nothing is open."""
    rng = make_rng(args, "loop")
    kind = args.get("poller") or rng.choice(
        ["select", "poll", "epoll"] if args["api"] == "nonblocking"
        else ["DefaultSelector", "PollSelector", "EpollSelector", "SelectSelector"])
    dontwait = args["api"] == "nonblocking" and rng.random() < 0.5
    flags = socket.MSG_DONTWAIT if dontwait else 0
    fresh = "lower_limit" not in args and rng.random() < 0.5
    poller = _Poller(kind, fresh)
    _limit(args, stats)
    ch.report("loop", poller=kind, dontwait=dontwait, fresh=fresh)
    conns: dict = {}                 # sock -> Side
    deadline: Optional[Deadline] = None
    concurrency = args.get("concurrency", 4)
    try:
        while True:
            if ch.finish.is_set():
                if lst is not None:
                    poller.forget(lst)
                    lst.close()
                    lst = None
                clients = None
                if not conns:
                    return
                deadline = deadline or Deadline(CONN_DEADLINE)
                if deadline.expired():
                    raise HangError(f"{len(conns)} connections still open at the deadline")
            while clients is not None and len(conns) < concurrency:
                nxt = clients()
                if nxt is None:
                    clients = None
                    break
                addr, side = nxt
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.settimeout(CONN_DEADLINE)
                    sock.connect(addr)
                except ConnectionError as exc:
                    sock.close()
                    stats["refused"] += 1
                    stats["refused:" + type(exc).__name__] += 1
                    continue
                sock.setblocking(dontwait)     # MSG_DONTWAIT: on a blocking socket
                conns[sock] = side
            stats.live = len(conns)
            if clients is None and lst is None and not conns:
                return
            interests = {s: _interest(side) for s, side in conns.items()}
            if lst is not None:
                interests[lst] = (True, False)
            for s in poller.wait(interests, 0.05):
                if s is lst:
                    try:
                        c, peer = lst.accept()
                    except BlockingIOError:
                        stats["accept_eagain"] += 1      # (allowed: another may take it)
                        continue
                    except OSError as exc:
                        if not _fd_exhausted(exc):
                            raise
                        stats["accept:" + errno.errorcode[exc.errno]] += 1   # as TCP
                        ch.finish.wait(0.01)
                        continue
                    c.setblocking(dontwait)
                    conns[c] = Side(Pattern(key_of(args)), client=False, verify=_trusted(args, peer))
                    continue
                side = conns[s]
                if not _pump(s, side, flags, stats, rng):
                    del conns[s]
                    poller.forget(s)
                    s.close()
    finally:
        for s in conns:
            s.close()
        stats.live = 0
        if lst is not None:
            lst.close()
        poller.close()


def _interest(side: Side) -> tuple[bool, bool]:
    if side.client:
        return True, bool(side.out) or side.echo.sent < side.echo.total
    # A server reads until end of file, and not while it owes much echo.
    return not side.eof and len(side.out) <= (1 << 20), bool(side.out)


def _pump(s, side: Side, flags: int, stats: Stats, rng) -> bool:
    """Read and write what can be; False when the connection is over."""
    try:
        if side.client and side.echo.sent < side.echo.total and not side.out:
            side.out += side.echo.next_out(rng.choice([1, 4096, 65536, CHUNK]))
        while side.out:
            try:
                n = s.send(side.out, flags)
            except BlockingIOError:
                break
            if side.client:
                side.echo.out_done(n)
            del side.out[:n]
        if side.client and side.echo.sent == side.echo.total and not side.out and not side.eof:
            side.eof = True
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:      # (TCP, after a reset)
                    raise
                stats.cut(exc)
                return False
        if not side.client and (side.eof or len(side.out) > (1 << 20)):
            if side.eof and not side.out:
                stats["complete" if side.complete() else "cut"] += 1
                if not side.complete():
                    stats["cut:eof"] += 1
                return False
            return True              # echo still owed
        for _ in range(8):
            try:
                data = s.recv(65536, flags)
            except BlockingIOError:
                return True
            if not data:
                if side.out and not side.client:
                    side.eof = True          # the echo still goes out
                    return True
                stats["complete" if side.complete() else "cut"] += 1
                if not side.complete():
                    stats["cut:eof"] += 1
                return False
            side.received(data)
        return True
    except ConnectionError as exc:
        stats.cut(exc)
        return False


# -- asyncio --------------------------------------------------------------------------

async def _async_server(args: dict, ch: Channel, stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    from .proc import asyncio_handler
    loop.set_exception_handler(asyncio_handler)
    tasks = set()

    async def handle(reader, writer):
        tasks.add(asyncio.current_task())
        stats.opened()
        side = Side(Pattern(key_of(args)), client=False,
                    verify=_trusted(args, writer.get_extra_info("peername")))
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                side.received(data)
                writer.write(bytes(side.out))
                side.out.clear()
                await writer.drain()
            stats["complete" if side.complete() else "cut"] += 1
        except ConnectionError as exc:
            stats.cut(exc)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            stats.closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    _limit(args, stats)
    ch.report("ready", addr=server.sockets[0].getsockname()[:2])
    await loop.run_in_executor(None, ch.finish.wait)
    server.close()
    live = [t for t in tasks if not t.done()]
    if live:
        done, pending = await asyncio.wait(live, timeout=CONN_DEADLINE)
        if pending:
            raise HangError(f"{len(pending)} asyncio connections still open at the deadline")
    await server.wait_closed()


async def _async_clients(args: dict, ch: Channel, stats: Stats, nxt) -> None:
    from .proc import asyncio_handler
    asyncio.get_running_loop().set_exception_handler(asyncio_handler)
    rng = make_rng(args, "aclients")

    async def one(addr, side: Side):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), CONN_DEADLINE)
        except ConnectionError as exc:
            stats["refused"] += 1
            stats["refused:" + type(exc).__name__] += 1
            return
        echo = side.echo

        async def pump_out():
            while echo.sent < echo.total:
                out = echo.next_out(rng.choice([1, 4096, 65536]))
                writer.write(out)
                echo.out_done(len(out))
                await writer.drain()
            writer.write_eof()

        out_task = asyncio.ensure_future(pump_out())
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), CONN_DEADLINE)
                if not data:
                    break
                side.received(data)
            await out_task
            stats["complete" if side.complete() else "cut"] += 1
        except ConnectionError as exc:
            stats.cut(exc)
        except asyncio.TimeoutError:
            if side.verify:
                raise HangError("an asyncio client saw nothing for CONN_DEADLINE") from None
            stats.cut(None)
        finally:
            out_task.cancel()
            try:
                await out_task
            except (asyncio.CancelledError, ConnectionError):
                pass
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    running = set()
    while not ch.finish.is_set():
        item = nxt()
        if item is None:
            break
        running.add(asyncio.ensure_future(one(*item)))
        if len(running) >= args.get("concurrency", 4):
            _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    if running:
        _, pending = await asyncio.wait(running, timeout=CONN_DEADLINE)
        if pending:
            raise HangError("asyncio clients still running at the deadline")
    for t in running:
        t.result()


# -- roles --------------------------------------------------------------------------

def _quiesce(ch: Channel, stats: Stats) -> None:
    """Everything closed: let the harness look for leaks."""
    from shrimpio import _connection
    gc.collect()
    _connection.drop_spares()         # a spare kit is kept by design, not a leak
    ch.checkpoint("quiet", stats=dict(stats))


def server(args: dict) -> None:
    """Accept and echo until told to finish; then every connection must end
    by itself (its peer finished, or died)."""
    ch = Channel()
    ch.checkpoint("base")
    stats = Stats()
    ch.when_idle(lambda: stats.live == 0)
    api = args["api"]
    if api == "asyncio":
        asyncio.run(_async_server(args, ch, stats))
    else:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind(("127.0.0.1", 0))
        lst.listen(64)
        ch.report("ready", addr=lst.getsockname())
        if api == "blocking":
            _limit(args, stats)
            _blocking_server(args, ch, stats, lst)
        else:
            lst.setblocking(False)
            nonblocking_loop(args, ch, stats, lst=lst)
    if "restore_limit" in args:
        args["restore_limit"]()
    _quiesce(ch, stats)


def _limit(args: dict, stats: Stats) -> None:
    """fdplay.exhaust_server: few fds to spare from here on (the server
    set up: listener, loop, poller)."""
    if "lower_limit" in args:
        stats["limit"] = args["lower_limit"]()


def _blocking_server(args: dict, ch: Channel, stats: Stats, lst) -> None:
    threads = []
    scribbler = _scribble.Scribbler(args) if args.get("scribble") else None
    lst.settimeout(0.05)
    try:
        while not ch.finish.is_set():
            try:
                conn, peer = lst.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not _fd_exhausted(exc):
                    raise
                stats["accept:" + errno.errorcode[exc.errno]] += 1   # as TCP: try later
                ch.finish.wait(0.01)
                continue
            if scribbler is not None:
                scribbler.start(conn)
            side = Side(Pattern(key_of(args)), client=False, verify=_trusted(args, peer))
            stats.opened()
            t = threading.Thread(target=serve_blocking_conn,
                                 args=(conn, side, stats, make_rng(args, f"c{len(threads)}"),
                                       scribbler))
            t.start()
            threads.append(t)
    finally:
        lst.close()
    join_all(threads, Deadline(CONN_DEADLINE), "server")
    if scribbler is not None:
        scribbler.stop()


def client(args: dict) -> None:
    """Run ``conns`` echo streams (0: until told to finish) against
    ``addr`` (and ``hostile_addr``, whose streams are not checked)."""
    ch = Channel()
    ch.checkpoint("base")
    stats = Stats()
    rng = make_rng(args, "client")
    pattern = Pattern(key_of(args))
    count = [0]
    limit = args.get("conns", 0)
    verify = args.get("verify", True)
    sizes = args.get("sizes", [0, 1, 100, 5000, 70000, 300000])

    def nxt() -> Optional[tuple]:
        if ch.finish.is_set() or (limit and count[0] >= limit):
            return None
        if args.get("stop_on_cut") and (stats["cut"] or stats["refused"]):
            return None              # the server is gone
        count[0] += 1
        length = rng.choice(sizes)
        hostile = args.get("hostile_addr") and rng.random() < 0.5
        addr = tuple(args["hostile_addr"]) if hostile else addr_of(args)
        start = HOSTILE_START if args.get("scribble") else rng.randrange(1 << 30)
        return addr, Side(pattern, client=True, length=length, start=start,
                          verify=verify and not hostile)

    ch.report("ready")
    api = args["api"]
    if api == "asyncio":
        asyncio.run(_async_clients(args, ch, stats, nxt))
    elif api == "blocking":
        scribbler = _scribble.Scribbler(args) if args.get("scribble") else None
        while True:
            item = nxt()
            if item is None:
                break
            client_blocking_conn(*item, stats, rng, scribbler, args.get("bind"))
        if scribbler is not None:
            scribbler.stop()
    else:
        nonblocking_loop(args, ch, stats, clients=nxt)
    ch.report("finished", stats=dict(stats))
    ch.wait("finish")
    _quiesce(ch, stats)

