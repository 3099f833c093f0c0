"""select / poll / epoll that understand shrimpio sockets.

Theory of operation
-------------------
A shared-memory connection is ready when its *rings* say so, not its fd: the
peer rings the doorbell (one byte on the control socket, or on the space
socket) only when our side has said it sleeps.  So before the kernel waits,
each shrimpio fd of interest is *armed*:

* read interest: if the receive ring holds data or end-of-stream, the fd is
  ready now; else set the ring's reader-sleeping flag (full fence, re-check)
  and let the kernel watch the control socket (the data doorbell, which also
  reports the peer's death as EOF);
* write interest: if the send ring has room, ready now; else set the
  writer-sleeping flag and let the kernel watch the space socket.

Before arming, when nothing is ready, the poller spins on the rings of
interest (and polls the few kernel fds of interest without sleeping) for the
rings' adaptive budget, as a blocking ``recv`` does: a program that polls
before each read would otherwise pay a doorbell and a wake-up per message,
the cost of loopback TCP (``spin_rings`` in _fastpath_poll.pxi says when a
spin cannot pay).  If anything was ready at arming time, the kernel is asked
with a zero timeout only.  After the kernel returns, doorbell bytes are drained, the rings
are asked again, and only what the rings confirm is reported: level-triggered,
and no spurious readiness (a non-blocking ``recv`` after ``select`` says
readable does not raise ``BlockingIOError``).  A listener is ready when its TCP
socket or its registry socket has a connection waiting.

What a registered fd is, is decided at poll time: ``epoll`` keeps each
registration where it belongs now (a socket registered before its
``connect()``/``listen()`` is watched as what it became; ``fd_changing``
takes a kernel registration out before ``dup2`` replaces its file), and
honours ``EPOLLONESHOT`` and ``EPOLLET`` for shrimpio fds too.

A connection whose ring the peer broke (``RingCorruptedError``) is
reported ready for whatever was asked, so that its own ``recv``/``send``
raise; the poller itself never raises for one connection's sake.

Everything that is not a shrimpio socket goes to the kernel unchanged.
"""

from __future__ import annotations

import errno
import math
import select as _select
import time
import weakref
from typing import Any, Iterable, Optional

from . import socket as _ss
from ._fastpath import drain_bell, ring_arm, ring_progress, rings_slept, spin_rings

__all__ = ["select", "poll", "epoll", "drain"]

_real_select = _select.select
_real_poll = _select.poll
_real_epoll = getattr(_select, "epoll", None)

POLLIN = _select.POLLIN
POLLOUT = _select.POLLOUT
POLLERR = _select.POLLERR
POLLHUP = _select.POLLHUP
POLLPRI = _select.POLLPRI
_IN_BITS = POLLIN | POLLPRI | getattr(_select, "POLLRDNORM", 0)
_OUT_BITS = POLLOUT | getattr(_select, "POLLWRNORM", 0)


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int):
        fd = obj
    else:
        try:
            fd = obj.fileno()
        except AttributeError:
            raise TypeError("argument must be an int, or have a fileno() method.") from None
        if not isinstance(fd, int):
            raise TypeError("fileno() returned a non-integer")
    if fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def _shrimp(fd: int) -> Any:
    """The shrimpio socket behind ``fd`` if it is a listener or an shm
    connection, else None."""
    sock = _ss._by_fd.get(fd)
    if sock is None or sock.fileno() != fd:
        return None
    if sock._shm is not None and not sock._shm.closed:
        return sock
    if sock._lst is not None:
        return sock
    return None


def drain(conn: Any) -> None:
    """Swallow pending doorbell bytes of a connection; note the peer's death."""
    data_eof = drain_bell(conn.bell_fd)
    space_eof = drain_bell(conn.space.fileno())
    # After our own shutdown(SHUT_RD) the control socket reports EOF (that is
    # how blocked readers are woken): not a sign of the peer's death, which
    # the space socket still reports.
    if data_eof and conn.rd_shut:
        data_eof = False
    if data_eof or space_eof:
        conn.gone = True


def _want(sock: Any, read: bool, write: bool,
          always: bool = False) -> tuple[bool, bool, list[tuple[int, int]]]:
    """Arm ``sock`` for the interests given.  Returns (readable now, writable
    now, [(kernel fd, POLLIN)...] to watch if nothing is ready).  ``always``
    (edge-triggered): arm and watch even what is ready, for its next change."""
    lst = sock._lst
    if lst is not None:
        if read and lst.ready:
            return True, False, []
        return False, False, ([(fd, POLLIN) for fd in sock._accept_fds()] if read else [])
    conn = sock._shm
    r = w = False
    watch: list[tuple[int, int]] = []
    if conn.gone:
        return read, write, []
    try:
        if read:
            if conn.rd_shut or ring_arm(conn.rx, False, always):
                r = True
            if not r or always:
                watch.append((conn.bell_fd, POLLIN))
        if write:
            if ring_arm(conn.tx, True, always):
                w = True
            if not w or always:
                watch.append((conn.space.fileno(), POLLIN))
                watch.append((conn.bell_fd, POLLIN))     # EOF there = peer gone
    except (OSError, ValueError):
        # A broken ring (the peer wrote impossible values) or one closed
        # under us: ready, so that the socket's own call raises; never
        # the poller's, which watches other connections too.
        return read, write, []
    return r, w, watch


def _ready(sock: Any, read: bool, write: bool,
           fired: Optional[set[int]] = None) -> tuple[bool, bool]:
    """After the kernel wait: what the rings confirm.  Drains the doorbells
    of the connection if the kernel said one of them is readable (``fired``:
    the kernel fds with events; None: drain regardless): a byte not drained
    now keeps its fd readable, and the next wait drains it."""
    lst = sock._lst
    if lst is not None:
        if not read:
            return False, False
        # A TCP client waiting, or a shared-memory one whose hello came:
        # one that only connected to the registry entry is not acceptable
        # yet (accept() would say EAGAIN), so the listener takes it now.
        # (What the kernel wait said, when there was one: no second poll.)
        if lst.ready or (_real_poll_once([sock.fileno()]) if fired is None
                         else sock.fileno() in fired):
            return True, False
        if (_real_poll_once(lst.watch_fds()) if fired is None
                else any(fd in fired for fd in lst.watch_fds())):
            try:
                return lst.acceptable(), False
            except OSError:
                return True, False          # let accept() raise it
        return False, False
    conn = sock._shm
    if conn is None or conn.closed:
        return read, write            # closed under us: let the call raise EBADF
    if fired is None or conn.bell_fd in fired or conn.space.fileno() in fired:
        drain(conn)
    if conn.gone:
        return read, write
    try:
        r = read and (conn.rd_shut or conn.rx.readable() > 0 or conn.rx.at_eof())
        w = write and (conn.tx.free() > 0 or conn.tx.read_shut)
    except (OSError, ValueError):     # broken or closed: as in _want
        return read, write
    return r, w


def _hup(conn: Any) -> bool:
    """POLLHUP as Linux TCP reports it: only once *both* directions are
    finished (end of stream from the peer, or its death, or our SHUT_RD;
    and our own write side shut).  Not merely "the peer closed": TCP then
    says POLLIN only, and poll loops that drop a connection on POLLHUP
    before reading would lose the peer's last bytes."""
    if conn is None or conn.closed:
        return False
    try:
        return conn.tx.write_shut and (conn.rd_shut or conn.gone or conn.rx.at_eof())
    except (OSError, ValueError):   # closed under us, or broken (reported ready)
        return False


class _Spun:
    """The rings a poller spun on, to adapt their budgets after its wait."""

    __slots__ = ("rings", "writables", "t0")

    def __init__(self, rings: list, writables: list, t0: float) -> None:
        self.rings, self.writables, self.t0 = rings, writables, t0

    def slept(self) -> None:
        rings_slept(self.rings, self.writables, time.monotonic() - self.t0)


def _spin_first(shm: dict[int, Any], read: set[int], write: set[int], kfds: list[int],
                deadline: Optional[float]) -> Optional[_Spun]:
    """Spin before a poller's first arming (see the module's docstring).
    ``shm``: fd -> shrimpio socket, with ``read``/``write`` interests;
    ``kfds``: the kernel fds of read interest.  Returns what to adapt after
    the kernel wait when the spin found nothing; None when something is
    ready (the arming pass reports it) or no spin was tried."""
    left = _left(deadline)
    if left is not None and left <= 0:
        return None
    rings: list = []
    writables: list = []
    kernel = list(kfds)
    for fd, sock in shm.items():
        lst = sock._lst
        if lst is not None:
            if fd in read:
                if lst.ready:
                    return None
                kernel.extend(sock._accept_fds())
            continue
        conn = sock._shm
        if conn.gone or conn.rd_shut:
            return None
        if fd in read:
            rings.append(conn.rx)
            writables.append(False)
        if fd in write:
            rings.append(conn.tx)
            writables.append(True)
    if not rings:
        return None
    t0 = time.monotonic()
    try:
        if spin_rings(rings, writables, kernel, -1.0 if left is None else left) != -1:
            return None
    except (OSError, ValueError, TypeError):
        return None          # closed or broken under us: the arming pass says so
    return _Spun(rings, writables, t0)


def _real_poll_once(fds: list[int]) -> bool:
    p = _real_poll()
    for fd in fds:
        p.register(fd, POLLIN)
    return bool(p.poll(0))


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be an integer or None")
    if math.isnan(timeout):
        raise ValueError("Invalid value NaN (not a number)")
    if timeout < 0:
        raise ValueError("timeout must be non-negative")
    return time.monotonic() + timeout


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# ---------------------------------------------------------------------------
# select.select


def select(rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any],
           timeout: Optional[float] = None) -> tuple[list, list, list]:
    """``select.select`` that understands shrimpio sockets."""
    rlist, wlist, xlist = list(rlist), list(wlist), list(xlist)
    rfds = [_fd_of(o) for o in rlist]
    wfds = [_fd_of(o) for o in wlist]
    xfds = [_fd_of(o) for o in xlist]
    shm = {fd: _shrimp(fd) for fd in set(rfds) | set(wfds)}
    shm = {fd: s for fd, s in shm.items() if s is not None}
    if not shm:
        return _real_select(rlist, wlist, xlist, timeout)
    deadline = _deadline(timeout)
    plain_r = [fd for fd in rfds if fd not in shm]
    plain_w = [fd for fd in wfds if fd not in shm]
    spun = None if plain_w else _spin_first(shm, set(rfds), set(wfds), plain_r, deadline)
    while True:
        now_r, now_w, kr = set(), set(), set()
        for fd, sock in shm.items():
            r, w, watch = _want(sock, fd in rfds, fd in wfds)
            if r:
                now_r.add(fd)
            if w:
                now_w.add(fd)
            kr.update(k for k, _ in watch)
        wait = 0.0 if (now_r or now_w) else _left(deadline)
        try:
            kr_ready, kw_ready, kx_ready = _real_select(plain_r + sorted(kr), plain_w, xfds, wait)
        except BaseException:
            for sock in shm.values():
                _ready(sock, False, False)
            raise
        if spun is not None:
            spun.slept()
            spun = None
        got_r = {fd for fd in plain_r if fd in kr_ready}
        got_w = set(kw_ready)
        fired = set(kr_ready) | set(kw_ready)
        for fd, sock in shm.items():
            r, w = _ready(sock, fd in rfds, fd in wfds, fired)
            if r:
                got_r.add(fd)
            if w:
                got_w.add(fd)
        got_x = set(kx_ready)
        if got_r or got_w or got_x or (deadline is not None and time.monotonic() >= deadline):
            return ([o for o, fd in zip(rlist, rfds) if fd in got_r],
                    [o for o, fd in zip(wlist, wfds) if fd in got_w],
                    [o for o, fd in zip(xlist, xfds) if fd in got_x])


# ---------------------------------------------------------------------------
# select.poll


class poll:
    """``select.poll`` that understands shrimpio sockets."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: Any, eventmask: int = POLLIN | POLLPRI | POLLOUT) -> None:
        self._fds[_fd_of(fd)] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        fd = _fd_of(fd)
        if fd not in self._fds:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        self._fds[fd] = eventmask

    def unregister(self, fd: Any) -> None:
        del self._fds[_fd_of(fd)]

    def poll(self, timeout: Optional[float] = None) -> list[tuple[int, int]]:
        if timeout is not None:
            if not isinstance(timeout, (int, float)):
                raise TypeError("timeout must be an integer or None")
            timeout = None if timeout < 0 else timeout / 1000.0
        return _poll_many(self._fds, timeout, -1)


def _poll_many(interest: dict[int, int], timeout: Optional[float], maxevents: int,
               regs: "Optional[dict[int, _Reg]]" = None) -> list[tuple[int, int]]:
    """Shared by poll and epoll: ``interest`` maps fd -> poll-style mask.
    ``regs`` (epoll): the shm fds' registrations, for edge-triggered ones."""
    shm = {fd: s for fd in interest if (s := _shrimp(fd)) is not None}
    deadline = _deadline(timeout)
    spun = None
    if shm and not (regs and any(r.edge for r in regs.values())):
        plain = [(fd, m) for fd, m in interest.items() if fd not in shm]
        if not any(m & _OUT_BITS for _, m in plain):
            spun = _spin_first(shm, {fd for fd in shm if interest[fd] & _IN_BITS},
                               {fd for fd in shm if interest[fd] & _OUT_BITS},
                               [fd for fd, m in plain if m & _IN_BITS], deadline)
    while True:
        kernel = _real_poll()
        now: dict[int, int] = {}
        owners: dict[int, list[int]] = {}
        for fd, mask in interest.items():
            sock = shm.get(fd)
            if sock is None:
                kernel.register(fd, mask)
                continue
            reg = regs.get(fd) if regs else None
            edge = reg is not None and reg.edge and sock._shm is not None
            r, w, watch = _want(sock, bool(mask & _IN_BITS), bool(mask & _OUT_BITS), edge)
            if edge:
                r, w = reg.news(sock._shm, r, w, peek=True)
            ev = (POLLIN if r else 0) | (POLLOUT if w else 0)
            if ev:
                now[fd] = ev
            for kfd, kmask in watch:
                owners.setdefault(kfd, []).append(fd)
        for kfd in owners:
            # A listener watches its own fd (TCP clients) besides its registry
            # socket: that fd is in `interest` but, being a shrimpio fd, was
            # not registered above.
            if kfd not in interest or kfd in shm:
                kernel.register(kfd, POLLIN)
        left = _left(deadline)
        wait_ms = 0 if now else (-1 if left is None else math.ceil(left * 1000))
        try:
            events = kernel.poll(wait_ms)
        except BaseException:
            for sock in shm.values():
                _ready(sock, False, False)
            raise
        if spun is not None:
            spun.slept()
            spun = None
        out: dict[int, int] = {}
        fired = set()
        for kfd, ev in events:
            fired.add(kfd)
            if kfd in interest and kfd not in shm:
                out[kfd] = ev
        for fd, sock in shm.items():
            mask = interest[fd]
            r, w = _ready(sock, bool(mask & _IN_BITS), bool(mask & _OUT_BITS), fired)
            reg = regs.get(fd) if regs else None
            if reg is not None and reg.edge and sock._shm is not None:
                r, w = reg.news(sock._shm, r, w)
            ev = (POLLIN if r else 0) | (POLLOUT if w else 0)
            # POLLHUP whatever was asked; edge-triggered, only with an edge.
            if (ev or reg is None or not reg.edge) and _hup(sock._shm):
                ev |= POLLHUP
            if ev:
                out[fd] = ev
        if out or (deadline is not None and time.monotonic() >= deadline):
            items = list(out.items())
            return items if maxevents < 0 else items[:maxevents]


# ---------------------------------------------------------------------------
# select.epoll


class _Reg:
    """An epoll registration of a shrimpio fd: its mask, the connection or
    listener it was made for (a registration outlives neither: the stdlib's
    epoll forgets an fd when its file closes), its one-shot state, and the
    last edges reported (edge-triggered)."""

    __slots__ = ("mask", "ref", "armed", "edge", "oneshot", "last_r", "last_w")

    def __init__(self, mask: int, sock: Any) -> None:
        self.ref = weakref.ref(sock._shm if sock._shm is not None else sock._lst)
        self.set_mask(mask)

    def set_mask(self, mask: int) -> None:
        self.mask = mask
        self.armed = True
        self.edge = bool(mask & _EPOLLET)
        self.oneshot = bool(mask & _EPOLLONESHOT)
        self.last_r = self.last_w = None

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


_EPOLLET = getattr(_select, "EPOLLET", 1 << 31)
_EPOLLONESHOT = getattr(_select, "EPOLLONESHOT", 1 << 30)

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
    read, shut or death."""

    def __init__(self, sizehint: int = -1, flags: int = 0) -> None:
        self._ep = _real_epoll(sizehint, flags)
        self._shm: dict[int, _Reg] = {}      # shrimpio fd -> registration
        self._kmask: dict[int, int] = {}     # fds registered in the kernel epoll (maybe stale)
        self._moving: dict[int, int] = {}    # taken out of the kernel by fd_changing: fd -> mask
        _epolls.add(self)

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def close(self) -> None:
        self._ep.close()
        self._shm.clear()
        self._kmask.clear()
        self._moving.clear()
        _epolls.discard(self)

    def __enter__(self) -> "epoll":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self) -> None:
        if self._ep.closed:
            raise ValueError("I/O operation on closed epoll object")

    def _live(self, fd: int) -> "Optional[_Reg]":
        """fd's shrimpio registration if it still stands (else it is
        forgotten: the file it was made for is gone)."""
        reg = self._shm.get(fd)
        if reg is None:
            return None
        sock = _shrimp(fd)
        if sock is not None and reg.is_for(sock):
            return reg
        del self._shm[fd]
        return None

    def register(self, fd: Any, eventmask: int = _select.EPOLLIN | _select.EPOLLPRI | _select.EPOLLOUT) -> None:
        self._check()
        fd = _fd_of(fd)
        sock = _shrimp(fd)
        if sock is not None:
            if self._live(fd) is not None or fd in self._moving:
                raise FileExistsError(errno.EEXIST, "File exists")
            self._shm[fd] = _Reg(eventmask, sock)
            self._kmask.pop(fd, None)
            return
        self._live(fd)
        if fd in self._moving:
            raise FileExistsError(errno.EEXIST, "File exists")
        self._ep.register(fd, eventmask)
        self._kmask[fd] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        self._check()
        fd = _fd_of(fd)
        reg = self._live(fd)
        if reg is not None:
            reg.set_mask(eventmask)
            return
        if fd in self._moving:
            self._moving[fd] = eventmask
            return
        self._ep.modify(fd, eventmask)
        self._kmask[fd] = eventmask

    def unregister(self, fd: Any) -> None:
        self._check()
        fd = _fd_of(fd)
        if self._live(fd) is not None:
            del self._shm[fd]
            return
        if self._moving.pop(fd, None) is not None:
            return
        self._ep.unregister(fd)
        self._kmask.pop(fd, None)

    def _fd_changing(self, fd: int) -> None:
        if self._ep.closed:
            return
        reg = self._live(fd)
        if reg is not None:                  # a shrimpio fd about to be a kernel one
            del self._shm[fd]
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
                self._shm[fd] = _Reg(mask, sock)
                continue
            try:                             # still (or again) a kernel socket
                self._ep.register(fd, mask)
                self._kmask[fd] = mask
            except OSError:
                pass                         # closed meanwhile: forgotten, as by the kernel

    def poll(self, timeout: Optional[float] = None, maxevents: int = -1) -> list[tuple[int, int]]:
        self._check()
        if timeout is not None and timeout < 0:
            timeout = None
        if self._moving:
            self._settle()
        live = {fd: reg for fd in list(self._shm) if (reg := self._live(fd)) is not None}
        live = {fd: reg for fd, reg in live.items() if reg.armed}
        if not live:
            return self._ep.poll(-1 if timeout is None else timeout, maxevents)
        # The kernel fds of the epoll join as one more pollable fd.
        interest = {fd: _to_poll(reg.mask) for fd, reg in live.items()}
        if self._kmask:
            interest[self._ep.fileno()] = POLLIN
        events = _poll_many(interest, timeout, -1, live)
        out = []
        for fd, ev in events:
            if fd == self._ep.fileno():
                continue
            reg = live[fd]
            if reg.oneshot:
                reg.armed = False            # until modify() re-arms it
            out.append((fd, _to_epoll(ev)))
        if any(fd == self._ep.fileno() for fd, _ in events):
            out += self._ep.poll(0, maxevents)
        return out if maxevents is None or maxevents < 0 else out[:maxevents]


def _to_poll(mask: int) -> int:
    return ((POLLIN if mask & (_select.EPOLLIN | _select.EPOLLPRI) else 0)
            | (POLLOUT if mask & _select.EPOLLOUT else 0))


def _to_epoll(ev: int) -> int:
    return ((_select.EPOLLIN if ev & POLLIN else 0) | (_select.EPOLLOUT if ev & POLLOUT else 0)
            | (_select.EPOLLHUP if ev & POLLHUP else 0))


_ss.fd_change_hooks.append(fd_changing)
