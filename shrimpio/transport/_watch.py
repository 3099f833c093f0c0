"""Readiness of shrimpio sockets on the shrimpio loop.

The loop's ``add_reader``/``add_writer`` on the fd of a shared-memory
connection (tornado, dask and anything else that drives a socket through
callbacks), and its own ``sock_*`` waits on such a socket, are served here.

Theory of operation
-------------------
A connection's fd is its control socket: readable when a doorbell byte came,
not when the ring holds data.  So the kernel is never asked about the fd the
caller gave; one :class:`Watch` per connection and loop keeps the interests
(callbacks by fd, and waiting futures) and asks the rings, as the patched
pollers do (``shrimpio._poll``):

* read interest is ready when the receive ring holds data or end of stream,
  after our own ``shutdown(SHUT_RD)``, or when the peer is gone;
* write interest is ready when the send ring has room, the peer closed its
  read side, or the peer is gone.

When an interest is ready, a callback scheduled with ``call_soon`` runs every
ready callback once and, if they are still ready afterwards, schedules
itself again: once per loop turn, as level-triggered epoll reports a kernel
socket (uvloop's readers on a socket at end of file fire every turn too).
When nothing is ready the receive ring stays on the loop's hot list for the
busy-poll budget after the loop's last traffic (a ``RingWatch``, polled by
the same ``LoopPoller`` as the transports: a peer that answers soon costs no
doorbell and no wake-up), then the rings are *armed* (sleeping flag, fence,
re-check: ``ring_arm``) and the loop's kernel readers wait on the doorbells,
so an idle connection costs no CPU.  A doorbell that fires is drained, and
the rings are asked again: a callback never runs because of a doorbell byte
alone.

The kernel readers are on *duplicates* of the doorbell fds, owned by the
watch: a program may close the socket while its callback is registered, and
a reader left on a closed fd number that the process then reuses would take
the new fd's events (libuv removes a watch by fd number).  The duplicates
live while the watch has interests, and go with it.

A listening shrimpio socket is watched on its TCP fd (TCP clients), its
registry socket and the sockets of shared-memory clients whose hello is
late (both duplicated); its callbacks run when one of them is readable
(``accept()`` then serves it).
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from typing import Any, Callable, Optional

import uvloop

from .._fastpath import RingWatch, drain_bell, ring_arm
from .._poll import _shrimp
from ..socket import StdSocket
from . import _sock

__all__ = ["Watch", "WatchMixin", "watch_of", "close_all", "wait"]

_add_reader = uvloop.Loop.add_reader
_remove_reader = uvloop.Loop.remove_reader


class Watch:
    """What one loop waits for on one shrimpio socket (a connection or a
    listener), and the kernel readers that wait for it."""

    __slots__ = ("loop", "sock", "conn", "lst", "readers", "writers", "rwait", "wwait",
                 "dups", "late", "timer", "scheduled", "pinned", "dead", "hot")

    def __init__(self, loop: Any, sock: Any) -> None:
        self.loop = loop
        self.sock = sock
        self.conn = sock._shm
        self.lst = sock._lst
        self.readers: dict[int, asyncio.Handle] = {}    # fd the caller gave -> callback
        self.writers: dict[int, asyncio.Handle] = {}
        self.rwait: list[asyncio.Future] = []
        self.wwait: list[asyncio.Future] = []
        self.dups: dict[str, int] = {}     # role ("bell", "space", "entry") -> our fd
        self.late: dict[int, int] = {}     # listener: late client's fd -> our dup
        self.timer: Optional[asyncio.TimerHandle] = None
        self.scheduled = False
        # Socket objects given to add_reader/add_writer: (writer, fd) -> object.
        self.pinned: dict[tuple[bool, int], Any] = {}
        self.dead = False
        self.hot: Optional[RingWatch] = None   # the receive ring's hot polling

    # -- interests ---------------------------------------------------------

    def wants(self) -> tuple[bool, bool]:
        return bool(self.readers or self.rwait), bool(self.writers or self.wwait)

    def idle(self) -> bool:
        return not (self.readers or self.writers or self.rwait or self.wwait)

    def changed(self) -> None:
        """Interests changed: ready ones run this turn or the next, the
        others get kernel readers; a watch without interests goes."""
        if self.idle():
            self.close()
            return
        self._sync()

    # -- readiness ---------------------------------------------------------

    def _alive(self) -> bool:
        sock = self.sock
        if self.dead:
            return False
        if self.conn is not None:
            return not self.conn.closed
        return self.lst is not None and sock._lst is self.lst and sock.fileno() >= 0

    def _ready(self, read: bool, write: bool) -> tuple[bool, bool]:
        """Ready now?  What is not gets its ring polled hot or armed (its
        peer then rings)."""
        conn = self.conn
        if conn is None:
            return False, False            # a listener: the kernel says
        if not read and self.hot is not None:
            self.hot.stop()
        if conn.gone:
            return read, write
        r = read and (conn.rd_shut or self._rx_ready(conn))
        w = write and ring_arm(conn.tx, True)
        return r, w

    def _rx_ready(self, conn: Any) -> bool:
        hot = self.hot
        if hot is None:
            from ._transport import _loop_poller
            hot = self.hot = RingWatch(conn.rx, conn.tx, _loop_poller(self.loop), self._schedule)
        return hot.ready()

    def _sync(self) -> None:
        if not self._alive():
            self._inert()
            return
        if self.conn is None:
            self._sync_listener()
            return
        read, write = self.wants()
        r, w = self._ready(read, write)
        if r or w:
            self._schedule()
        conn = self.conn
        # The data doorbell tells of data and of the peer's death; after our
        # own SHUT_RD it reads EOF for ever (reading is then always ready,
        # and the space doorbell still tells of the peer's death).
        self._kernel("bell", (read or write) and not conn.gone and not conn.rd_shut, conn.bell_fd)
        self._kernel("space", write and not w and not conn.gone, conn.space.fileno())

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._pump)

    def _kernel(self, role: str, on: bool, fd: int) -> None:
        """A kernel reader on our duplicate of ``fd``, on or off."""
        mine = self.dups.get(role)
        if on and mine is None:
            mine = os.dup(fd)
            self.dups[role] = mine
            _add_reader(self.loop, mine, self._on_kernel, role)
        elif not on and mine is not None:
            del self.dups[role]
            _remove_reader(self.loop, mine)
            os.close(mine)

    def _on_kernel(self, role: str) -> None:
        fd = self.dups.get(role)
        conn = self.conn
        if fd is not None and conn is not None and not conn.closed:
            eof = drain_bell(fd)            # (a connection's roles: "bell", "space")
            # Our own shutdown(SHUT_RD) makes the control socket say EOF
            # (see _poll.drain): not the peer's death.
            if eof and not (role == "bell" and conn.rd_shut):
                conn.gone = True
            if role == "bell" and self.hot is not None:
                self.hot.woke()
        if not self._alive():
            self._inert()
            return
        self._schedule()

    def _pump(self) -> None:
        """Run what is ready, once; then see again (level-triggered)."""
        self.scheduled = False
        if not self._alive():
            self._inert()
            return
        read, write = self.wants()
        if self.conn is None:
            fire_r, fire_w = read, False
        else:
            fire_r, fire_w = self._ready(read, write)
        if fire_r:
            self._fire(self.readers, self.rwait)
        if fire_w:
            self._fire(self.writers, self.wwait)
        if self.idle():
            self.close()
        elif self.conn is not None:
            self._sync()
        else:
            self._sync_listener()

    def _fire(self, handles: dict, waiters: list) -> None:
        for fd, handle in list(handles.items()):
            if handles.get(fd) is handle and not handle.cancelled():
                handle._run()
        if waiters:
            for fut in waiters[:]:
                if not fut.done():
                    fut.set_result(None)
            waiters.clear()

    # -- listeners -----------------------------------------------------------

    def _sync_listener(self) -> None:
        """Kernel readers on the listener's fds: its TCP fd (as given), its
        registry socket and each late client's (ours, duplicated)."""
        read = bool(self.readers or self.rwait)
        lst = self.lst
        self._kernel("entry", read, lst.usock.fileno())
        if read and "tcp" not in self.dups:
            # The TCP fd is the caller's, watched as uvloop would (closing
            # the listener must close its port at once): not duplicated.
            self.dups["tcp"] = self.sock.fileno()
            _add_reader(self.loop, self.dups["tcp"], self._on_kernel, "tcp")
        elif not read and "tcp" in self.dups:
            _remove_reader(self.loop, self.dups.pop("tcp"))
        waiting = set(lst.waiting) if read else set()
        for fd in [fd for fd in self.late if fd not in waiting]:
            mine = self.late.pop(fd)
            _remove_reader(self.loop, mine)
            os.close(mine)
        for fd in waiting - set(self.late):
            try:
                mine = os.dup(fd)
            except OSError:
                continue                   # dropped meanwhile (another thread)
            self.late[fd] = mine
            _add_reader(self.loop, mine, self._on_kernel, "late")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        first = lst.next_deadline() if read else None
        if first is not None:
            # A late client that runs out of time is dropped by the next accept.
            delay = max(0.0, first - time.monotonic()) + 0.001
            self.timer = self.loop.call_later(delay, self._schedule)

    # -- ending ----------------------------------------------------------------

    def _inert(self) -> None:
        """The socket was closed under its callbacks: they never run again
        (as with a kernel fd closed while watched), and the kernel readers go."""
        self.dead = True
        self._release_kernel()

    def _release_kernel(self) -> None:
        if self.hot is not None:
            self.hot.stop()          # (the poller drops it at its next turn)
            self.hot = None
        for role, mine in list(self.dups.items()):
            _remove_reader(self.loop, mine)
            if role != "tcp":
                os.close(mine)
        self.dups.clear()
        for mine in self.late.values():
            _remove_reader(self.loop, mine)
            os.close(mine)
        self.late.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        """Forget the watch (its interests are gone, or the loop closes)."""
        self._release_kernel()
        self.dead = True
        table = getattr(self.loop, "_shm_watches", None)
        if table is not None and table.get(self.key()) is self:
            del table[self.key()]
        for fut in self.rwait + self.wwait:
            fut.cancel()
        self.rwait.clear()
        self.wwait.clear()
        pinned, self.pinned = self.pinned, {}
        for obj in pinned.values():
            obj._decref_socketios()

    def key(self) -> Any:
        return self.conn if self.conn is not None else self.lst


def watch_of(loop: Any, sock: Any) -> Watch:
    """The loop's watch of a shrimpio socket (made on first use)."""
    table = loop._shm_watches
    key = _key(sock)
    w = table.get(key)
    if w is None or w.dead:
        w = table[key] = Watch(loop, sock)
    return w


def _key(sock: Any) -> Any:
    return sock._shm if sock._shm is not None else sock._lst


def close_all(loop: Any) -> None:
    for w in list(loop._shm_watches.values()):
        w.close()
    loop._shm_watches.clear()


async def wait(loop: Any, sock: Any, writable: bool) -> None:
    """Wait until a shrimpio socket is readable (writable): its ring, or
    for a listener a client to accept.  Cancelling the wait removes this
    wait only."""
    w = watch_of(loop, sock)
    fut = loop.create_future()
    (w.wwait if writable else w.rwait).append(fut)
    w.changed()
    try:
        await fut
    finally:
        waiters = w.wwait if writable else w.rwait
        if fut in waiters:
            waiters.remove(fut)
            if not w.dead:
                w.changed()


def add(loop: Any, sock: Any, fd: int, fileobj: Any, writer: bool,
        callback: Callable, args: tuple) -> None:
    """``add_reader``/``add_writer`` of a callback on a shrimpio socket's fd."""
    stale = loop._shm_fds.get(fd)
    if stale is not None and stale.key() is not _key(sock):
        # The fd number belonged to a connection closed under its callbacks.
        for direction in (False, True):
            if fd in (stale.writers if direction else stale.readers):
                remove(loop, stale, fd, direction)
    w = watch_of(loop, sock)
    table = w.writers if writer else w.readers
    old = table.get(fd)
    if old is not None:
        old.cancel()
    table[fd] = asyncio.Handle(callback, args, loop)
    _unpin(w, writer, fd)
    if isinstance(fileobj, StdSocket):
        # As uvloop: a socket object given here is not really closed until
        # its callback is removed.
        fileobj._io_refs += 1
        w.pinned[(writer, fd)] = fileobj
    loop._shm_fds[fd] = w
    w.changed()


def remove(loop: Any, w: Watch, fd: int, writer: bool) -> bool:
    table = w.writers if writer else w.readers
    handle = table.pop(fd, None)
    other = w.readers if writer else w.writers
    if fd not in other and loop._shm_fds.get(fd) is w:
        del loop._shm_fds[fd]
    if handle is not None:
        handle.cancel()
    _unpin(w, writer, fd)
    if not w.dead:
        w.changed()
    if w.dead and w.idle():
        w.close()
    return handle is not None


def _unpin(w: Watch, writer: bool, fd: int) -> None:
    obj = w.pinned.pop((writer, fd), None)
    if obj is not None:
        obj._decref_socketios()


# ---------------------------------------------------------------------------
# The loop's add_reader / add_writer / remove_reader / remove_writer


def _fileobj_to_fd(fileobj: Any) -> int:
    # uvloop's checks and messages.
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class WatchMixin:
    """Fd callbacks of the shrimpio loop (mixed into ``Loop``): on a
    shrimpio socket's fd they are served by a :class:`Watch`, on any other
    fd by uvloop.  ``remove_reader``/``remove_writer`` say whether a
    callback was removed (asyncio's contract; uvloop itself returns None)."""

    def _watch_init(self) -> None:
        self._shm_watches: dict = {}        # Connection or Listener -> Watch
        self._shm_fds: dict[int, Watch] = {}    # fd with a callback on a Watch -> it
        # fd -> (fileobj, callback, args) of the callbacks uvloop serves
        # (readers, writers).
        self._kernel_cbs: tuple[dict, dict] = ({}, {})
        # id(Connection) -> its live ShmTransport ("is used by transport").
        self._shm_transports: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()

    def _watch_close(self) -> None:
        close_all(self)
        self._shm_fds.clear()
        for s in self._kernel_cbs:
            s.clear()

    def _target(self, fd: int, fileobj: Any) -> Any:
        """The shrimpio socket serving ``fd``, if any; RuntimeError if a
        transport of this loop owns it (as uvloop says of its own)."""
        sock = _shrimp(fd)
        if sock is None and _sock._twins:
            sock = _sock.twin_of(fileobj, fd)
        if sock is not None and sock._shm is not None:
            tr = self._shm_transports.get(id(sock._shm))
            if tr is not None and tr._sock is not None:
                raise RuntimeError(f"File descriptor {fd!r} is used by transport {tr!r}")
        return sock

    def _add_cb(self, fileobj: Any, callback: Callable, args: tuple, writer: bool) -> None:
        if self.is_closed():                                  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        fd = _fileobj_to_fd(fileobj)
        sock = self._target(fd, fileobj)
        kernel = self._kernel_cbs[writer]
        if sock is not None:
            if kernel.pop(fd, None) is not None:
                # Registered while the fd was a kernel socket: it is a
                # shared-memory connection now.
                _base_remove(self, fd, writer)
            add(self, sock, fd, fileobj, writer, callback, args)
            return
        w = self._shm_fds.get(fd)
        if w is not None:
            remove(self, w, fd, writer)                      # that connection is gone
        kernel[fd] = (fileobj, callback, args)
        if writer:
            super().add_writer(fileobj, callback, *args)     # type: ignore[misc]
        else:
            super().add_reader(fileobj, callback, *args)     # type: ignore[misc]

    def _remove_cb(self, fileobj: Any, writer: bool) -> bool:
        fd = _fileobj_to_fd(fileobj)
        self._target(fd, fileobj)
        w = self._shm_fds.get(fd)
        if w is not None and fd in (w.writers if writer else w.readers):
            return remove(self, w, fd, writer)
        kernel = self._kernel_cbs[writer]
        had = kernel.pop(fd, None) is not None
        if writer:
            super().remove_writer(fileobj)                   # type: ignore[misc]
        else:
            super().remove_reader(fileobj)                   # type: ignore[misc]
        return had

    def _now_shm(self, sock: Any) -> None:
        """``sock`` just connected over shared memory (its fd is the control
        socket now): callbacks uvloop had on it move to the rings."""
        fd = sock.fileno()
        for writer in (False, True):
            got = self._kernel_cbs[writer].pop(fd, None)
            if got is not None:
                _base_remove(self, fd, writer)
                fileobj, callback, args = got
                add(self, sock, fd, fileobj, writer, callback, args)

    def add_reader(self, fileobj: Any, callback: Callable, *args: Any) -> None:
        self._add_cb(fileobj, callback, args, False)

    def add_writer(self, fileobj: Any, callback: Callable, *args: Any) -> None:
        self._add_cb(fileobj, callback, args, True)

    def remove_reader(self, fileobj: Any) -> bool:           # type: ignore[override]
        return self._remove_cb(fileobj, False)

    def remove_writer(self, fileobj: Any) -> bool:           # type: ignore[override]
        return self._remove_cb(fileobj, True)


def _base_remove(loop: Any, fd: int, writer: bool) -> None:
    (uvloop.Loop.remove_writer if writer else uvloop.Loop.remove_reader)(loop, fd)
