"""fds leaving shrimpio's hands, and running out of them.

``handoff``: a connected shared-memory socket, part-way through an echo
stream, is handed to another process (``SCM_RIGHTS``, a ``subprocess``
child's ``pass_fds``, a ``multiprocessing`` spawn child given the socket),
which finishes the stream: the connection escapes (docs/fd.md) and not a
byte may be lost, added or reordered on either side.

``exhaust``: a process whose ``RLIMIT_NOFILE`` is just above what it holds
connects (or accepts) many connections at once: each must end up on
shared memory or kernel TCP and carry its stream whole; the only error
allowed is the one TCP gives (``EMFILE`` from ``socket()`` or
``accept()``).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import resource
import socket
import subprocess
import sys
from collections import Counter

from .common import (CHUNK, EXIT_DATA, Channel, DataError, Echo, HangError, Pattern, addr_of,
                     key_of, make_rng)

#: The fewest free fds a server is left with (after its listener, loop and
#: poller are made).  Taking a shared-memory client needs three at once
#: (the client's control socket, then the hello's segment and space
#: doorbell; two stay), a TCP client one: a server with one or two free fds
#: and no connection to close sends the clients that can follow a refusal
#: to TCP, but can never take an asyncio client's own connect, which then
#: waits for ever (its connect() returned once its hello was sent).  A
#: limit of the design (one extra fd per connection and side, one-way
#: hello), in docs/chaos.md.
MIN_SERVER_HEADROOM = 3
#: A client needs one (its socket(); a connect without room for shared
#: memory's fds goes by TCP, "fd limit").
MIN_CLIENT_HEADROOM = 1
#: Errors TCP gives when a process is out of fds.
FD_ERRORS = (errno.EMFILE, errno.ENFILE)


# -- handoff --------------------------------------------------------------------------

def _finish_stream(sock, state: dict) -> None:
    """The second half of an echo stream (``state``: what was sent and
    echoed so far): send the rest, shut, read the echo to its end."""
    echo = Echo(Pattern(bytes.fromhex(state["key"])), state["start"], state["length"])
    echo.sent, echo.got = state["sent"], state["got"]
    sock.settimeout(20)
    try:
        while echo.sent < echo.total:
            out = echo.next_out(65536)
            sock.sendall(out)
            echo.out_done(len(out))
            while echo.got < echo.sent - (1 << 16):   # (keep the echo flowing)
                data = sock.recv(1 << 16)
                if not data:
                    raise DataError("end of file in the middle of the echo")
                echo.echoed(data)
        sock.shutdown(socket.SHUT_WR)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            echo.echoed(data)
        if echo.got != echo.total:
            raise DataError(f"echo ended at {echo.got} of {echo.total} bytes")
    except TimeoutError:
        raise HangError("the handed-over stream stalled") from None
    finally:
        sock.close()


def handoff_child(args: dict) -> None:
    """Role: take the connection (an fd number we inherited, or one that
    comes over a Unix socket) and finish its stream."""
    state = args["state"]
    if args["how"] == "send_fds":
        unix = socket.socket(fileno=args["unix"])
        msg, fds, _flags, _addr = socket.recv_fds(unix, 1024, 1)
        unix.close()
        fd = fds[0]
    else:
        fd = args["fd"]
    _finish_stream(socket.socket(fileno=fd), state)


def _mp_child(sock, state: dict) -> None:          # (a multiprocessing spawn target)
    try:
        _finish_stream(sock, state)
    except DataError:
        sys.exit(EXIT_DATA)


def handoff(args: dict) -> None:
    """Role: connect to the echo server at ``addr``, go part of the way,
    hand the socket to a child process, which finishes; repeat."""
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()   # (its pipe is kept for good: before the baseline)
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "handoff")
    stats: Counter = Counter()
    key = key_of(args)
    pattern = Pattern(key)
    ch.report("ready")
    for _ in range(args.get("rounds", 3)):
        how = args.get("how") or rng.choice(["send_fds", "pass_fds", "spawn"])
        length = rng.choice([0, 100, 70000, 600000])
        echo = Echo(pattern, rng.randrange(1 << 30), length)
        sock = socket.create_connection(addr_of(args), timeout=20)
        from shrimpio import info
        stats["path:" + info(sock)["path"]] += 1
        k = rng.randint(0, echo.total)                     # sent by us
        while echo.sent < k:
            out = echo.next_out(min(65536, k - echo.sent))
            sock.sendall(out)
            echo.out_done(len(out))
            # Keep the echo flowing, as _finish_stream does: a stream that
            # sends more than both directions buffer without reading
            # deadlocks (kernel TCP on loopback buffers about 4 MB one way,
            # a ring 4 MiB: docs/sockets.md, "Buffering").
            while echo.got < echo.sent - (1 << 17):
                data = sock.recv(1 << 16)
                if not data:
                    raise DataError("end of file before the handoff")
                echo.echoed(data)
        j = rng.randint(echo.got, k)                       # echo read by us
        while echo.got < j:
            data = sock.recv(j - echo.got)
            if not data:
                raise DataError("end of file before the handoff")
            echo.echoed(data)
        state = {"key": key.hex(), "start": echo.start, "length": echo.length,
                 "sent": echo.sent, "got": echo.got}
        code = _hand_over(sock, how, state, args)
        if code != 0:
            raise (DataError if code == EXIT_DATA else HangError)(
                f"the child that took the connection ({how}) exited with {code}")
        stats["handed:" + how] += 1
        stats["reason:" + info(sock)["reason"]] += 1 if sock.fileno() >= 0 else 0
        sock.close()
    ch.report("finished", stats=dict(stats))
    ch.wait("finish")
    from .streams import _quiesce
    _quiesce(ch, stats)


def _hand_over(sock, how: str, state: dict, args: dict) -> int:
    cmd = [sys.executable, "-m", "shrimpio._chaos.proc", "handoff_child"]
    child_args = {"how": how, "state": state, "seed": args["seed"]}
    if how == "spawn":
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=_mp_child, args=(sock, state))
        p.start()
        p.join(60)
        if p.exitcode is None:
            p.kill()
            p.join()
            return -9
        return p.exitcode
    if how == "pass_fds":
        child_args["fd"] = sock.fileno()
        p = subprocess.Popen(cmd + [json.dumps(child_args)], pass_fds=[sock.fileno()],
                             stdin=subprocess.DEVNULL)
    else:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_args["unix"] = theirs.fileno()
        p = subprocess.Popen(cmd + [json.dumps(child_args)], pass_fds=[theirs.fileno()],
                             stdin=subprocess.DEVNULL)
        theirs.close()
        socket.send_fds(mine, [b"x"], [sock.fileno()])
        mine.close()
    try:
        return p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return -9


# -- fd exhaustion --------------------------------------------------------------------

def _lower_limit(rng: random.Random, headroom: "list[int]") -> int:
    """RLIMIT_NOFILE: what the process holds (less the listing's own fd)
    plus a random headroom."""
    have = len(os.listdir("/proc/self/fd")) - 1
    soft = have + rng.randint(*headroom)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def exhaust(args: dict) -> None:
    """Role: a client with few fds to spare opens up to ``conns``
    connections to ``addr`` at once, then runs an echo stream on each."""
    ch = Channel()
    ch.checkpoint("base")
    rng = make_rng(args, "exhaust")
    stats: Counter = Counter()
    pattern = Pattern(key_of(args))
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    ch.report("ready", limit=_lower_limit(rng, args.get("headroom", [MIN_CLIENT_HEADROOM, 40])))
    socks = []
    try:
        for _ in range(args.get("conns", 100)):
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno not in FD_ERRORS:
                    raise
                stats["socket:EMFILE"] += 1          # as TCP: no fd, no socket
                break
            try:
                s.settimeout(20)
                s.connect(addr_of(args))
            except BaseException:
                s.close()
                raise                                 # TCP's connect needs no fd: none allowed
            from shrimpio import info
            i = info(s)
            stats["path:" + i["path"] + (":" + i["reason"] if i["reason"] else "")] += 1
            socks.append(s)
        for s in socks:
            echo = Echo(pattern, rng.randrange(1 << 30), rng.choice([0, 10, 5000, 100000]))
            while echo.sent < echo.total:
                out = echo.next_out(min(CHUNK, 65536))
                s.sendall(out)
                echo.out_done(len(out))
                while echo.got < echo.sent:
                    data = s.recv(echo.sent - echo.got)
                    if not data:
                        raise DataError("end of file in an echo")
                    echo.echoed(data)
            s.shutdown(socket.SHUT_WR)
            if s.recv(10):
                raise DataError("bytes after the echo")
            stats["complete"] += 1
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    ch.report("finished", stats=dict(stats))
    ch.wait("finish")
    from .streams import _quiesce
    _quiesce(ch, stats)


def exhaust_server(args: dict) -> None:
    """Role: a stream server (``api``) with few fds to spare."""
    from . import streams
    rng = make_rng(args, "exhaust-server")
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    # At least MIN_SERVER_HEADROOM fds: see there.
    args = dict(args, lower_limit=lambda: _lower_limit(rng, args.get(
                    "headroom", [MIN_SERVER_HEADROOM, 40])),
                restore_limit=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, saved))
    streams.server(args)


ROLES = {"handoff": handoff, "handoff_child": handoff_child, "exhaust": exhaust,
         "exhaust_server": exhaust_server}
