"""``select.epoll`` that understands shrimpio sockets, at the kernel's scale.

Theory of operation
-------------------
The kernel's epoll costs a wait in proportion to the fds that are *ready*,
not to those registered; a server with a thousand idle connections answers
its one busy client as fast as with none.  So does this one.

A shared-memory connection is ready when its rings say so; its fd (the
control socket, which is the data doorbell) becomes readable only when the
peer rings, and the peer rings only a ring whose sleeping flag is set.  The
epoll keeps two kinds of shrimpio registration:

* *cold*: the rings of interest are armed (sleeping flag set; a full fence
  and a re-check showed nothing ready) and the connection's doorbells (the
  control socket; the space socket for write interest) are registered in
  the kernel epoll, edge-triggered.  A cold connection costs nothing per
  poll: the kernel reports it when the peer rings.
* *hot*: to be looked at on the next poll without the kernel's word: new
  or modified registrations, and level-triggered ones reported ready last
  time (they stay ready until the program reads or writes).  A hot
  connection that is not ready any more is armed and goes cold.

A poll looks at the hot connections, spins on their rings for their
adaptive budget when nothing is ready (as a blocking ``recv`` does; the
kernel epoll's own fd is polled during the spin, so a cold connection or a
kernel fd ends it), arms what is still idle, and waits in the kernel.  Each
doorbell the kernel reports is drained and its connection's rings asked;
only what the rings confirm is reported: level-triggered, no spurious
readiness.

An armed ring stays armed until its peer rings, unless someone else in
this process clears the flag or drains the doorbell: a thread blocked in
``recv`` on the same connection (its wait clears the flag when it wakes), or
another poller.  The data plane counts such events (``unarmed_count``); when
the count moved since this epoll last armed everything, it arms everything
again (the cost of the previous design, paid only by programs that mix
blocking calls or several pollers with an epoll), and while that happens it
waits in slices, so that a wake-up taken in the instant before a wait is
found within one slice.

A registration or modification made by another thread while a poll waits
wakes that poll (an eventfd in the kernel epoll), so that it looks at the new
registration at once, as the kernel's epoll would watch it.

What a registered fd is, is decided at poll time: a socket registered
before its ``connect()``/``listen()`` is watched as what it became
(``fd_changing`` takes a registration out before ``dup2`` replaces its
file).  ``EPOLLONESHOT`` and ``EPOLLET`` are honoured for shrimpio fds
too.  Listeners (a few per program) are looked at on every poll.
"""

from __future__ import annotations

import errno
import operator as _operator
import os
import select as _select
import time
import weakref
from _thread import get_ident as _get_ident
from typing import Any, Optional

from . import _poll
from . import socket as _ss
from ._connection import trim_idle
from ._fastpath import ring_progress, unarmed_count
from ._poll import POLLHUP, POLLIN, POLLOUT, _deadline, _fd_of, _hup, _left, _shrimp

__all__ = ["epoll", "fd_changing"]

_real_epoll = _poll._real_epoll
_EPOLLIN = _select.EPOLLIN
_EPOLLOUT = _select.EPOLLOUT
_EPOLLET = getattr(_select, "EPOLLET", 1 << 31)
_EPOLLONESHOT = getattr(_select, "EPOLLONESHOT", 1 << 30)
# A waiter that may have lost a wake-up to another thread looks again
# after this long at most (see the module's docstring).
_SLICE = 0.05


class _Reg:
    """An epoll registration of a shrimpio fd: its mask, the connection or
    listener it was made for (a registration outlives neither: the stdlib's
    epoll forgets an fd when its file closes), its one-shot state, the last
    edges reported (edge-triggered), and the doorbells registered for it in
    the kernel epoll."""

    __slots__ = ("mask", "ref", "armed", "edge", "oneshot", "last_r", "last_w", "bells")

    def __init__(self, mask: int, sock: Any) -> None:
        self.ref = weakref.ref(sock._shm if sock._shm is not None else sock._lst)
        self.bells: tuple[int, ...] = ()
        self.set_mask(mask)

    def set_mask(self, mask: int) -> None:
        self.mask = mask
        self.armed = True
        self.edge = bool(mask & _EPOLLET)
        self.oneshot = bool(mask & _EPOLLONESHOT)
        self.last_r = self.last_w = None

    @property
    def read(self) -> bool:
        return bool(self.mask & (_EPOLLIN | _select.EPOLLPRI))

    @property
    def write(self) -> bool:
        return bool(self.mask & _EPOLLOUT)

    def is_for(self, sock: Any) -> bool:
        return self.ref() is (sock._shm if sock._shm is not None else sock._lst)

    def news(self, conn: Any, r: bool, w: bool, peek: bool = False) -> tuple[bool, bool]:
        """Edge-triggered: which of (readable, writable) changed since they
        were last reported (the peer wrote, read, shut or died); ``peek``
        leaves the record as it is."""
        try:
            mr = (ring_progress(conn.rx, False), conn.gone, conn.rd_shut) if r else None
            mw = (ring_progress(conn.tx, True), conn.gone) if w else None
        except (OSError, ValueError):
            return r, w                     # broken or closed: report, the calls raise
        r = r and mr != self.last_r
        w = w and mw != self.last_w
        if not peek:
            if r:
                self.last_r = mr
            if w:
                self.last_w = mw
        return r, w


#: Live patched epoll objects, told when an fd is about to become a shrimpio
#: connection or listener (see fd_changing).
_epolls: "weakref.WeakSet[epoll]" = weakref.WeakSet()


def fd_changing(fd: int) -> None:
    """``fd`` (a shrimpio socket's) is about to become a shared-memory
    connection (its file replaced by ``dup2``) or listener, or to stop
    being one (its file replaced by a kernel socket's).  An epoll that has
    it registered takes it out while the registration is still on this
    file (the kernel drops it silently with the file), and decides at its
    next poll where it belongs.  (Installed in ``shrimpio.socket.fd_change_hooks``.)"""
    if not _epolls:
        return
    for ep in list(_epolls):
        ep._fd_changing(fd)


class epoll:
    """``select.epoll`` that understands shrimpio sockets.

    Whether a registered fd is a shrimpio connection or listener is decided
    at poll time, not at registration: a socket registered before its
    ``connect()`` or ``listen()`` (pyftpdlib does so) is watched as what it
    became.  Kernel fds are registered in a real epoll (``EPOLLET`` and
    ``EPOLLONESHOT`` as the kernel does them); shrimpio fds honour both too:
    one-shot until ``modify()``, edge-triggered on the peer's next write,
    read, shut or death.  A poll costs in proportion to the connections
    that are ready, as the kernel's does (see the module's docstring)."""

    def __init__(self, sizehint: int = -1, flags: int = 0) -> None:
        self._ep = _real_epoll(sizehint, flags)
        self._shm: dict[int, _Reg] = {}      # shrimpio fd -> registration
        self._kmask: dict[int, int] = {}     # fds registered in the kernel epoll (maybe stale)
        self._moving: dict[int, int] = {}    # taken out of the kernel by fd_changing: fd -> mask
        self._bells: dict[int, int] = {}     # doorbell fd in the kernel epoll -> shrimpio fd
        self._hot: dict[int, None] = {}      # shrimpio fds to look at without the kernel's word
        self._listeners: set[int] = set()
        self._armed_at = -1                  # unarmed_count() when all were last armed
        self._looked = 0                     # registrations looked at, all polls (for tests)
        self._pollers: set[int] = set()      # the threads in poll()
        self._wake = -1                      # eventfd in the kernel epoll (see _woken)
        _epolls.add(self)

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def close(self) -> None:
        self._ep.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        for d in (self._shm, self._kmask, self._moving, self._bells, self._hot):
            d.clear()
        self._listeners.clear()
        _epolls.discard(self)

    def __enter__(self) -> "epoll":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self) -> None:
        if self._ep.closed:
            raise ValueError("I/O operation on closed epoll object")

    # -- registrations ----------------------------------------------------

    def _live(self, fd: int) -> "tuple[Optional[_Reg], Any]":
        """fd's shrimpio registration and socket if it still stands (else
        it is forgotten: the file it was made for is gone)."""
        reg = self._shm.get(fd)
        if reg is None:
            return None, None
        sock = _shrimp(fd)
        if sock is not None and reg.is_for(sock):
            return reg, sock
        self._forget(fd)
        return None, None

    def _forget(self, fd: int) -> None:
        reg = self._shm.pop(fd, None)
        self._hot.pop(fd, None)
        self._listeners.discard(fd)
        if reg is not None:
            self._unwatch(reg)

    def _unwatch(self, reg: _Reg) -> None:
        for kfd in reg.bells:
            if self._bells.get(kfd) is None or kfd in self._kmask:
                continue                     # that number is someone else's now
            del self._bells[kfd]
            try:
                self._ep.unregister(kfd)
            except (OSError, ValueError):
                pass                         # closed with its file: the kernel forgot it
        reg.bells = ()

    def _watch(self, fd: int, reg: _Reg, conn: Any) -> None:
        """Have the kernel epoll report ``conn``'s doorbells (the control
        socket; the space socket too for write interest), edge-triggered:
        each ring of the peer is one event, drained when reported."""
        want = (conn.bell_fd, conn.space.fileno()) if reg.write else (conn.bell_fd,)
        if reg.bells == want:
            return
        self._unwatch(reg)
        done = []
        try:
            for kfd in want:
                try:
                    self._ep.register(kfd, _EPOLLIN | _EPOLLET)
                except FileExistsError:
                    self._ep.modify(kfd, _EPOLLIN | _EPOLLET)
                done.append(kfd)
                self._bells[kfd] = fd
                self._kmask.pop(kfd, None)   # a stale entry: the number is a doorbell now
        except OSError:
            pass                             # closed under us: the next look reports it
        reg.bells = tuple(done)

    def _add(self, fd: int, mask: int, sock: Any) -> None:
        self._shm[fd] = _Reg(mask, sock)
        if sock._lst is not None:
            self._listeners.add(fd)
        else:
            self._hot[fd] = None

    def register(self, fd: Any, eventmask: int = _select.EPOLLIN | _select.EPOLLPRI | _select.EPOLLOUT) -> None:
        self._check()
        fd = _fd_of(fd)
        sock = _shrimp(fd)
        if sock is not None:
            eventmask = _operator.index(eventmask)      # (the stdlib's TypeError)
            if self._live(fd)[0] is not None or fd in self._moving:
                raise FileExistsError(errno.EEXIST, "File exists")
            self._add(fd, eventmask, sock)
            self._kmask.pop(fd, None)
            self._changed()
            return
        self._live(fd)
        if fd in self._moving:
            raise FileExistsError(errno.EEXIST, "File exists")
        self._ep.register(fd, eventmask)
        self._kmask[fd] = eventmask
        self._bells.pop(fd, None)            # a stale doorbell number, now the program's

    def modify(self, fd: Any, eventmask: int) -> None:
        self._check()
        fd = _fd_of(fd)
        reg, _ = self._live(fd)
        if reg is not None:
            reg.set_mask(_operator.index(eventmask))
            if fd not in self._listeners:
                self._hot[fd] = None
            self._changed()
            return
        if fd in self._moving:
            self._moving[fd] = eventmask
            self._changed()
            return
        self._ep.modify(fd, eventmask)
        self._kmask[fd] = eventmask

    def unregister(self, fd: Any) -> None:
        self._check()
        fd = _fd_of(fd)
        if self._live(fd)[0] is not None:
            self._forget(fd)
            return
        if self._moving.pop(fd, None) is not None:
            return
        self._ep.unregister(fd)
        self._kmask.pop(fd, None)

    def _changed(self) -> None:
        """A shrimpio registration was made or changed.  The kernel's epoll
        watches an fd from the moment it is registered, even by a thread
        other than the one waiting in ``epoll_wait`` (cheroot's and other
        thread-pool servers hand a connection back to the selector from
        the worker that served it); ours looks at a new registration when
        its poll next looks, so a poll waiting in another thread is woken
        (an eventfd in the kernel epoll) to look now."""
        pollers = self._pollers
        if not pollers or (len(pollers) == 1 and _get_ident() in pollers):
            return
        if self._wake < 0:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._ep.register(self._wake, _EPOLLIN)
        os.eventfd_write(self._wake, 1)

    def _fd_changing(self, fd: int) -> None:
        if self._ep.closed:
            return
        reg, _ = self._live(fd)
        if reg is not None:                  # a shrimpio fd about to be a kernel one
            self._forget(fd)                 # (its doorbells leave the kernel epoll now)
            self._moving[fd] = reg.mask
            return
        mask = self._kmask.pop(fd, None)
        if mask is None:
            return
        try:
            self._ep.unregister(fd)          # only if registered for this very file
        except OSError:
            return                           # a stale entry (that file was closed)
        self._moving[fd] = mask

    def _settle(self) -> None:
        """Put the fds fd_changing took out where they now belong."""
        for fd, mask in list(self._moving.items()):
            del self._moving[fd]
            sock = _shrimp(fd)
            if sock is not None:
                self._add(fd, mask, sock)
                continue
            try:                             # still (or again) a kernel socket
                self._ep.register(fd, mask)
                self._kmask[fd] = mask
            except OSError:
                pass                         # closed meanwhile: forgotten, as by the kernel

    # -- polling ----------------------------------------------------------

    def _events(self, fd: int, reg: _Reg, sock: Any, arm: bool) -> int:
        """Poll-style events of a shrimpio registration now.  ``arm``: if
        nothing is ready, arm its rings (it goes cold); else only look."""
        conn = sock._shm
        if arm:
            _poll._want(sock, reg.read, reg.write, reg.edge)
        # What the rings say, validated: a ring the peer broke is ready for
        # whatever was asked (its own recv/send raise).
        r, w = _poll._ready(sock, reg.read, reg.write, ())
        if reg.edge:
            r, w = reg.news(conn, r, w)
        ev = (POLLIN if r else 0) | (POLLOUT if w else 0)
        if (ev or not reg.edge) and _hup(conn):
            ev |= POLLHUP                    # edge-triggered: only with an edge
        return ev

    def _look(self, fds: Any, arm: bool, out: dict[int, int]) -> list:
        """Look at the shrimpio registrations ``fds``: the ready ones go to
        ``out`` (and stay hot if level-triggered); with ``arm``, the others
        are armed and go cold.  Returns the (fd, reg, sock) still idle."""
        idle = []
        for fd in list(fds):
            self._looked += 1
            reg, sock = self._live(fd)
            if reg is None or not reg.armed or sock._shm is None:
                self._hot.pop(fd, None)
                continue
            self._watch(fd, reg, sock._shm)
            ev = self._events(fd, reg, sock, arm)
            if ev:
                out[fd] = ev
                if reg.edge or reg.oneshot:
                    self._hot.pop(fd, None)
                    if reg.edge and not arm:
                        _poll._want(sock, reg.read, reg.write, True)
            else:
                idle.append((fd, reg, sock))
                if arm:
                    self._hot.pop(fd, None)
        return idle

    def _rung(self, events: list, out: dict[int, int], kernel: list) -> None:
        """Sort the kernel epoll's events: the program's own kernel fds go
        to ``kernel``; a doorbell is drained and its connection looked at."""
        seen = set()
        for kfd, ev in events:
            fd = self._bells.get(kfd)
            if kfd == self._wake:
                try:
                    os.eventfd_read(self._wake)     # the hot set is looked at next
                except BlockingIOError:
                    pass
                continue
            if fd is None:
                if kfd in self._kmask:
                    kernel.append((kfd, ev))
                continue
            if fd in seen:
                continue
            seen.add(fd)
            self._looked += 1
            reg, sock = self._live(fd)
            if reg is None:
                continue
            conn = sock._shm
            if conn is None or conn.closed:
                out[fd] = (POLLIN if reg.read else 0) | (POLLOUT if reg.write else 0)
                continue
            _poll.drain(conn, note=False)    # (our own doorbells: no wake-up taken)
            if not reg.armed:
                continue                     # one-shot, already reported: until modify()
            ev = self._events(fd, reg, sock, arm=True)
            if ev:
                out[fd] = ev
                if not (reg.edge or reg.oneshot):
                    self._hot[fd] = None

    def _spin(self, idle: list, deadline: Optional[float]) -> "Optional[_poll._Spun]":
        """Spin on the idle hot connections before arming them, as the
        module's docstring says; the kernel epoll's fd ends the spin."""
        if not idle or any(reg.edge for _, reg, _ in idle):
            return None
        shm = {fd: sock for fd, _, sock in idle}
        read = {fd for fd, reg, _ in idle if reg.read}
        write = {fd for fd, reg, _ in idle if reg.write}
        for fd in list(self._listeners):    # a client of a listener ends the spin too
            reg, sock = self._live(fd)
            if reg is not None and reg.read and reg.armed:
                shm[fd] = sock
                read.add(fd)
        return _poll._spin_first(shm, read, write, [self._ep.fileno()], deadline)

    def _heat_all(self) -> None:
        """Look at (and so arm again) every connection on the next look,
        and remember the wake-up count this answers."""
        self._armed_at = unarmed_count()
        listeners = self._listeners
        self._hot.update(dict.fromkeys(fd for fd in list(self._shm) if fd not in listeners))

    def poll(self, timeout: Optional[float] = None, maxevents: int = -1) -> list[tuple[int, int]]:
        self._check()
        # The stdlib's argument checks, with its errors.
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise TypeError("timeout must be an integer or None")
        if maxevents != -1 and maxevents < 1:
            raise ValueError(f"maxevents must be greater than 0, got {maxevents}")
        me = _get_ident()
        self._pollers.add(me)
        try:
            return self._poll(timeout, maxevents)
        finally:
            self._pollers.discard(me)

    def _poll(self, timeout: Optional[float], maxevents: int) -> list[tuple[int, int]]:
        if timeout is not None and timeout < 0:
            timeout = None
        if self._moving:
            self._settle()
        deadline = _deadline(timeout)
        while not self._shm:
            left = _left(deadline)
            events = self._ep.poll(-1 if left is None else left, maxevents)
            if self._wake < 0 or all(kfd != self._wake for kfd, _ in events):
                return events
            # Another thread registered a shrimpio fd (see _changed).
            self._rung(events, {}, [])
            events = [e for e in events if e[0] != self._wake]
            if events or (deadline is not None and time.monotonic() >= deadline):
                return events
        out: dict[int, int] = {}
        kernel: list = []
        spun = None
        mixed = False
        if unarmed_count() != self._armed_at:
            mixed = self._armed_at >= 0
            self._heat_all()
        idle = self._look(self._hot, False, out)
        self._listening(out)
        if not out and (deadline is None or deadline > time.monotonic()):
            spun = self._spin(idle, deadline)
            if spun is None and idle:
                # The spin found something (or was not tried): look again.
                self._look([fd for fd, _, _ in idle], False, out)
                self._listening(out)
        while True:
            self._look([fd for fd in list(self._hot) if fd not in out], True, out)
            left = _left(deadline)
            wait = 0.0 if out else left
            if mixed and (wait is None or wait > _SLICE):
                wait = _SLICE
            if self._listeners:
                wait = self._wait_listeners(wait, out)
            if wait != 0.0:
                trim_idle(time.monotonic())     # (a drained burst's pages go back)
            events = self._ep.poll(-1 if wait is None else wait)
            if spun is not None:
                spun.slept()
                spun = None
            self._rung(events, out, kernel)
            if unarmed_count() != self._armed_at:
                # Someone else may have taken a wake-up meant for us.
                self._heat_all()
                mixed = True
                if not out and not kernel:
                    continue
            if out or kernel or (deadline is not None and time.monotonic() >= deadline):
                break
        result = [(fd, _to_epoll(ev)) for fd, ev in out.items()]
        for fd in out:
            reg = self._shm.get(fd)
            if reg is not None and reg.oneshot:
                reg.armed = False            # until modify() re-arms it
        result += kernel
        return result if maxevents == -1 else result[:maxevents]

    def _listening(self, out: dict[int, int], fired: Optional[set] = None,
                   kfired: Optional[set] = None) -> None:
        """Listeners with a client to accept go to ``out``.  Without
        ``fired``, only what costs no system call (clients taken ahead);
        with it, the listeners whose fds the kernel reported (``kfired``)
        are asked."""
        for fd in list(self._listeners):
            reg, sock = self._live(fd)
            if reg is None or not reg.read or not reg.armed or fd in out:
                continue
            if fired is None:
                if sock._lst.ready:
                    out[fd] = POLLIN
            elif fd in fired and _poll._ready(sock, True, False, kfired)[0]:
                out[fd] = POLLIN

    def _wait_listeners(self, wait: Optional[float], out: dict[int, int]) -> float:
        """Listeners watch fds that change (the TCP socket, the registry
        socket, clients whose hello has not come): wait on them and on the
        kernel epoll's fd in one real poll.  Listeners that have a client
        go to ``out``; returns the wait left for the epoll itself (0)."""
        p = _poll._real_poll()
        p.register(self._ep.fileno(), POLLIN)
        owner: dict[int, int] = {}
        for fd in list(self._listeners):
            reg, sock = self._live(fd)
            if reg is not None and reg.read and reg.armed:
                for kfd in sock._accept_fds():
                    owner[kfd] = fd
                    p.register(kfd, POLLIN)
        got = p.poll(-1 if wait is None else int(wait * 1000 + 0.999))
        fired = {owner[kfd] for kfd, _ in got if kfd in owner}
        if fired:
            self._listening(out, fired, {kfd for kfd, _ in got})
        return 0.0


def _to_epoll(ev: int) -> int:
    return ((_select.EPOLLIN if ev & POLLIN else 0) | (_select.EPOLLOUT if ev & POLLOUT else 0)
            | (_select.EPOLLHUP if ev & POLLHUP else 0))


_ss.fd_change_hooks.append(fd_changing)
