"""When a connection's fd leaves shrimpio's hands: escape to a kernel stream.

Theory of operation
-------------------
A shared-memory connection's ``fileno()`` is its control socket (the data
doorbell).  It is a faithful stand-in only while shrimpio's own calls and
pollers touch the connection.  Code that reads or writes the fd itself
(``multiprocessing.connection`` after ``detach()``, an fd sent to another
process with ``SCM_RIGHTS``, an fd given to an exec'd program, a C library
such as OpenSSL reading it) would see doorbell bytes, not the stream.

So when shrimpio sees the fd leave (``detach()``, ``sendmsg`` with the fd in
``SCM_RIGHTS``, ``subprocess`` with it as a standard stream or in
``pass_fds``), the connection *escapes*: :func:`escape` makes a connected
pair of kernel stream sockets (loopback TCP of the connection's family, or a
Unix socketpair where loopback is unusable), ``dup2``-s one end (the *app
end*) over every fd of this process that refers to the control socket, and
hands the other end (the *relay end*) with the connection to this process's
relay thread.  The fd numbers never change; from then on they are real
kernel sockets, honest to every poller and to raw reads and writes.

The relay copies, in both directions, between the relay end and the rings:
bytes already in the receive ring when the fd escaped come first, in order,
then whatever the peer writes later; what the program writes to the fd goes
into the send ring.  End of stream and the peer's death travel as a
shutdown of the relay end; the program closing the fd travels to the peer as
a shut ring (EOF) and a closed reading side (the peer's writes fail with
``EPIPE``).  The peer notices nothing: it stays on shared memory.

The socket objects of the connection become kernel sockets whose path is
``"tcp"`` with the reason ``"fd escaped: <why>"`` (``shrimpio.info``,
``SHRIMPIO_REPORT``); their addresses stay the emulated TCP ones.  A socket
object made on the escaped fd (``socket.socket(fileno=fd)``) *before any
byte moved* takes the connection back onto shared memory (:func:`reclaim`),
so ``socket.socket(fileno=sock.detach())`` costs nothing.

The relay lives in the process that held the connection: an escaped fd
handed to another process works while this one runs.
"""

from __future__ import annotations

import fcntl
import os
import socket as _std
import _socket as _csocket
import sys
import _thread
import time
from typing import Any, Callable, Optional

from ._fastpath import drain_bell, ring_arm

__all__ = ["escape", "escape_conn", "escaped", "reclaim", "relay_count", "shared", "Escaped"]

def _originals() -> tuple[Callable[..., Any], Callable[[], Any], Callable[[float], None]]:
    """The real thread primitives: the relay is an OS thread even where
    gevent's monkey-patching made threads greenlets (a greenlet relay would
    block every greenlet in its poll)."""
    mon = sys.modules.get("gevent.monkey")
    if mon is not None and mon.is_module_patched("threading"):
        return (mon.get_original("_thread", "start_new_thread"),
                mon.get_original("_thread", "allocate_lock"),
                mon.get_original("time", "sleep"))
    return _thread.start_new_thread, _thread.allocate_lock, time.sleep


# Taken when shrimpio is imported (under ``shrimpio run``, before any
# monkey-patching).
_start_thread, _allocate_lock, _sleep = _originals()

_AF_INET, _AF_INET6, _AF_UNIX = int(_std.AF_INET), int(_std.AF_INET6), int(_std.AF_UNIX)
_STREAM = int(_std.SOCK_STREAM)
_DONTWAIT = int(_std.MSG_DONTWAIT)
_CHUNK = 64 * 1024
_POLLIN, _POLLOUT = 0x001, 0x004


class Escaped:
    """What a socket object made on an escaped fd needs to know: the
    connection's emulated addresses and family, why it escaped, and the
    relay (to take the connection back if nothing moved yet)."""

    __slots__ = ("family", "local", "peer", "why", "relay", "reclaimable", "forks", "__weakref__")

    def __init__(self, family: int, local: tuple, peer: tuple, why: str, relay: "_Relayed") -> None:
        self.family = family
        self.local = local
        self.peer = peer
        self.why = why
        self.relay = relay
        self.reclaimable = False
        self.forks = 0

    @property
    def reason(self) -> str:
        return f"fd escaped: {self.why}"


#: (st_dev, st_ino) of an app end -> its Escaped, while the relay runs.
escaped: "dict[tuple[int, int], Escaped]" = {}


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _fds_of(inode: tuple[int, int], skip: int) -> list[int]:
    """Every fd of this process whose file is the socket ``inode``, except
    ``skip`` (found through /proc: bare ``os.dup`` copies included)."""
    want = f"socket:[{inode[1]}]"
    out = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        fd = int(name)
        if fd == skip:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{name}") != want:
                continue
            if _inode(fd) == inode:
                out.append(fd)
        except OSError:
            continue
    return out


def kernel_pair(family: int) -> tuple[_csocket.socket, _csocket.socket]:
    """A connected pair of kernel stream sockets: loopback TCP of ``family``
    (so that the escaped fd is a real TCP socket to whoever inspects it), or
    a Unix socketpair if loopback cannot be used."""
    if family in (_AF_INET, _AF_INET6):
        host = "::1" if family == _AF_INET6 else "127.0.0.1"
        lst = app = None
        try:
            lst = _csocket.socket(family, _STREAM)
            lst.bind((host, 0))
            lst.listen(1)
            app = _csocket.socket(family, _STREAM)
            app.connect(lst.getsockname())
            fd, _addr = lst._accept()
            relay = _csocket.socket(family, _STREAM, 0, fd)
            for s in (app, relay):
                s.setsockopt(_std.IPPROTO_TCP, _std.TCP_NODELAY, 1)
            return app, relay
        except OSError:
            if app is not None:
                app.close()
        finally:
            if lst is not None:
                lst.close()
    return _csocket.socketpair(_AF_UNIX, _STREAM)


def escape(sock: Any, why: str) -> bool:
    """Put the shared-memory connection of the shrimpio socket ``sock`` on a
    kernel stream in place (see the module docstring).  False if ``sock``
    has no shared-memory connection (nothing to do)."""
    conn = sock._shm
    if conn is None or conn.closed:
        return False
    return escape_conn(conn, why, sock.fileno())


def escape_conn(conn: Any, why: str, fd: int = -1) -> bool:
    """:func:`escape` for a connection found by its fd (``fd``, if known,
    is one of its fds; the others are found through /proc)."""
    if conn.closed:
        return False
    from . import _connection, socket as _ss     # (socket imports this module)
    family = _AF_INET6 if len(conn.local) == 4 else _AF_INET
    if not conn.bell_owned:
        # The doorbell was one of the program's fds, which are about to be
        # the kernel stream's: the relay keeps an fd of its own.
        conn.set_bell(os.dup(conn.bell_fd), owned=True)
    bell_inode = _inode(conn.bell_fd)
    fds = _fds_of(bell_inode, conn.bell_fd)
    # No fd of ours stands for the control socket any more: nothing may
    # adopt the connection by that inode.
    _ss._detached.pop(bell_inode, None)
    if _ss._by_inode.get(bell_inode) is conn:
        del _ss._by_inode[bell_inode]
    if fd >= 0 and fd not in fds:
        fds.append(fd)
    app, relay_end = kernel_pair(family)
    try:
        # The app end takes the blocking mode the program's fds had (one
        # file description: they were dups of each other).
        nonblock = bool(fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_NONBLOCK) if fds else False
        app.setblocking(not nonblock)
        for one in fds:
            if _ss.fd_change_hooks:
                _ss._fd_changing(one)        # patched epolls let go of the old file
            os.dup2(app.fileno(), one, inheritable=os.get_inheritable(one))
    finally:
        app_inode = _inode(app.fileno())
        app.close()
    relay_end.setblocking(False)
    # The socket objects of this connection now stand for kernel sockets.
    objects = [o for one in fds if (o := _ss._by_fd.get(one)) is not None and o._shm is conn]
    with conn.lock:
        conn.refs = 1                    # the relay's, from now on
    r = _Relayed(conn, relay_end, app_inode)
    info = Escaped(family, conn.local, conn.peer, why, r)
    # Taking the connection back is safe only for a detach() in a process
    # that has not forked since (nobody else can hold the fd).
    info.reclaimable = why == "detach()"
    info.forks = _connection.forks
    r.info = info
    escaped[app_inode] = info
    for o in objects:
        o._escape_done(info)
    _relay_add(r)
    return True


def shared(fd: int) -> None:
    """The escaped fd ``fd`` goes to another process: its connection can no
    longer be taken back (see reclaim)."""
    try:
        info = escaped.get(_inode(fd))
    except OSError:
        return
    if info is not None:
        info.reclaimable = False


def reclaim(inode: tuple[int, int], fd: int) -> Any:
    """A socket object is being made on the escaped fd ``fd``: if no byte
    moved through the relay yet, stop it, put the control socket back on
    ``fd`` and return the connection (the object adopts it, on shared
    memory again); else None (the object is a kernel socket)."""
    info = escaped.get(inode)
    if info is None or not info.reclaimable:
        return None
    from . import _connection
    if info.forks != _connection.forks or _fds_of(inode, fd):
        return None          # a child, or another fd of ours, may use it
    relay = _relay()
    return None if relay is None else relay.take_back(info.relay, fd)


def relay_count() -> int:
    """Connections this process's relay serves (for tests and diagnostics)."""
    r = _relay()
    return 0 if r is None else len(r.active)


# -- the relay ---------------------------------------------------------------


class _Relayed:
    """One escaped connection: its rings on one side, the relay end of the
    kernel pair on the other."""

    def __init__(self, conn: Any, end: _csocket.socket, app_inode: tuple[int, int]) -> None:
        self.conn = conn
        self.end = end
        self.app_inode = app_inode
        self.info: Optional[Escaped] = None
        self.out = b""             # from the ring, not yet written to the end
        self.rx_done = False       # ring -> end finished (EOF passed on, or the app is gone)
        self.tx_done = False       # end -> ring finished
        self.moved = 0             # bytes relayed either way
        self.want_end = 0          # poll events wanted on the end
        self.want_bell = False     # the receive ring is armed
        self.want_space = False    # the send ring is armed
        self.reported = False

    # ring -> kernel
    def _pump_rx(self) -> None:
        conn, end = self.conn, self.end
        buf = bytearray(_CHUNK)
        while not self.rx_done:
            if self.out:
                try:
                    n = end.send(self.out, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    self.want_end |= _POLLOUT
                    return
                except OSError:
                    # The program closed its end: nobody will read what the
                    # peer sends; its writes fail, as after a TCP reset.
                    self._rx_finish(close_read=True)
                    return
                self.out = self.out[n:]
                self.moved += n
                continue
            try:
                n = conn.stream.recv_into(buf, 0, 0, 0.0)
            except (BlockingIOError, InterruptedError):
                if conn.gone:
                    self._eof_to_app()
                    return
                try:
                    if ring_arm(conn.rx, False):
                        continue
                except (OSError, ValueError):
                    self._eof_to_app()
                    return
                self.want_bell = True
                return
            except (OSError, ValueError):
                self._eof_to_app()         # a broken ring: the stream ends here
                return
            if n == 0:
                self._eof_to_app()
                return
            self.out = bytes(buf[:n])

    def _eof_to_app(self) -> None:
        try:
            self.end.shutdown(_std.SHUT_WR)
        except OSError:
            pass
        self._rx_finish(close_read=False)

    def _rx_finish(self, close_read: bool) -> None:
        self.rx_done = True
        self.out = b""
        if close_read:
            try:
                self.conn.rx.close_read()
            except (OSError, ValueError):
                pass

    # kernel -> ring
    def _pump_tx(self) -> None:
        conn, end = self.conn, self.end
        while not self.tx_done:
            try:
                if conn.tx.read_shut or conn.gone:
                    # Nobody reads on the other side: what the program
                    # writes can go nowhere (it gets EPIPE once the end closes).
                    self.tx_done = True
                    return
                room = conn.tx.free()
            except (OSError, ValueError):
                self.tx_done = True
                return
            if room == 0:
                try:
                    if ring_arm(conn.tx, True):
                        continue
                except (OSError, ValueError):
                    self.tx_done = True
                    return
                self.want_space = True
                return
            try:
                data = end.recv(min(room, _CHUNK), _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self.want_end |= _POLLIN
                return
            except OSError:
                data = b""
            if not data:
                try:
                    conn.tx.shutdown_write()       # the peer reads EOF
                except (OSError, ValueError):
                    pass
                self.tx_done = True
                return
            try:
                conn.stream.sendall(data, 0, 0.0)
            except (OSError, ValueError):
                self.tx_done = True
                return
            self.moved += len(data)

    def pump(self) -> bool:
        """Move what can move now; arm what must be waited for.  True when
        both directions are over (the relay then lets the connection go)."""
        self.want_end = 0
        self.want_bell = self.want_space = False
        conn = self.conn
        if drain_bell(conn.bell_fd) or drain_bell(conn.space.fileno()):
            conn.gone = True
        self._pump_rx()
        self._pump_tx()
        return self.rx_done and self.tx_done

    def poll_fds(self) -> list[tuple[int, int]]:
        conn = self.conn
        out = []
        if self.want_end:
            out.append((self.end.fileno(), self.want_end))
        # The data doorbell also says the peer died (EOF): always watched
        # while anything is left to do.
        out.append((conn.bell_fd, _POLLIN))
        if self.want_space:
            out.append((conn.space.fileno(), _POLLIN))
        return out

    def finish(self) -> None:
        """Both directions are over: let the program's end see the close,
        and release the connection."""
        escaped.pop(self.app_inode, None)
        # Swallow what the program wrote and nobody will read, so that the
        # close is a clean end of stream for it rather than a reset that
        # could discard bytes it has not read yet.
        try:
            while self.end.recv(_CHUNK, _DONTWAIT):
                pass
        except OSError:
            pass
        self.end.close()
        self.report()
        self.conn.release()

    def report(self) -> None:
        """The SHRIMPIO_REPORT line of the connection (once): its socket
        objects do not write one after the escape, the relay does."""
        if self.reported or self.info is None or not os.environ.get("SHRIMPIO_REPORT"):
            return
        self.reported = True
        conn = self.conn
        from ._report import connection_closing
        connection_closing({"path": "tcp", "reason": self.info.reason, "local": conn.local,
                            "peer": conn.peer, "bytes_sent": conn.bytes_sent,
                            "bytes_received": conn.bytes_received})


class _Relay:
    """This process's relay thread: one thread for every escaped connection,
    running while there is one (it ends, and its fds close, when the last
    connection is let go)."""

    def __init__(self) -> None:
        self.active: list[_Relayed] = []
        self.lock = _allocate_lock()          # guards active and stopped
        self.pass_lock = _allocate_lock()     # held while a pass runs
        self.passes = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pid = os.getpid()
        self.stopped = False

    def start(self) -> None:
        _start_thread(self._run, ())

    def _poke(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass

    def wait_pass(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the relay's next pass to end."""
        seen = self.passes
        self._poke()
        deadline = time.monotonic() + timeout
        while self.passes == seen and not self.stopped and time.monotonic() < deadline:
            with self.pass_lock:
                pass
            if self.passes == seen:
                _sleep(0.0005)

    def take_back(self, r: _Relayed, fd: int) -> Any:
        """Stop relaying ``r`` if nothing moved through it yet (see reclaim)."""
        with self.pass_lock, self.lock:
            if r not in self.active or r.moved or r.out:
                return None
            # What the program wrote since the escape, not relayed yet, and
            # what the relay wrote to it, not read yet: anything there means
            # bytes moved, and the stream cannot be put back.
            try:
                if _pending(r.end.fileno()) or _pending(fd):
                    return None
            except OSError:
                return None
            self.active.remove(r)
        escaped.pop(r.app_inode, None)
        conn = r.conn
        os.dup2(conn.bell_fd, fd, inheritable=os.get_inheritable(fd))
        conn.set_bell(fd, owned=False)       # (the relay's own fd goes)
        r.end.close()
        with conn.lock:
            conn.refs = 0                    # the adopting object counts itself
        self._poke()                         # (stops if that was the last one)
        return conn

    def _pass(self) -> list[_Relayed]:
        """Pump every connection once; let go of the finished ones.  Returns
        those left."""
        with self.pass_lock:
            with self.lock:
                batch = list(self.active)
            done = []
            for r in batch:
                try:
                    if r.pump():
                        done.append(r)
                except Exception:         # one broken connection must not stop the others
                    r.rx_done = r.tx_done = True
                    done.append(r)
            for r in done:
                with self.lock:
                    if r in self.active:
                        self.active.remove(r)
                try:
                    r.finish()
                except Exception:
                    pass
            self.passes += 1
        return [r for r in batch if r not in done]

    def _run(self) -> None:
        while True:
            live = self._pass()
            with self.lock:
                if not self.active:
                    self.stopped = True
                    os.close(self.wake_r)
                    os.close(self.wake_w)
                    return
            p = _real_poll()
            p.register(self.wake_r, _POLLIN)
            for r in live:
                for fd, ev in r.poll_fds():
                    p.register(fd, ev)
            try:
                p.poll(1000)
            except InterruptedError:
                pass
            try:
                while os.read(self.wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass


_the_relay: Optional[_Relay] = None
_relay_lock = _allocate_lock()


def _relay_add(r: _Relayed) -> None:
    """Give ``r`` to this process's relay, starting one if none runs."""
    global _the_relay
    with _relay_lock:
        relay = _the_relay
        if relay is not None and relay.pid == os.getpid():
            with relay.lock:
                if not relay.stopped:
                    relay.active.append(r)
                    relay._poke()
                    return
        relay = _the_relay = _Relay()
        relay.active.append(r)
        _hook_exit()
        relay.start()


def _relay() -> Optional[_Relay]:
    """This process's running relay, if any."""
    r = _the_relay
    return r if r is not None and r.pid == os.getpid() and not r.stopped else None


def flush(stall: float = 2.0) -> None:
    """Before this process exits: let the relay pass on what the program
    wrote to escaped fds (a kernel socket would deliver it after the exit;
    the relay dies with the process).  Returns once nothing is left to pass
    on, or when the peers took nothing for ``stall`` seconds."""
    r = _the_relay
    if r is None or r.pid != os.getpid():
        return
    last, last_moved = time.monotonic(), -1
    while not r.stopped:
        with r.lock:
            live = list(r.active)
        left = 0
        moved = 0
        for one in live:
            moved += one.moved
            if one.tx_done:
                continue
            try:
                left += _pending(one.end.fileno())
            except OSError:
                continue
        if not left:
            break
        now = time.monotonic()
        if moved != last_moved:
            last, last_moved = now, moved
        elif now - last > stall:
            break
        r.wait_pass(0.01)
    # The process ends with these connections: they are over for it.  (A
    # pass under way finishes first: it may be letting one go.)
    with r.pass_lock, r.lock:
        live = list(r.active)
    for one in live:
        one.report()


def _pending(fd: int) -> int:
    """Bytes waiting in the receive queue of the socket ``fd``."""
    import array
    import termios
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


_exit_hooked = 0               # the pid whose exit is hooked


def _hook_exit() -> None:
    """flush() when this process exits (see _control.on_exit)."""
    global _exit_hooked
    if _exit_hooked == os.getpid():
        return
    _exit_hooked = os.getpid()
    from ._control import on_exit
    on_exit(flush)


def _real_poll() -> Any:
    from ._poll import _real_poll as real
    return real()
