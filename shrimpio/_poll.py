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

``select`` and ``poll`` arm every shrimpio fd of interest on each call (the
program hands them all in on each call, and the kernel's cost is in
proportion too); ``epoll`` (in _epoll.py) keeps idle registrations armed
between its polls, so that its cost follows the connections that are ready.

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
from typing import Any, Iterable, Optional

from . import socket as _ss
from ._connection import trim_idle
from ._fastpath import drain_bell, ring_arm, rings_slept, spin_rings

__all__ = ["select", "poll", "drain"]  # (and epoll, fd_changing: see __getattr__)

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


def drain(conn: Any, note: bool = True) -> None:
    """Swallow pending doorbell bytes of a connection; note the peer's death.
    ``note``: count it as a wake-up taken from other waiters (see
    ``_fastpath.drain_bell``); the epoll draining its own doorbells does not."""
    data_eof = drain_bell(conn.bell_fd, note)
    space_eof = drain_bell(conn.space.fileno(), note)
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


#: select()'s limit (glibc's fd_set): fds from here on are refused.
_FD_SETSIZE = 1024


def select(rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any],
           timeout: Optional[float] = None) -> tuple[list, list, list]:
    """``select.select`` that understands shrimpio sockets."""
    rlist, wlist, xlist = list(rlist), list(wlist), list(xlist)
    rfds = [_fd_of(o) for o in rlist]
    wfds = [_fd_of(o) for o in wlist]
    xfds = [_fd_of(o) for o in xlist]
    if timeout is not None and not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a float or None")
    if any(fd >= _FD_SETSIZE for fds in (rfds, wfds, xfds) for fd in fds):
        # As the stdlib's, whatever the fd is: a program that falls back to
        # poll() on this error must see it over shared memory too.
        raise ValueError("filedescriptor out of range in select()")
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
        if wait != 0.0:
            trim_idle(time.monotonic())
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


def _poll_many(interest: dict[int, int], timeout: Optional[float],
               maxevents: int) -> list[tuple[int, int]]:
    """select.poll's wait: ``interest`` maps fd -> poll-style mask."""
    shm = {fd: s for fd in interest if (s := _shrimp(fd)) is not None}
    deadline = _deadline(timeout)
    spun = None
    if shm:
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
            r, w, watch = _want(sock, bool(mask & _IN_BITS), bool(mask & _OUT_BITS))
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
        if wait_ms:
            trim_idle(time.monotonic())
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
            ev = (POLLIN if r else 0) | (POLLOUT if w else 0)
            if _hup(sock._shm):                 # POLLHUP whatever was asked
                ev |= POLLHUP
            if ev:
                out[fd] = ev
        if out or (deadline is not None and time.monotonic() >= deadline):
            items = list(out.items())
            return items if maxevents < 0 else items[:maxevents]


def __getattr__(name: str) -> Any:
    # select.epoll is in _epoll.py (it keeps registrations armed between
    # polls), which imports this module's helpers.
    if name in ("epoll", "fd_changing"):
        from . import _epoll
        return getattr(_epoll, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
