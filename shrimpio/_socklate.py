"""The client's half of the late fallback: a shared-memory connect that the
listener, short of fds, sent to kernel TCP after the client's ``connect()``
had returned.

Theory of operation
-------------------
(docs/control-plane.md, "Connection set-up", has the whole picture; the
listener's half is :func:`shrimpio._accept.refuse`.)

A client's ``connect()`` returns once its hello is queued; the listener
takes it later.  One that has no room for the hello's fds answers with a
refusal and closes the client's control socket, without ever reading the
rings.  The client finds out when it finds its peer gone (a read that
would return end of file or raise, a write that fails); the socket's data
calls then ask :func:`late_fallback`, which

* takes the refusal (:meth:`Connection.refused`: none, and the peer's
  death is what the call reports, as before);
* reads back what the program wrote into the ring (the listener never read
  a byte of it) and whether it shut its writing side;
* closes the connection, makes a kernel TCP socket bound to the local
  address the program was told (so that ``getsockname()`` stays true and the
  listener knows the client again, to report the same reason), connects it
  to the listener's TCP address, and sends those bytes first;
* puts it on the program's fd number (``dup2``; a patched epoll is told), so
  the socket object is a kernel TCP socket from then on, with the
  refusal's reason (``"fd limit"``) in ``shrimpio.info`` and the report.

The call that found the refusal is then made again on the kernel socket.
Nothing the program wrote is lost, nor read twice: the kernel connection
starts with exactly those bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select as _select
import socket as _std
import _socket as _csocket
import struct
import sys
import threading
import time
import warnings
from typing import Any

from . import _route, _stat
from ._connection import HOT, SMALL_RING, Connection, SpaceFd
from ._fastpath import Ring
from ._handshake import late_hellos
from ._sockindex import by_fd, fd_change_hooks, fd_changing

__all__ = ["BorrowedBell", "late_fallback", "linger", "replay", "settled", "LATE_ERRNOS", "LINGER"]

#: What a failed call on a refused connection raises (the peer looks gone).
LATE_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
#: Longest the TCP connect and the sending of what was written may take
#: when the socket itself has no timeout (loopback, to a live listener:
#: at once, unless its backlog is full or it does not read).
REPLAY_TIMEOUT = 10.0

_SOCK_STREAM = int(_std.SOCK_STREAM)
_SOL_SOCKET, _SO_REUSEADDR = int(_std.SOL_SOCKET), int(_std.SO_REUSEADDR)


def late_fallback(sock: Any, conn: Connection, reason: "str | None" = None) -> bool:
    """If the listener refused ``conn`` (``sock``'s connection), move
    ``sock`` onto a kernel TCP connection to it: True, and the caller makes
    its call again.  False: no refusal (the peer is really gone).  If the
    TCP connection cannot be made, or what was written cannot be sent on
    it, ``ConnectionResetError`` saying so (never a silent end of file).
    ``reason``: the refusal's, if the caller took it already."""
    if sock._shm is not conn:
        return False
    if reason is None:
        reason = conn.refused()
    if reason is None:
        return False
    fd = sock.fileno()
    if fd_change_hooks:
        # A patched epoll lets go of the connection while it is still one
        # (it finds the fd's new file at its next poll).
        fd_changing(fd)
    timeout = sock.gettimeout()
    pending, shut = conn.unsent()
    local, peer = conn.local, conn.peer
    sent, received = conn.bytes_sent, conn.bytes_received
    # Every socket object of this process on the connection (dup(),
    # socket.fromfd) moves with it, as dup()s of a kernel socket share its
    # connection: whatever one of them writes next goes by TCP too.
    movers = [sock] + [s for s in list(by_fd.values())
                       if s is not sock and s._shm is conn and s.fileno() >= 0]
    timeouts = [s.gettimeout() for s in movers]
    # The connection goes first: its space socket's fd is then free for the
    # TCP socket (the process may be short of fds too).
    for s in movers:
        if fd_change_hooks and s is not sock:
            fd_changing(s.fileno())
        s._shm = None
        conn.release()
    route = _route.Route(_route.TCP, reason)
    for s in movers:
        s._route = route
        s._local, s._peer = local, peer
    try:
        # A non-blocking socket's replay never waits: what does not fit the
        # kernel's buffers at once goes from a thread (_flush_later).
        tcp, rest = replay(sock.family, sock.proto, local, peer, pending, shut,
                           timeout if timeout else REPLAY_TIMEOUT, at_once=timeout == 0)
    except OSError as exc:
        raise ConnectionResetError(
            errno.ECONNRESET, f"the listener sent this connection to TCP ({reason}) and it could "
            f"not go on there: {exc} ({len(pending)} bytes written before were not delivered)") from exc
    fds = [s.fileno() for s in movers]
    try:
        if rest:
            _flush_later(tcp, rest, shut, fds, reason)
        else:
            for sfd in fds:
                os.dup2(tcp.fileno(), sfd, inheritable=False)
    finally:
        tcp.close()
    for s, sfd, t in zip(movers, fds, timeouts):
        if by_fd.get(sfd) is s:
            del by_fd[sfd]
        s.settimeout(t)               # (O_NONBLOCK is the old file's)
    sock._sent, sock._received = sent, received
    _stat.track_tcp(sock, reason)
    return True


def replay(family: int, proto: int, local: Any, peer: Any, pending: bytes, shut: bool,
           timeout: float, at_once: bool = False) -> "tuple[_csocket.socket, memoryview]":
    """A kernel TCP socket bound to ``local`` (the address the program and
    the listener know; any, if it is taken meanwhile or already in a
    connection to ``peer``), connected to
    ``peer``, with ``pending`` sent first (and its writing side shut if
    ``shut``), each step within ``timeout`` seconds; and what is left of
    ``pending`` (empty unless ``at_once``: then what did not fit the
    kernel's buffers at once, the shutdown not made).  OSError (nothing
    left open) if any step fails."""
    tcp = _csocket.socket(family, _SOCK_STREAM, proto)
    rest = memoryview(pending)
    try:
        try:
            tcp.setsockopt(_SOL_SOCKET, _SO_REUSEADDR, 1)
            tcp.bind(local)
        except OSError:
            pass
        tcp.settimeout(timeout)
        try:
            tcp.connect(peer)
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
                raise
            # That port is in a connection to this peer already: the port
            # of a shared-memory connection is not held while it lasts, so
            # another one, of this process or another, may have been given
            # it too and gone to TCP first.  From a port of the kernel's
            # choice (the listener then reports no reason for it).
            tcp.close()
            tcp = _csocket.socket(family, _SOCK_STREAM, proto)
            tcp.settimeout(timeout)
            tcp.connect(peer)
        if at_once:
            tcp.setblocking(False)
            try:
                while rest:
                    rest = rest[tcp.send(rest):]
            except BlockingIOError:
                return tcp, rest
        elif rest:
            tcp.sendall(rest)
            rest = rest[len(rest):]
        if shut:
            tcp.shutdown(_std.SHUT_WR)
    except BaseException:
        tcp.close()
        raise
    return tcp, rest


# -- a non-blocking replay larger than the kernel's buffers -----------------------
#
# A kernel connection takes some MB before its server reads (loopback: the
# sender's buffer grows to tcp_wmem's top, ~4 MB), a ring up to 64 MiB.  A
# non-blocking program must not wait for its server to read the rest (it
# may be the program itself, in the same event loop), nor go on writing on
# the kernel connection before the rest is there.  Its fds get a stand-in
# until then: one end of a Unix socket pair with its send buffer filled and
# nothing to read, which a poller never reports ready and on which every
# call says EAGAIN, as a kernel socket whose buffers are full.  A thread
# sends the rest (within REPLAY_TIMEOUT), then puts the TCP socket on the
# fds and pokes the stand-in so that a poller asleep on it wakes and looks
# again.  If the rest cannot be sent, the TCP connection is reset (the
# server reads ECONNRESET, never a stream cut short) and so is the stand-in
# (its peer closes with bytes unread): the program's next call raises
# ECONNRESET.

_SO_LINGER = int(_std.SO_LINGER)


def _flush_later(tcp: _csocket.socket, rest: memoryview, shut: bool, fds: list, reason: str) -> None:
    stand_in, peer_end = _csocket.socketpair(_std.AF_UNIX, _SOCK_STREAM)
    try:
        stand_in.setblocking(False)
        try:
            while True:
                stand_in.send(bytes(65536))
        except BlockingIOError:
            pass
        ino = os.fstat(stand_in.fileno()).st_ino
        for sfd in fds:
            os.dup2(stand_in.fileno(), sfd, inheritable=False)
        keep = os.dup(tcp.fileno())
    except BaseException:
        peer_end.close()
        raise
    finally:
        stand_in.close()
    rest = bytes(rest)
    thread = threading.Thread(target=_flush, args=(keep, rest, shut, fds, ino, peer_end, reason),
                              name="shrimpio-replay", daemon=False)
    thread.start()


def _flush(keep: int, rest: bytes, shut: bool, fds: list, ino: int, peer_end: _csocket.socket,
           reason: str) -> None:
    tcp = _csocket.socket(fileno=keep)
    try:
        try:
            tcp.settimeout(REPLAY_TIMEOUT)
            tcp.sendall(rest)
            if shut:
                tcp.shutdown(_std.SHUT_WR)
            tcp.setblocking(False)
            ok = True
        except OSError as exc:
            ok = False
            warnings.warn(f"shrimpio: the listener sent a connection to TCP ({reason}); "
                          f"{len(rest)} bytes written before could not be sent there: {exc} "
                          "(the connection is reset)", RuntimeWarning)
            tcp.setsockopt(_SOL_SOCKET, _SO_LINGER, struct.pack("ii", 1, 0))
        for sfd in fds:
            try:
                if ok and os.fstat(sfd).st_ino == ino:    # (still the stand-in: not closed)
                    if fd_change_hooks:
                        fd_changing(sfd)
                    os.dup2(tcp.fileno(), sfd, inheritable=False)
            except OSError:
                pass
        if ok:
            try:
                peer_end.send(b"\0")  # wakes a poller asleep on the stand-in
            except OSError:
                pass
    finally:
        tcp.close()
        peer_end.close()               # (with bytes unread: a stand-in left says ECONNRESET)


async def settled(sock: Any) -> bool:
    """Before the shrimpio loop's own transport takes over ``sock``, a
    client connected over shared memory by its own ``connect()`` (whose
    hello told the listener it can follow a refusal: the transport reads
    the rings itself, and could not): wait, without holding up the loop
    (the listener may be in it), until the listener has taken the hello
    or refused it.  True: ``sock`` stays on shared memory (also once
    LINGER seconds have passed: the listener is not accepting, and
    refuses only with a free fd to take the client with); False: it was
    refused and is a kernel TCP socket now, with what it had written sent
    first (:func:`late_fallback`, run in the loop's executor: it may wait
    for the listener to read)."""
    conn = sock._shm
    if conn is None or conn.closed or conn not in late_hellos:
        return conn is not None
    import asyncio
    nap, deadline = 0.0005, time.monotonic() + LINGER
    while True:
        try:
            undecided = _may_be_refused(conn)
        except (OSError, ValueError):
            undecided = False
        if not undecided:
            break
        if time.monotonic() > deadline:
            return True
        await asyncio.sleep(nap)        # (the listener's taking the hello wakes nobody)
        nap = min(nap * 2, 0.05)
        if sock._shm is not conn or conn.closed:
            return sock._shm is not None
    reason = conn.refused()
    if reason is None:
        late_hellos.discard(conn)      # taken: asked no more
        return True
    moved = await asyncio.get_running_loop().run_in_executor(None, late_fallback, sock, conn, reason)
    return not moved and sock._shm is not None


# -- a client that closes before the listener took its hello ----------------------
#
# Its close() returns at once, as TCP's does.  Over TCP the bytes written
# before it are in the server's kernel by then, and a server that accepts
# later still reads them, then end of file.  Here they are in the ring,
# which the listener maps when it takes the hello; the client's close
# writes its end of file there too.  A listener with room for the hello's
# fds therefore reads them as from any closed peer (and a listener two fds
# short takes the segment alone when the client has gone: see
# _accept.accept_hello).  Only a refusal (the listener one fd short: it takes
# none of the hello's fds, and sends the client to TCP) needs the client
# itself, to send its bytes by TCP: so a client that closes with bytes
# written while its hello may still be unread (messages of ours queued on
# its control socket, SIOCOUTQ, and none of its bytes read: see
# _may_be_refused) keeps the connection open in the background -- lingers,
# as a TCP close still delivers -- until the listener takes the hello
# (nothing more to do), closes the control socket (with a
# refusal: the bytes and the end of file go by TCP, from the same local
# address; without: it dropped the client) or LINGER seconds pass (the
# hello stays queued, with the segment's fd: a listener that takes it
# later still reads it).  One thread serves every lingering connection of
# the process.  A program that exits does not wait for the listener (it
# would not over TCP): once the main thread has ended, the thread hangs
# up each lingering connection not refused yet (the listener then cannot
# refuse it, and takes its segment alone, borrowing an fd above its soft
# limit if it must: _fastpath.stream_accept) and follows a refusal that
# came before; it is not a daemon, so that such a replay finishes.  The lingering
# connection costs no fd more than it had: its control socket moves onto
# its space doorbell's fd number (a closed client needs no space doorbell)
# and the program's fd is closed as usual.

#: Longest a closed client waits for the listener to take or refuse its hello.
LINGER = REPLAY_TIMEOUT
_SIOCOUTQ = 0x5411                  # (= TIOCOUTQ: bytes sent and not yet read)
_POLL_IN, _POLL_HUP = int(_select.POLLIN), int(_select.POLLHUP)

_lingering: list = []               # [conn, family, proto, deadline, refusal's reason]
_linger_lock = threading.Lock()
_linger_thread: "threading.Thread | None" = None


class BorrowedBell(SpaceFd):
    """A connection's space "socket" that is an fd it does not own through
    it: a lingering client's doorbell (its control socket, moved onto the
    space doorbell's fd number, see above), or the control socket of a
    client that had closed when its hello was taken (_accept.accept_hello,
    which then has no space doorbell: its peer is gone, so a wait on it
    ends at once, as the wait for room in a closed peer's ring must).  The
    fd is closed by whoever owns it, never here (nor when collected)."""

    __slots__ = ()

    def close(self) -> None:
        pass


def unread(fd: int) -> int:
    """Bytes sent on the Unix socket ``fd`` that its peer has not read."""
    return int.from_bytes(fcntl.ioctl(fd, _SIOCOUTQ, bytes(4)), sys.byteorder, signed=True)


def _may_be_refused(conn: Connection) -> bool:
    """Can the listener still refuse ``conn`` (a client's)?  Not once it
    has read anything we sent on the control socket (the hello comes
    first), nor once it has read a byte of the ring or written one into
    ours (it took the hello).  (Our first write rings the doorbell before
    the listener is there, so messages still queued do not say that the
    hello is.)"""
    if conn.bytes_received or unread(conn.bell_fd) <= 0:
        return False
    ring = Ring(conn.segment, 0, conn.tx.capacity, small=SMALL_RING, big_offset=HOT)
    try:
        return ring.readable() >= conn.bytes_sent
    finally:
        ring.close()


def linger(sock: Any, conn: Connection, fd: int) -> bool:
    """At the close of ``sock`` (fd ``fd``), the last socket object of the
    client connection ``conn``: keep the connection in the background if
    the listener may still refuse it with bytes of ours in the ring (see
    above): True, and the caller leaves ``conn`` alone.  False: close it
    as usual."""
    if (conn not in late_hellos or conn.closed or conn.refs != 1 or not conn.bytes_sent
            or conn.shared_with_child):
        return False                    # (only a "late" hello may be refused)
    if not conn.bell_owned and conn.bell_fd != fd:
        return False
    try:
        if not _may_be_refused(conn):
            return False                # the listener took the hello: as any close
    except (OSError, ValueError):
        return False
    for action in (conn.tx.shutdown_write, conn.rx.close_read):
        try:
            action()                    # (a listener that takes it reads our end of file)
        except (OSError, ValueError):
            pass
    if not conn.bell_owned:
        try:
            space = conn.space.detach()     # (a bare socket object: see _handshake)
            os.dup2(fd, space, inheritable=False)
        except (OSError, AttributeError):
            return False
        conn.space = BorrowedBell(space)
        reason = conn.refused()         # kept under the program's fd number, if a drain took it
        conn.set_bell(space, owned=True)
    else:
        reason = None
    global _linger_thread
    with _linger_lock:
        _lingering.append([conn, sock.family, sock.proto, time.monotonic() + LINGER, reason])
        start = _linger_thread is None
        if start:
            _linger_thread = threading.Thread(target=_linger_loop, name="shrimpio-linger", daemon=False)
    if start:
        try:
            _linger_thread.start()
        except RuntimeError:
            # No new thread (the interpreter is exiting: a close from an
            # exit handler or a finalizer): this close lingers itself, as
            # a close with SO_LINGER would.
            _linger_loop()
    return True


def _linger_loop() -> None:
    global _linger_thread
    nap = 0.001
    while True:
        with _linger_lock:
            items = list(_lingering)
            if not items:
                _linger_thread = None
                return
        now = time.monotonic()
        for item in items:
            try:
                done = _linger_done(item, now)
            except Exception as exc:      # (closed by then: the thread goes on)
                warnings.warn(f"shrimpio: a closed connection's linger failed: {exc!r}", RuntimeWarning)
                done = True
            if done:
                with _linger_lock:
                    _lingering.remove(item)
        poller = _select.poll()
        for item in items:
            if not item[0].closed:
                poller.register(item[0].bell_fd, _POLL_IN)
        poller.poll(nap * 1000)
        nap = min(nap * 2, 0.05)        # (the listener's taking the hello wakes nobody)


def _linger_done(item: list, now: float) -> bool:
    """One look at a lingering connection: True once it is closed."""
    conn, family, proto, deadline, reason = item
    try:
        if reason is None:
            p = _select.poll()
            p.register(conn.bell_fd, _POLL_IN)
            gone = any(ev & _POLL_HUP for _, ev in p.poll(0))
            if not gone and not threading.main_thread().is_alive():
                # The program is exiting, and does not wait for the
                # listener (a TCP close does not): we hang up, so that
                # it no longer refuses us, and takes our segment alone
                # (see _accept.refuse); a refusal sent before is read
                # below and followed.
                _hang_up(conn.bell_fd)
                gone = True
            if not gone and now < deadline and _may_be_refused(conn):
                return False            # not taken yet
            # (A refusal comes before the hang-up, and before the queue
            # empties as the listener closes: asked after them.)
            reason = conn.refused()
        if reason is None:
            conn.close()                # taken, dropped, or out of time
            return True
        pending, shut = conn.unsent()
        local, peer = conn.local, conn.peer
        conn.close()
        try:
            replay(family, proto, local, peer, pending, shut, LINGER)[0].close()
        except OSError as exc:
            warnings.warn(f"shrimpio: {len(pending)} bytes written to {peer} before close() "
                          f"could not be sent by TCP after the listener refused them ({reason}): "
                          f"{exc}", RuntimeWarning)
        return True
    except Exception:
        if not conn.closed:
            conn.close()
        raise


def _hang_up(fd: int) -> None:
    """Shut both directions of the control socket ``fd`` (its queued
    messages stay readable)."""
    s = _csocket.socket(_std.AF_UNIX, _std.SOCK_SEQPACKET, 0, fd)
    try:
        s.shutdown(_std.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()


def _forget_lingering() -> None:
    """In a forked child: the parent's lingering connections are its own
    (their thread is not here); our copies of their fds go."""
    global _linger_thread
    _linger_thread = None
    while _lingering:
        conn = _lingering.pop()[0]
        try:
            conn.close()                # (shared with the parent: no flag written)
        except Exception:
            pass


os.register_at_fork(after_in_child=_forget_lingering)
