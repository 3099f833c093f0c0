"""The listener's side of a shared-memory stream connection: its registry
entry (one per member of a group sharing an address), and accept.

Theory of operation
-------------------
(docs/control-plane.md has the whole picture and the measurements.)

A listening shrimpio socket holds a registry entry (:func:`register_listener`).
Its :func:`accept_shm` makes one call into C per client,
:func:`~shrimpio._fastpath.stream_accept` (accept4, ``SO_PEERCRED``, a
busy-poll for the hello, recvmsg with fds, the space fd's type), then checks the hello in :func:`accept_hello` exactly as it would
any peer's: everything in it is untrusted, and anything wrong refuses the
client (its control socket is closed: it reads EOF) and takes the next.
A client whose hello is not there after the busy-poll is not waited for
(a silent one would hold up every other client, and in asyncio the whole
loop): it waits on the :class:`Listener`, whose fds to watch then include
its control socket, until its hello comes or HELLO_WAIT runs out.

A listener one or two fds short of its limit has no room for a hello's
fds: it sends that client to TCP (:func:`refuse`, the late fallback) and
knows it again when it comes (:func:`late_reason`).

The pollers ask :meth:`Listener.acceptable`, which takes clients as
``accept()`` would (:func:`next_client`) and keeps those that passed for
it: a listener is reported readable only when ``accept()`` will return a
client, never for one whose hello has not come (or will be refused).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import socket as _std
import _socket as _csocket
import struct
import threading
import time
from typing import Any, Optional

from . import _connection, _control, _process, _stat
from ._connection import Connection, ring_capacity
from ._socklate import BorrowedBell
from ._fastpath import (Segment, adapt_spin, get_busy_poll_us, spin_readable, stream_accept,
                        stream_hello)
from ._handshake import (HELLO_KIND, HELLO_RE, PROTOCOL_VERSION, _AF_UNIX, _SOCK_SEQPACKET, _STREAM,
                         _family, addr_tuple, json_str, registry)

#: The stdlib's class, whatever ``shrimpio.patch`` puts in ``socket.socket``
#: later (its ``__init__`` would be shrimpio's own, which looks the fd up).
_StdSocket = _std.socket

__all__ = ["ACCEPT_SPIN", "FD_LIMIT", "HELLO_WAIT", "Listener", "MAX_WAITING", "accept_hello", "accept_shm",
           "late_reason", "next_client", "refuse", "register_listener"]


# -- listeners sharing an address ---------------------------------------------------
#
# Listeners that share an address through SO_REUSEPORT (worker processes of
# one server) each get a registry entry: the first the address's own name,
# the others that name + "+2", "+3"...  A client spreads its connects over
# the group's live entries in turn (the kernel spreads TCP ones by a hash of
# the addresses; see _handshake._Destination).

#: Listeners of one address that may take shared-memory clients.
MAX_MEMBERS = 64


def register_listener(sock: Any, name: str, backlog: int) -> tuple[str, _std.socket]:
    """The registry entry for a listening ``sock``: ``(its name, the
    listening Unix socket)``.  An address whose entry is live already gets
    a member entry (the kernel let ``sock`` listen there, so it shares the
    address on purpose); with MAX_MEMBERS taken, ``FileExistsError``."""
    reg = registry()
    try:
        return name, reg.listen(name, backlog)
    except FileExistsError:
        # Another live listener of this user has the address.  The kernel
        # let our TCP socket listen there too, so the two share it on
        # purpose: SO_REUSEPORT, or one listening socket used by several
        # processes (a pre-fork server's workers each calling listen()).
        pass
    for k in range(2, MAX_MEMBERS + 1):
        member = f"{name}{_control.MEMBER_SEP}{k}"
        try:
            return member, reg.listen(member, backlog)
        except FileExistsError:
            continue
    raise FileExistsError(f"{MAX_MEMBERS} listeners share the address already")


# -- accept ----------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _layout_ok(c2s: int, s2c: int, size: int) -> bool:
    """Are these a valid pair of ring capacities and the segment size that
    holds them?  (Cached: clients use a few sizes; the arguments are exact
    ints, checked by the caller.)"""
    return (ring_capacity(c2s) == c2s and ring_capacity(s2c) == s2c
            and size == Connection.layout(c2s, s2c)[1])


#: accept()'s busy-poll budget in units of the rings' (SHRIMPIO_BUSY_POLL_US).
#: The wait it covers is a client's whole turn (its close, then its next
#: connect's set-up), several data hand-offs long.
ACCEPT_SPIN = 4
#: Longest a client that connected may take to send its hello.
HELLO_WAIT = 5.0
#: Connected clients whose hello has not come yet, at most per listener
#: (past it the oldest is dropped: a flood of silent clients costs fds only
#: up to here).
MAX_WAITING = 64


def accept_spin_top() -> float:
    """Most seconds accept() busy-polls before it sleeps (0 when
    ``SHRIMPIO_BUSY_POLL_US=0`` turns every busy-poll off)."""
    return get_busy_poll_us() * ACCEPT_SPIN / 1e6


_FLOCK = struct.Struct("hhqqi4x")     # struct flock: l_type, l_whence, l_start, l_len, l_pid
#: How long a listener trusts what it learnt of other holders (seconds).
HOLDERS_TTL = 0.25


class _Holders:
    """Which processes may accept on a listener's registry entry, as far
    as its busy-poll needs to know.  A listener shared through a fork
    (a pre-fork server's workers) must not busy-poll: the processes share
    one queue of clients, and a spinning one would take them all.  But a
    fork does not mean that two processes accept: a server forked by the
    process that made its listener, which then closes its copy, accepts
    alone.  Each process that accepts holds a POSIX read lock on a memfd
    made with the listener (such locks belong to a process, are not
    inherited by fork, and go when it closes the memfd or dies);
    ``F_GETLK`` then says whether another process holds one too."""

    __slots__ = ("fd", "locked_by", "known", "others")

    def __init__(self) -> None:
        self.fd = os.memfd_create("shrimpio-listener", os.MFD_CLOEXEC)
        self.locked_by = 0          # the pid that took its lock
        self.known = -1.0           # when `others` was last asked
        self.others = True

    def alone(self) -> bool:
        """Does no other live process accept on this listener?"""
        now = time.monotonic()
        if self.locked_by == _process.pid and now - self.known < HOLDERS_TTL:
            return not self.others
        try:
            if self.locked_by != _process.pid:
                fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 0)
                self.locked_by = _process.pid
            got = fcntl.fcntl(self.fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
            self.others = _FLOCK.unpack(got)[0] != fcntl.F_UNLCK
        except OSError:
            self.others = True      # (cannot tell: as shared)
        self.known = now
        return not self.others

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)            # (our lock goes with it)


class Listener:
    """The registry half of a listening shrimpio socket.

    ``spin`` is the adaptive busy-poll budget of ``accept()`` (seconds), by
    the rules of the rings' (``_adapt_spin`` in ``_fastpath.pyx``): a spin
    that caught a client keeps it, a sleep that a longer spin would have
    avoided grows it, a longer sleep halves it (down to 1/16 of the budget),
    so an idle server spins little."""

    def __init__(self, name: str, usock: _std.socket) -> None:
        self.name = name
        self.usock = usock
        self.forks = _connection.forks
        self.spin = accept_spin_top()
        # Clients that connected but whose hello has not come yet (a client
        # sends it right after its connect, but may be descheduled, slow, or
        # hostile): control fd -> deadline.  accept() never waits for one
        # of them; they are watched beside the entry.
        self.waiting: dict[int, float] = {}
        # Clients a poller took with their hello (see acceptable()), as
        # stream_accept returns them, with the pid that took them (a forked
        # child must not serve a client its parent holds too).
        self.ready: list[tuple[int, tuple]] = []
        self.stat = _stat.track_listener(name, usock.fileno())
        try:
            self.holders: "_Holders | None" = _Holders()
        except OSError:             # (no memfd, or no fd left: as shared)
            self.holders = None

    def watch_fds(self) -> list[int]:
        """The fds whose readability may mean a client to accept: the
        registry entry and each client waiting for its hello."""
        return [self.usock.fileno(), *self.waiting]

    def next_deadline(self) -> Optional[float]:
        """When the first waiting client runs out of time (monotonic), if any."""
        return min(self.waiting.values(), default=None)

    def park(self, ctl: int) -> None:
        """Keep a client whose hello has not come yet."""
        if len(self.waiting) >= MAX_WAITING:
            try:
                oldest = next(iter(self.waiting))
            except (StopIteration, RuntimeError):   # emptied (or changed) by another thread
                oldest = None
            # Popped first: whoever pops an entry owns its fds.
            if oldest is not None and self.waiting.pop(oldest, None) is not None:
                os.close(oldest)              # it reads EOF
        self.waiting[ctl] = time.monotonic() + HELLO_WAIT

    def take_hello(self) -> "tuple | None":
        """A waiting client whose hello has come, as ``stream_accept``
        returns it; clients gone or out of time are dropped (they read EOF)."""
        now = time.monotonic()
        for ctl in list(self.waiting):
            deadline = self.waiting.pop(ctl, None)
            if deadline is None:
                continue                # taken by another thread
            try:
                got = stream_hello(ctl, _control.MAX_MESSAGE + 1, _control.MAX_FDS)
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    os.close(ctl)
                    raise
                # No room for its fds: by TCP if it can follow (see refuse).
                refused = refuse(ctl, FD_LIMIT)
                if refused:
                    continue
                self.waiting[ctl] = deadline
                if refused is None:
                    raise           # it waits (accept() says EMFILE, as TCP's would)
                continue            # (once its hello is there)
            except BaseException:
                os.close(ctl)
                raise
            if got is not None:
                return (ctl,) + got
            if deadline > now:
                self.waiting[ctl] = deadline
            else:
                os.close(ctl)           # out of time: it reads EOF
        return None

    def share_with_others(self) -> None:
        """Other processes may accept on the entry from now on (its fd went
        to them): shared for good, whoever holds what."""
        self.forks = -1
        if self.holders is not None:
            self.holders.close()
            self.holders = None

    @property
    def shared(self) -> bool:
        """Is the entry's queue shared with other processes (a fork, or the
        listener given to another process)?"""
        return _connection.forks != self.forks

    def acceptable(self) -> bool:
        """Can accept() return a shared-memory client now, without waiting?
        For the pollers: a client is there once its hello is and passed the
        checks, not when it connected to the entry (its hello may come
        later, or never, or be refused), so clients are taken here as
        accept() would take them, and kept in ``ready`` for it (or parked
        while their hello has not come).  No wait."""
        if self.ready:
            return True
        # A client's hello follows its connect by a few system calls: spin
        # for it as accept() does (parked, it would cost a kernel wait and a
        # wake-up more).
        got = next_client(self, get_busy_poll_us() / 1e6)
        if got is None:
            return False
        self.ready.append((_process.pid, got))
        return True

    def take_ready(self) -> "tuple | None":
        """A client acceptable() took, if any (one taken by another process
        before a fork is that process's: our copies are closed)."""
        pid = _process.pid
        while self.ready:
            try:
                owner, got = self.ready.pop(0)
            except IndexError:
                return None                 # taken by another thread
            if owner == pid:
                return got
            _drop_ready(got)
        return None

    def spin_budget(self) -> float:
        if self.shared and (self.holders is None or not self.holders.alone()):
            # Processes sharing one queue of clients each sleep until one
            # comes and the kernel wakes them: whichever is free takes it,
            # so the load spreads over them as over a shared TCP listener's
            # (a spinning one would take every client it can keep up with).
            # One that accepts alone (see _Holders) spins as if unshared.
            return 0.0
        if threading.active_count() > _process.cpus():
            # More threads than CPUs to run them (a server with a thread
            # per client): a spinning accept() would hold the CPU that the
            # thread serving the last client needs, and the kernel gives it
            # back only when the spin ends.
            return 0.0
        top = accept_spin_top()
        if self.spin > top:
            self.spin = top
        return self.spin

    def adapt(self, spun: bool, waited: float) -> None:
        # The rings' rule, growing no further than the budget itself (it
        # already covers a client's whole turn: ACCEPT_SPIN).
        top = accept_spin_top()
        self.spin = adapt_spin(min(self.spin, top), top, top, spun, waited)

    def close(self) -> None:
        _stat.release(self.stat)
        self.stat = None
        if self.holders is not None:
            self.holders.close()
            self.holders = None
        while self.waiting:
            os.close(self.waiting.popitem()[0])     # they read EOF
        while self.ready:
            _drop_ready(self.ready.pop()[1])
        if self.shared:
            # Shared across a fork: as with a TCP listener, the entry must stay
            # findable while any process still holds the listener.  Let go of
            # our copy, then remove the entry only if nobody listens there
            # any more (the registry probes it).
            self.usock.close()
            try:
                registry().remove(self.name)
            except OSError:
                pass
            return
        try:
            registry().remove(self.name, self.usock)
        except OSError:
            pass
        self.usock.close()


def _drop_ready(got: tuple) -> None:
    """Let go of a client Listener.acceptable() took (its fd and our share
    of its connection)."""
    got[1].close()
    os.close(got[0])


def next_client(lst: Listener, spin: float) -> "tuple[int, Connection, tuple, tuple] | None":
    """The next shared-memory client of ``lst`` whose hello came and
    passed the checks: (its control fd, its connection, client address,
    server address), or None if none is there.  Clients that fail the
    checks are refused and skipped; a client whose hello is not there
    after ``spin`` seconds is parked (never waited for here)."""
    usock = lst.usock.fileno()
    while True:
        if lst.ready:
            ready = lst.take_ready()
            if ready is not None:
                return ready
        got = lst.take_hello() if lst.waiting else None
        if got is None:
            try:
                got = stream_accept(usock, spin, _control.MAX_MESSAGE + 1, _control.MAX_FDS)
            except OSError as exc:
                # The kernel's accept takes an fd before it looks for a
                # client: out of fds it says EMFILE when nobody is there
                # either.  Say it only for a client that waits.
                if exc.errno in (errno.EMFILE, errno.ENFILE) and not spin_readable((usock,), 0.0):
                    return None
                raise
            if got is None:
                return None
            if got[1] is None:          # no hello yet: never wait for it here
                lst.park(got[0])
                continue
            if got[1] is False:         # no room for the hello's fds: by TCP
                if not refuse(got[0], FD_LIMIT):
                    lst.park(got[0])    # (its hello to come, or it waits for room)
                continue
        fd, data, fds, msg_flags, space_ok = got
        try:
            conn, client, server = accept_hello(fd, data, msg_flags, fds, space_ok)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, Exception) and not isinstance(exc, MemoryError):
                # A prober or a broken or hostile client, whatever is wrong
                # in its hello: not a connection.  It alone is dropped.
                continue
            raise
        return fd, conn, client, server


# -- the late fallback: a client sent to TCP after its connect returned -----------
#
# A shared-memory client's connect() returns once its hello is queued, as a
# TCP connect returns once the kernel queued the connection; the listener
# takes the hello later.  A listener one or two fds short of its limit can
# take the client's control socket (one fd, as TCP's accept) but not the
# hello's two fds (the kernel would drop what it cannot install).  It then
# refuses the client: a control message {"kind": "tcp", "reason": ...} on
# the client's control socket, which it closes at once (the hello, unread,
# goes with it; its fds are released).  The client's socket layer finds the
# refusal when it next finds its peer gone (shr_refusal_note keeps it from
# the doorbell's drains), connects by kernel TCP from the same local
# address, sends what it had written into its ring, and goes on there
# (_socklate.late_fallback).  The listener accepts that TCP connection
# with the one fd it has, and knows it by its address: both report the
# refusal's reason.

FD_LIMIT = "fd limit"
#: Refused clients' addresses: port -> (host, reason, until when it may come
#: by TCP), so that the TCP connection reports why it is not shared memory.
late_clients: dict[int, tuple[str, str, float]] = {}
LATE_WAIT = 30.0
_LATE_MAX = 1024
_MSG_PEEK_NOW = int(_std.MSG_PEEK | _std.MSG_DONTWAIT)
_MSG_SEND_NOW = int(_std.MSG_DONTWAIT | _std.MSG_NOSIGNAL)
_HEADER_SIZE = len(_control.header(0))


def refusal(reason: str) -> bytes:
    """The control message that sends a client to TCP."""
    payload = b'{"kind":"tcp","reason":%s}' % json_str(reason)
    return _control.header(len(payload)) + payload


def refuse(ctl: int, reason: str) -> "bool | None":
    """Send the client of control socket ``ctl`` to TCP (see above) and
    close ``ctl``: True.  False (nothing done) if its hello is not there yet
    (the caller keeps it waiting for it: then the client is known by its
    address when it comes by TCP); None (nothing done) if its hello does
    not say it can follow a refusal (an asyncio client, whose transport
    reads the rings itself), or the client is gone (closed for good: it
    cannot follow one, and only its hello, still queued, holds its
    bytes): it waits for fds, as a TCP client in the backlog would.  The
    hello is only peeked at: no fd of it is taken (there is no room for
    them)."""
    s = _csocket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, ctl)
    try:
        data = s.recv(_control.MAX_MESSAGE + 1, _MSG_PEEK_NOW)
    except (BlockingIOError, InterruptedError):
        s.detach()
        return False
    except OSError:
        data = b""                  # gone
    m = HELLO_RE.fullmatch(data[_HEADER_SIZE:]) if data else None
    if data and (m is None or not m[8]):
        s.detach()
        return None
    if m is not None:
        port = int(m[5])
        _note_late(port, m[4].decode(), reason)     # (before it can come by TCP)
        try:
            s.send(refusal(reason), _MSG_SEND_NOW)
        except OSError:
            late_clients.pop(port, None)
            s.detach()              # gone: its hello stays for when there is room
            return None
    s.close()                       # ctl: the hello goes unread, its fds released
    return True


def _note_late(port: int, host: str, reason: str) -> None:
    now = time.monotonic()
    if len(late_clients) >= _LATE_MAX:
        stale = [p for p, v in late_clients.items() if v[2] < now] or list(late_clients)[:1]
        for p in stale:
            late_clients.pop(p, None)
    late_clients[port] = (host, reason, now + LATE_WAIT)


def late_reason(family: int, addr: Any) -> "str | None":
    """Why a client accepted by TCP came that way, if this listener sent it
    (see refuse): matched by its address, once."""
    try:
        host, port = addr[0], int(addr[1])
    except (TypeError, ValueError, IndexError):
        return None
    got = late_clients.get(port)
    if got is None or addr_tuple(family, (got[0], port))[0] != host:
        return None
    del late_clients[port]
    return got[1] if got[2] >= time.monotonic() else None


def accept_shm(sock: Any, lst: Listener, bare: bool) -> "tuple[Any, Any] | None":
    """The next shared-memory client of the listening ``sock``: (a new
    socket of ``sock``'s class, the client's address), or None if none is
    waiting (see :func:`next_client`).  ``bare``: the class is shrimpio's
    own, whose objects can be made without its constructor (a new
    connection needs no look-up by inode)."""
    got = next_client(lst, get_busy_poll_us() / 1e6)
    if got is None:
        return None
    fd, conn, client, server = got
    family = _family(sock)
    cls = type(sock)
    conn.local = addr_tuple(family, server)
    conn.peer = addr_tuple(family, client)
    try:
        if bare:
            # Made here: no timeout to apply (the fd from accept4 is
            # blocking, and a default timeout was applied by the
            # constructor).
            new = cls.__new__(cls)
            _StdSocket.__init__(new, family, _STREAM, sock.proto, fd)
            new._clear()
        else:
            new = cls(family, _STREAM, sock.proto, fileno=fd)
            if _std.getdefaulttimeout() is None:
                new.setblocking(True)
            else:
                new.settimeout(_std.getdefaulttimeout())
    except BaseException:
        conn.close()
        os.close(fd)
        raise
    new._install(conn)
    return new, conn.peer


def accept_hello(ctl: int, data: bytes, msg_flags: int, fds: list[int],
                 space_ok: "bool | None") -> tuple[Connection, tuple, tuple]:
    """Check a client's hello (as :func:`~shrimpio._fastpath.stream_accept`
    received it) and map its segment: (connection, client address, server
    address); ``ctl``, the client's control socket, is its data doorbell
    (the caller's fd: the socket object made on it owns it).  Anything
    malformed raises ``ProtocolError`` (or OSError) after closing the fds
    that came with the hello.

    Every fd is checked before use: the segment must be a sealed memfd
    (one that may be truncated under us would kill us with SIGBUS), the
    space doorbell a connected Unix seqpacket socket (``space_ok``; None:
    a client that has closed, taken with its segment alone)."""
    seg = space = None
    try:
        payload = _control.datagram_payload(data, msg_flags, fds)
        m = HELLO_RE.fullmatch(payload)
        if m is not None:              # our own clients' hello: no generic decode
            c2s, s2c, size, client_host, server = _hello_fields(m)
            client = (client_host, int(m[5]))
        else:
            c2s, s2c, size, client, server = _generic_hello(payload, fds)
        if len(fds) != (1 if space_ok is None else 2):
            raise _control.ProtocolError("stream hello must carry two fds")
        if not (type(c2s) is int and type(s2c) is int and type(size) is int
                and _layout_ok(c2s, s2c, size)):
            raise _control.ProtocolError(
                f"bad ring capacities or segment size {c2s!r}, {s2c!r}, {size!r}")
        if (len(client) < 2 or len(server) < 2 or type(client[0]) is not str
                or type(server[0]) is not str or type(client[1]) is not int
                or type(server[1]) is not int or not 0 <= client[1] <= 65535
                or not 0 <= server[1] <= 65535):
            raise _control.ProtocolError("bad addresses in stream hello")
        if space_ok is False:
            raise _control.ProtocolError("space doorbell is not a Unix seqpacket socket")
        fd0, fds[0] = fds[0], -1
        try:
            # Closes fd0 on failure; refuses any segment not sealed against
            # shrinking, whatever this process's own SHRIMPIO_SEGMENT.
            seg = Segment.from_fd(fd0, size, keep_fd=False, allow_unsealed=False,
                                  hot=_connection.HOT)
        except (ValueError, PermissionError) as exc:  # not a sealed memfd, or too small
            raise _control.ProtocolError(f"bad segment in stream hello: {exc}") from None
        if space_ok is None:
            space = BorrowedBell(ctl)     # (a closed client: see _socklate.BorrowedBell)
        else:
            fd1, fds[1] = fds[1], -1
            space = _connection.SpaceFd(fd1)
        return (Connection(seg, ctl, space, client=False, caps=(c2s, s2c), bell_owned=False),
                client, server)
    except BaseException:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if space is not None:
            space.close()
        if seg is not None:
            try:
                seg.close()
            except BufferError:         # still used by a ring: unmapped when freed
                pass
        raise


# A client's hellos differ by its port alone: what the rest of one says,
# by its text (the bytes around the port), parsed once.
_hello_texts: dict[bytes, tuple] = {}


def _hello_fields(m: "re.Match[bytes]") -> tuple:
    """(c2s, s2c, size, client host, server address) of a hello that
    matched HELLO_RE, without the client's port."""
    text = m.string
    key = text[:m.start(5)] + text[m.end(5):]
    got = _hello_texts.get(key)
    if got is None:
        got = (int(m[1]), int(m[2]), int(m[3]), m[4].decode(), (m[6].decode(), int(m[7])))
        if len(_hello_texts) >= 256:
            _hello_texts.clear()
        _hello_texts[key] = got
    return got


def _generic_hello(payload: bytes, fds: list[int]) -> tuple:
    """(c2s, s2c, size, client, server) of a hello in any JSON form; the
    caller checks the values."""
    msg = _control.decode_payload(payload, fds)
    _control.expect(msg, HELLO_KIND)  # closes (and empties) fds on refusal
    body = msg.body
    if body.get("v") != PROTOCOL_VERSION:
        raise _control.ProtocolError(f"unsupported stream protocol version {body.get('v')!r}")
    try:
        return (body["c2s"], body["s2c"], body["size"], tuple(body["client"]),
                tuple(body["server"]))
    except (KeyError, TypeError) as exc:
        raise _control.ProtocolError(f"bad stream hello: {exc}") from None
