"""A shared-memory stream connection: two rings, two doorbells, one control socket.

Theory of operation
-------------------
The *client* builds the connection: one segment holding two rings (client to
server at offset 0, server to client after it) and a socketpair for the
"space" doorbell (a *kit*, below).  It connects to the listener's registry
entry (an ``AF_UNIX``/``SOCK_SEQPACKET`` socket; that connected socket is
the connection's control socket from then on) and sends one ``stream``
message carrying the segment and the server's end of the socketpair (the
hand-shake is in :mod:`shrimpio._handshake`).  It does not
wait for an answer: like a TCP connect, the connection exists once it is in
the listener's backlog, and bytes written before ``accept()`` wait in the ring.
(VMMC would put each ring in its receiver's segment; building both on the
client is what lets ``connect()`` finish before the server accepts.  The
server validates everything in the segment, so nothing is lost in safety.)

Doorbells, per side:

* the control socket is the *data* doorbell: the peer rings it (one byte)
  when it wrote and our reader sleeps; its fd is the socket's ``fileno()``, so
  select/poll/epoll see data and EOF on it;
* the space socket is the *space* doorbell: rung when the peer consumed and
  our writer sleeps.

Two sockets, because a reader thread and a writer thread of one connection
may sleep at the same time, and one socket would let one of them swallow the
other's wake-up.  The kernel closes both when a process exits, however it
exits: EOF on either means the peer is gone.

Closing: ``close()`` of the last reference in a process that never forked
shuts our write side (the peer reads EOF after the last byte) and our read
side (the peer's writes fail with ``EPIPE``), as TCP's FIN and RST would.
After a fork, several processes may hold the connection; then ``close()``
only drops this process's fds and the peer sees EOF when the last holder
closes or dies.
"""

from __future__ import annotations

import errno
import os
import socket as _std
import _socket as _csocket
import threading
import weakref

from . import _control, _ports, _process, _stat
from ._fastpath import (Ring, RingCorruptedError, Segment, Stream, close_fd, forget_refusal,
                        prepare_rings, take_refusal)

__all__ = ["Connection", "DEFAULT_RING", "Kit", "SpaceFd", "ring_capacity", "take_kit", "give_back",
           "refill", "connected", "drop_spares", "bury", "reap"]

#: Default bytes per direction: what loopback TCP takes one way before a
#: sender without a reader waits (its autotuned send and receive buffers,
#: up to ``tcp_wmem``'s 4 MiB: about 3.9 MB on Linux), so that a program
#: that writes a few MB before it reads works as over TCP.  Only the pages
#: written are memory (docs/sockets.md, "Buffering").
DEFAULT_RING = 4 * 1024 * 1024
MIN_RING = 4096
MAX_RING = 64 * 1024 * 1024

# Layout of a connection's segment (docs/data-plane.md, "Connection
# segment"): the first page holds both ring headers, each followed by its
# small area; the large areas follow, client to server first.  Only the
# first page is mapped until a large area is used, so an idle connection
# costs one page of shared memory and almost no page tables.
#: Capacity of each direction's small area.
SMALL_RING = 1024
#: The hot part: both headers and small areas.
HOT = 4096
#: The second ring's header (server to client).
OFF2 = 2048
_AF_UNIX, _SOCK_SEQPACKET = int(_std.AF_UNIX), int(_std.SOCK_SEQPACKET)

_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation, _connects
    _fork_generation += 1
    Connection._forked_parent_gen = -1
    # The parent may hand its spare kits to its own next connections: a
    # child using them too would share rings with an unrelated connection.
    _connects = 0
    drop_spares()           # and the parent's buried segments (our copies)


#: Forks this process made or came from; objects compare it with the value
#: they saw at creation to know whether another process may share them.
forks = 0


def _before_fork() -> None:
    global forks
    forks += 1
    # Every connection that exists now is shared with the child.
    Connection._shared_below = Connection._next_id


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def ring_capacity(nbytes: int) -> int:
    """Ring size for a requested buffer size: a power of two in [4 KiB, 64 MiB]."""
    if nbytes == DEFAULT_RING and type(nbytes) is int:
        return DEFAULT_RING
    nbytes = max(MIN_RING, min(MAX_RING, int(nbytes)))
    return 1 << (nbytes - 1).bit_length()


def _align(n: int, to: int = 4096) -> int:
    return (n + to - 1) // to * to



# -- kits: what a client hands the listener -------------------------------------
#
# A connect needs a fresh segment (sealed memfd, mapped, both ring headers
# initialised, which faults their pages in) and a fresh socketpair for the
# space doorbell: about ten system calls and two page faults.  A process that
# has made two shared-memory connections keeps one such *kit* ready: the next
# connect takes it (no system call) and sends the hello right after its
# registry connect.  The spare is rebuilt while the process waits anyway:
# when the new connection's first read would wait for the peer (blocking
# sockets), right after the hello (asyncio, which reads by itself), or at
# close if it never waited.  Kits are never reused: each is built for one
# connection and handed over once.

#: Spare kits a process keeps (of the default ring sizes only).
SPARES = 1
_spares: "list[Kit]" = []
_connects = 0            # shared-memory connects made by this process (since fork)


class Kit:
    """A segment with two initialised ring headers and a socketpair, for one
    connection.  ``pid`` is the process that built it: a kit is only ever
    used there (a forked child drops the parent's)."""

    __slots__ = ("caps", "segment", "mine", "theirs", "pid")

    def __init__(self, c2s: int, s2c: int) -> None:
        off2, size = Connection.layout(c2s, s2c)
        self.caps = (c2s, s2c)
        self.pid = _process.pid
        kind = _segment_kind()
        # A closed connection's mapping, if one waits to be unmapped: the
        # new segment is mapped over it (one system call instead of two).
        try:
            old = _graveyard.pop()
        except IndexError:
            old = None
        try:
            self.segment = seg = Segment(size, kind=kind, replace=old, hot=HOT) if kind \
                else Segment(size, hot=HOT)
        except BaseException:
            if old is not None and not old.closed:
                bury(old)
            raise
        try:
            # C-level socket objects: nobody sees them as Python sockets,
            # and they cost less to make and close.
            self.mine, self.theirs = _csocket.socketpair(_AF_UNIX, _SOCK_SEQPACKET)
        except BaseException:
            seg.close()
            raise
        prepare_rings(seg, off2, c2s, s2c, SMALL_RING)

    def close(self) -> None:
        self.segment.close()
        self.mine.close()
        self.theirs.close()


def _segment_kind() -> "str | None":
    """The kind of segment ``Segment(size)`` would make now (None: an invalid
    ``SHRIMPIO_SEGMENT``, let ``Segment`` raise)."""
    kind = _control.getenv("SHRIMPIO_SEGMENT") or "memfd"
    if kind not in ("memfd", "shm"):
        return None
    return kind if hasattr(os, "memfd_create") else "shm"


def take_kit(c2s: int, s2c: int) -> "Kit | None":
    """A spare kit for rings of these capacities, or None.  No system call."""
    if not _spares or c2s != DEFAULT_RING or s2c != DEFAULT_RING:
        return None
    kind, pid = _segment_kind(), _process.pid
    while True:
        try:
            kit = _spares.pop()
        except IndexError:
            return None
        if kit.pid == pid and kit.segment.kind == kind:
            return kit
        kit.close()


def give_back(kit: "Kit | None") -> None:
    """An unused kit (the connect went to TCP): keep it as a spare or close it."""
    if kit is None:
        return
    if kit.pid == _process.pid and kit.caps == (DEFAULT_RING, DEFAULT_RING) \
            and len(_spares) < SPARES:
        _keep(kit)
    else:
        kit.close()


def refill() -> None:
    """Build a spare kit if this process connects repeatedly and has none.
    Called when a new connection first waits for its peer (or after the
    hello, or when it closes without having waited): at a moment when the
    peer, not we, is the one working.  Failure (out of fds or memory) only
    costs the next connect its head start."""
    if _connects < 2 or len(_spares) >= SPARES:
        return
    try:
        kit = Kit(DEFAULT_RING, DEFAULT_RING)
    except (OSError, ValueError):
        return
    if len(_spares) < SPARES:
        _keep(kit)
    else:
        kit.close()


_exit_hooked = False


def _keep(kit: Kit) -> None:
    """Keep ``kit`` as a spare, closed when the process exits (its socket
    objects would otherwise be reported unclosed: ``ResourceWarning`` under
    ``python -X dev``, which the program, not shrimpio, seems to leak)."""
    global _exit_hooked
    _spares.append(kit)
    if not _exit_hooked:
        _exit_hooked = True          # (a forked child inherits the hook)
        _control.on_exit(drop_spares)


def connected() -> None:
    """Count a shared-memory connect of this process (refill() keeps spares
    only for processes that connect repeatedly)."""
    global _connects
    _connects += 1


def drop_spares() -> None:
    """Close the spare kits (their fds and mappings) and unmap the segments
    of closed connections.  Harmless at any time."""
    while True:
        try:
            kit = _spares.pop()
        except IndexError:
            break
        kit.close()
    reap()
    _ports.drop()


# -- unmapping later --------------------------------------------------------------
#
# Unmapping a closed connection's segment is the dearest part of close()
# (the page tables and the TLB).  Nothing reads it any more, so it can wait
# for a moment when this process waits anyway: a client's next refill, a
# listener's next accept() before it busy-polls.  At most GRAVEYARD wait.

GRAVEYARD = 8
_graveyard: "list[Segment]" = []


def bury(seg: Segment) -> None:
    """Unmap ``seg`` (whose rings are closed) now or at the next reap()."""
    if len(_graveyard) < GRAVEYARD:
        _graveyard.append(seg)
    else:
        seg.close()


def reap() -> None:
    """Unmap the segments bury() kept."""
    while True:
        try:
            seg = _graveyard.pop()
        except IndexError:
            return
        try:
            seg.close()
        except BufferError:
            pass            # a view still uses it: unmapped when the last one goes


#: Seconds between the pollers' offers of a trim to this process's send rings.
TRIM_EVERY = 1.0
_trim_due = 0.0
#: This process's connections (see trim_idle).
_live: "weakref.WeakSet[Connection]" = weakref.WeakSet()


def trim_idle(now: float) -> None:
    """Offer each send ring of this process's connections a trim
    (``Ring.trim``: the pages of a drained large area go back), at most
    once every TRIM_EVERY seconds.  A blocking reader does this for its own
    connection when it sleeps, the shrimpio loop for its transports; the
    patched pollers call this before they sleep in the kernel, so that a
    program that waits in select, poll or epoll after a burst does not
    keep its pages.  Connections shared with another process by a fork are
    left alone: the writer there may be writing."""
    global _trim_due
    if now < _trim_due:
        return
    _trim_due = now + TRIM_EVERY
    shared_below = Connection._shared_below
    for conn in list(_live):
        if conn.closed or conn.id < shared_below:
            continue
        try:
            conn.tx.trim()
        except (OSError, ValueError):
            pass                    # broken or closing: its own calls say so


class Connection:
    """The shared-memory half of a connected shrimpio socket.

    The socket objects own the user-visible fds of the control socket; the
    data doorbell is one of them (``bell_fd``: a connection costs one fd
    per side more than a kernel TCP socket, its space socket), or, where
    none can serve (the object whose fd it was closed while others remain,
    an escaped connection's relay), an fd of the control socket this object
    owns (``bell_owned``).  It owns the segment and the space socket (the
    listener holds the client's end as a bare fd, :class:`SpaceFd`).
    ``local`` and ``peer`` are the emulated TCP addresses.
    """

    __slots__ = ("id", "segment", "bell_fd", "bell_owned", "space", "local", "peer", "client",
                 "tx", "rx", "refs", "stream", "closed", "gone", "lock", "kit_due",
                 "stat", "claim", "__weakref__")

    _next_id = 0
    _shared_below = 0            # ids below this existed at a fork
    _forked_parent_gen = 0

    def __init__(self, segment: Segment, bell_fd: int, space: "_std.socket | SpaceFd", *, client: bool,
                 caps: tuple[int, int], local: tuple = (), peer: tuple = (),
                 create: bool = False, bell_owned: bool = True) -> None:
        self.id = Connection._next_id
        Connection._next_id += 1
        self.segment = segment
        self.bell_fd = bell_fd
        self.bell_owned = bell_owned
        self.space = space
        self.local = local
        self.peer = peer
        self.client = client
        c2s, s2c = caps
        space_bell = space.fileno()
        ring_c2s = Ring(segment, 0, c2s, create=create, data_bell=bell_fd, space_bell=space_bell,
                        small=SMALL_RING, big_offset=HOT)
        try:
            ring_s2c = Ring(segment, OFF2, s2c, create=create, data_bell=bell_fd,
                            space_bell=space_bell, small=SMALL_RING, big_offset=HOT + c2s)
        except BaseException:
            # (A peer's second ring header may be bad when its first is
            # not: the segment must be closable by the caller.)
            ring_c2s.close()
            raise
        self.tx, self.rx = (ring_c2s, ring_s2c) if client else (ring_s2c, ring_c2s)
        # A read that sleeps idle gives back the pages of what we sent
        # (docs/data-plane.md, "Two areas").
        self.rx.trim_with(self.tx)
        _live.add(self)
        self.refs = 1                 # socket objects of this process using it
        self.stream = Stream(self.tx, self.rx)
        self.closed = False
        self.gone = False             # EOF seen on a doorbell: the peer is gone
        self.lock = threading.Lock()
        self.kit_due = False          # build a spare kit when we first wait for the peer
        self.stat = None              # its slot in `shrimpio stat`'s table (socket._install)
        self.claim = None             # a client's claim on its local port (see _ports)

    # The per-call state lives in the Stream (C), where send/recv update it.
    bytes_sent = property(lambda self: self.stream.bytes_sent, doc="bytes written to the peer")
    bytes_received = property(lambda self: self.stream.bytes_received, doc="bytes read from the peer")

    @property
    def rd_shut(self) -> bool:
        """shutdown(SHUT_RD) was called in this process."""
        return self.stream.rd_shut

    @rd_shut.setter
    def rd_shut(self, value: bool) -> None:
        self.stream.rd_shut = value

    # -- building ----------------------------------------------------------

    @staticmethod
    def layout(c2s: int, s2c: int) -> tuple[int, int]:
        """(offset of the second ring, segment size) for two capacities."""
        return OFF2, HOT + c2s + s2c

    def set_bell(self, fd: int, owned: bool) -> None:
        """Make ``fd`` (an fd of the control socket) the data doorbell; the
        one we owned before, if any, is closed."""
        old, old_owned = self.bell_fd, self.bell_owned
        space = self.space.fileno()
        self.tx.set_bells(fd, space)
        self.rx.set_bells(fd, space)
        self.bell_fd, self.bell_owned = fd, owned
        if old_owned and old != fd:
            os.close(old)

    def keep_bell(self, closing_fd: int) -> None:
        """The socket object whose fd is the doorbell lets go of it while
        other objects still use the connection: the doorbell moves to an
        fd of our own (a thread asleep on the old one keeps its file and
        looks again within a slice)."""
        if self.bell_fd == closing_fd and not self.bell_owned and not self.closed:
            self.set_bell(os.dup(closing_fd), owned=True)

    # -- a listener's refusal (the late fallback, see _accept.refuse) --------

    def refused(self) -> "str | None":
        """Why the listener sent this client to TCP without ever taking its
        hello, if it did (asked when the peer is found gone: a refusal is
        its last message before it closes our control socket).  Once."""
        if not self.client or self.closed:
            return None
        msg = take_refusal(self.bell_fd)
        if msg is None:
            return None
        try:
            got = _control.decode_payload(_control.datagram_payload(msg, 0, []), [])
            reason = got.body.get("reason") if got.kind == "tcp" else None
        except (_control.ProtocolError, AttributeError, ValueError):
            reason = None
        return reason if isinstance(reason, str) and reason else "handshake refused"

    def unsent(self) -> tuple[bytes, bool]:
        """What we wrote that the peer never read, and whether we shut our
        writing side: all of it, for a connection the listener refused (it
        never attached), read here as its consumer would."""
        c2s = self.tx.capacity
        ring = Ring(self.segment, 0, c2s, small=SMALL_RING, big_offset=HOT)
        try:
            chunks = []
            while True:
                try:
                    data = ring.read(c2s, timeout=0)
                except BlockingIOError:
                    return b"".join(chunks), False
                if not data:
                    return b"".join(chunks), True
                chunks.append(data)
        finally:
            ring.close()

    # -- state -------------------------------------------------------------

    @property
    def shared_with_child(self) -> bool:
        """Has this process forked while the connection existed?"""
        return self.id < Connection._shared_below or _fork_generation > 0

    def release(self) -> None:
        """One socket object of this process lets go; the last one closes."""
        with self.lock:
            self.refs -= 1
            last = self.refs <= 0
        if last:
            self.close()

    def close(self) -> None:
        """Drop this process's share of the connection (see the module
        docstring for what the peer sees)."""
        if self.closed:
            return
        if not self.shared_with_child:
            for action in (self.tx.shutdown_write, self.rx.close_read):
                try:
                    action()
                except (OSError, ValueError):
                    pass     # already broken or the peer is gone: nothing to tell
        self.closed = True
        self.stream.closed = True
        if self.client:
            forget_refusal(self.bell_fd)    # (its fd number will be another's)
        self.tx.close()
        self.rx.close()
        # (Closed, the rings write no more into the slot: it can go to the
        # next connection.)
        _stat.release(self.stat)
        self.stat = None
        _ports.give(self.claim)
        self.claim = None
        bury(self.segment)
        self.space.close()
        if self.bell_owned:
            os.close(self.bell_fd)
        if self.kit_due:
            # Never waited for the peer: the next connect's kit now, not
            # between its registry connect and its hello.
            self.kit_due = False
            refill()


class SpaceFd:
    """The client's end of a space doorbell as the listener holds it: the
    fd, with the two calls a connection makes of its space socket.  (A
    socket object made on it would cost a ``getsockname`` to check an fd
    that ``stream_accept`` checked already: a connected Unix seqpacket
    socket.)"""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            close_fd(fd)

    def __del__(self) -> None:
        self.close()            # (as a socket object's fd goes with it)


def describe_error(exc: BaseException) -> str:
    """Short fallback reason for a failed handshake."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return "fd limit"          # a kernel TCP socket needs none more: it still connects
    if isinstance(exc, RingCorruptedError):
        return "handshake refused: bad segment"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"handshake refused: {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"handshake refused: {exc}"
