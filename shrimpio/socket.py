"""A drop-in ``socket.socket`` whose local TCP connections run over shared memory.

Theory of operation
-------------------
``shrimpio.socket.socket`` subclasses the stdlib class, so ``isinstance``
checks, ``family``/``type``/``proto``, timeouts and ``fileno()`` keep their
stdlib meaning.  Each object is in one of three states:

* **kernel**: an ordinary socket (UDP, Unix, a TCP connection that fell back,
  or not yet connected).  Every call goes to the stdlib; only byte counters
  are added.
* **shm connection** (``self._shm`` is a :class:`~shrimpio._connection.Connection`):
  ``connect()`` found a shrimpio listener of this user in the registry,
  handed it a segment, and then ``dup2``-ed the connected registry socket
  onto the fd the object already had.  The fd number never changes, so code
  that saved ``fileno()`` keeps working, and select/poll/epoll on it see the
  data doorbell and peer death.  Data calls go to the rings.
* **shm listener** (``self._lst``): a real TCP listening socket (for remote
  and unpatched clients) plus a registry entry for shrimpio clients;
  ``accept()`` serves both.

Decisions about the path are made in :mod:`shrimpio._route` and recorded on
the object (``shrimpio.info(sock)``); the hand-shake of a shared-memory
connect is in :mod:`shrimpio._handshake`, accept in :mod:`shrimpio._accept`.
"""

from __future__ import annotations

import errno
import os
import select as _select
import stat
import _socket as _csocket
import socket as _std
import threading
import time
import weakref
from typing import Any, Optional

from . import _accept, _connection, _control, _escape, _handshake, _route, _stat
from ._connection import Connection
from ._fastpath import spin_readable
from . import _sockargs
from ._sockargs import NOARG as _NOARG
from ._accept import Listener as _Listener

__all__ = ["socket", "info", "StdSocket"]

#: The stdlib class, whatever ``shrimpio.patch`` does to the module attribute.
StdSocket = _std.socket
#: The kernel's poll, whatever the patch does to select.poll: shrimpio's own
#: waits watch kernel fds only (the patched poller would treat a listener's
#: own fd as a listener again, and accept ahead for it).
_real_poll = _select.poll
_STREAM = _std.SOCK_STREAM
_TYPE_MASK = ~(getattr(_std, "SOCK_NONBLOCK", 0) | getattr(_std, "SOCK_CLOEXEC", 0))
_AF_INET, _AF_INET6 = int(_std.AF_INET), int(_std.AF_INET6)
_MSG_DONTWAIT = int(_std.MSG_DONTWAIT)
_AF_UNIX, _SOCK_SEQPACKET = int(_std.AF_UNIX), int(_std.SOCK_SEQPACKET)
# family and type as plain ints: the stdlib properties build enum members,
# which costs a microsecond a time on the connect and accept paths.
_family = _csocket.socket.family.__get__
_type = _csocket.socket.type.__get__

#: Called with an fd whose file is about to be replaced, or that is about to
#: become (or stop being) a shared-memory connection or listener: pollers
#: that keep registrations (the patched epoll) put it where it now belongs.
fd_change_hooks: list = []


def _fd_changing(fd: int) -> None:
    for hook in fd_change_hooks:
        hook(fd)


# fd -> socket object, for the pollers and fromfd (weak: objects die normally).
_by_fd: "weakref.WeakValueDictionary[int, socket]" = weakref.WeakValueDictionary()
# (st_dev, st_ino) of a control socket -> its Connection, so that an fd made
# by os.dup/socket.fromfd/inheritance finds the connection again.
_by_inode: "weakref.WeakValueDictionary[tuple[int, int], Connection]" = weakref.WeakValueDictionary()
# Connections whose socket object was detach()ed: the bare fd owns them until
# a new socket object adopts the fd.
_detached: "dict[tuple[int, int], Connection]" = {}
# Connections not yet in _by_inode: indexing one costs an fstat, and is
# only needed when a socket object is made from a bare fd, so it waits
# until then (_index_pending).
_unindexed: "list[weakref.ref[Connection]]" = []
_UNINDEXED_PRUNE = 64


_unindexed_lock = threading.Lock()


def _index_pending() -> None:
    """Put the connections made since the last call into _by_inode (the
    inode of a connection's own doorbell fd is that of its control socket)."""
    with _unindexed_lock:
        pending = _unindexed[:]
        del _unindexed[:]
    for ref in pending:
        conn = ref()
        if conn is not None and not conn.closed:
            try:
                _by_inode[_inode(conn.bell_fd)] = conn
            except OSError:
                pass


def _unindexed_add(conn: Connection) -> None:
    ref = weakref.ref(conn)
    with _unindexed_lock:
        _unindexed.append(ref)
        if len(_unindexed) <= _UNINDEXED_PRUNE:
            return
        # Forget the closed ones (most, in a process that never adopts fds).
        _unindexed[:] = [r for r in _unindexed if (c := r()) is not None and not c.closed]
        if len(_unindexed) <= _UNINDEXED_PRUNE:
            return
    _index_pending()
_registry = _handshake.registry


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _ebadf() -> OSError:
    return OSError(errno.EBADF, "Bad file descriptor")


class socket(StdSocket):
    """``socket.socket`` with shared-memory connections between shrimpio
    sockets of one host and user (see the module docstring)."""

    __slots__ = ("_shm", "_lst", "_route", "_sent", "_received", "_bufs", "_opts",
                 "_local", "_peer", "_unbound", "_esc")

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: Optional[int] = None) -> None:
        # An fd of a shared-memory connection (detached, os.dup-ed, inherited)
        # is really a Unix socket: the kernel would auto-detect AF_UNIX /
        # SOCK_SEQPACKET for it.  Find its connection first, so that the
        # object reports the TCP family and type it stands for.
        conn: Optional[Connection] = None
        detached = False
        esc: Optional[_escape.Escaped] = None
        if fileno is not None and (_by_inode or _detached or _unindexed or _escape.escaped):
            try:
                key: Optional[tuple[int, int]] = _inode(int(fileno))
            except (OSError, TypeError, ValueError, OverflowError):
                key = None       # the stdlib raises its own error below
            if key is not None:
                if _unindexed and key not in _detached and key not in _by_inode:
                    _index_pending()
                conn = _detached.get(key)
                detached = conn is not None
                if conn is None:
                    conn = _by_inode.get(key)
                    if conn is not None and conn.closed:
                        conn = None
                if conn is None and key in _escape.escaped:
                    # An escaped connection's fd (see _escape): back onto
                    # shared memory if no byte moved yet, else a kernel socket.
                    esc = _escape.escaped[key]
                    conn = _escape.reclaim(key, int(fileno))
                    if conn is not None:
                        esc = None
                        _unindexed_add(conn)     # findable by its inode again
            if conn is not None or esc is not None:
                if family == -1:
                    if esc is not None:
                        family = esc.family
                    else:
                        family = _std.AF_INET6 if len(conn.local) == 4 else _std.AF_INET
                if type == -1:
                    type = _STREAM
                if proto == -1:
                    proto = _std.IPPROTO_TCP
        super().__init__(family, type, proto, fileno)
        self._clear()
        self._unbound = fileno is None      # made here, and bind() not called yet
        if conn is not None:
            if detached:
                del _detached[key]
            self._adopt(conn, counted=detached)
        elif esc is not None:
            self._escape_done(esc)
        elif fileno is not None and self._is_tcp():
            # fromfd / socket(fileno=) / detach-and-adopt of a kernel socket:
            # say why it is not shared memory (accept() and dup() overwrite
            # this with what they know).
            self._route = _route.Route(_route.TCP, "kernel socket from a file descriptor")

    def _clear(self) -> None:
        self._shm: Optional[Connection] = None
        self._lst: Optional[_Listener] = None
        self._route: Optional[_route.Route] = None
        self._sent = self._received = 0
        self._bufs: dict[int, int] = {}
        self._opts: dict[tuple[int, int], int] = {}
        self._local: tuple = ()
        self._peer: tuple = ()
        self._unbound = False
        self._esc: Optional[_escape.Escaped] = None

    def bind(self, address: Any) -> None:
        """As ``socket.bind``."""
        self._unbound = False
        super().bind(address)

    # -- bookkeeping ---------------------------------------------------------

    def _adopt(self, conn: Connection, counted: bool) -> None:
        if not counted:
            with conn.lock:
                conn.refs += 1
        self._shm = conn
        self._local, self._peer = conn.local, conn.peer
        self._route = _route.Route(_route.SHM, "")
        _by_fd[self.fileno()] = self

    def _escape_done(self, esc: "_escape.Escaped") -> None:
        """This object's fd is (now) the program's end of an escaped
        connection's kernel stream (see _escape): a kernel socket that keeps
        the connection's addresses and says why it left shared memory."""
        self._shm = None
        self._esc = esc
        self._local, self._peer = esc.local, esc.peer
        self._route = _route.Route(_route.TCP, esc.reason)
        _by_fd[self.fileno()] = self

    def _is_tcp(self) -> bool:
        return _family(self) in (_AF_INET, _AF_INET6) and _type(self) & _TYPE_MASK == _STREAM

    def _conn(self) -> Connection:
        conn = self._shm
        if conn is None or conn.closed or self.fileno() < 0:
            raise _ebadf()
        return conn

    # -- connecting ------------------------------------------------------------

    def connect(self, address: Any) -> None:
        """As ``socket.connect``; over shared memory when the listener is a
        shrimpio socket of this user on this host."""
        if self._shm is not None or self._lst is not None:
            if self.fileno() < 0:
                raise _ebadf()
            self._address_check(address, "connect")     # parsed first, as by the stdlib
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        if self._is_tcp() and self.fileno() >= 0:
            if fd_change_hooks:
                _fd_changing(self.fileno())      # (registered in an epoll before connect)
            if self._try_shm(address, kit_later=True):
                return
        super().connect(address)
        self._remember_peer()
        if self._route is not None and self._route.path == _route.TCP:
            _stat.track_tcp(self, self._route.reason)

    def _remember_peer(self) -> None:
        """Keep a kernel connection's peer address for the report: by the
        time the socket closes, the kernel may no longer say (ENOTCONN)."""
        if _report_wanted():
            try:
                self._peer = super().getpeername()
            except OSError:
                pass

    def connect_ex(self, address: Any) -> int:
        """As ``socket.connect_ex``: an errno instead of an exception."""
        try:
            self.connect(address)
        except (BlockingIOError, InterruptedError) as exc:
            return exc.errno or errno.EINPROGRESS
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    def _try_shm(self, address: Any, kit_later: bool = False) -> bool:
        """Connect over shared memory if the route allows and a shrimpio
        listener answers; False (with the reason recorded) to go by TCP
        (see _handshake.connect_shm)."""
        return _handshake.connect_shm(self, address, kit_later)

    def _local_address(self, dest: str) -> tuple:
        return _handshake.local_address(self, dest)

    def _install(self, conn: Connection) -> None:
        self._shm = conn
        self._local, self._peer = conn.local, conn.peer
        self._route = _route.SHM_ROUTE
        _unindexed_add(conn)
        _by_fd[self.fileno()] = self
        if conn.stat is None:
            conn.stat = _stat.track_connection(conn, self.fileno())

    # -- listening ------------------------------------------------------------

    def listen(self, backlog: int = -1) -> None:
        """As ``socket.listen``; a TCP listener also registers for shrimpio
        clients of this host."""
        if backlog == -1:
            super().listen()
        else:
            super().listen(backlog)
        if self._lst is not None or not self._is_tcp():
            return
        host, port = StdSocket.getsockname(self)[:2]
        route = _route.listener_allowed(host, port)
        if route.path != _route.SHM:
            self._route = route
            return
        v6only = self.family == _std.AF_INET6 and _handshake.unspecified(host) \
            and bool(StdSocket.getsockopt(self, _std.IPPROTO_IPV6, _std.IPV6_V6ONLY))
        name = _route.entry_name(self.family, host, port, v6only)
        try:
            name, usock = _accept.register_listener(self, name, max(backlog, 128) if backlog >= 0 else 128)
        except FileExistsError as exc:
            self._route = _route.Route(_route.TCP, str(exc.args[0]))
            return
        except (OSError, ValueError) as exc:
            # The TCP listener is up; a registry we cannot use (entry path
            # longer than a Unix socket address, bad permissions...) only
            # costs the fast path: listen() must not fail for it.
            self._route = _route.Route(_route.TCP, f"registry unusable: {exc}")
            return
        usock.setblocking(False)
        os.set_blocking(self.fileno(), False)
        self._lst = _Listener(name, usock)
        _by_fd[self.fileno()] = self
        _listening(self._lst)
        if fd_change_hooks:
            _fd_changing(self.fileno())          # (registered in an epoll before listen)

    def _adopt_listener(self, name: str, usock_fd: int) -> None:
        """This kernel listening socket came from another process with its
        registry socket (see _mpconn): share that entry's queue of clients."""
        usock = _csocket.socket(_std.AF_UNIX, _std.SOCK_SEQPACKET, 0, usock_fd)
        usock.setblocking(False)
        os.set_blocking(self.fileno(), False)
        self._lst = _Listener(name, usock)
        self._lst.forks = -1              # shared: see _accept.Listener.close
        self._route = None
        _by_fd[self.fileno()] = self
        _listening(self._lst)

    def settimeout(self, value: Optional[float]) -> None:
        super().settimeout(value)
        if self._lst is not None:
            os.set_blocking(self.fileno(), False)   # accept() does its own waiting

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def accept(self) -> tuple["socket", Any]:
        """As ``socket.accept``; serves TCP and shared-memory clients."""
        lst = self._lst
        if lst is None:
            fd, addr = self._accept()
            sock = self._kernel_accepted(fd, addr)
            if _std.getdefaulttimeout() is None and self.gettimeout():
                sock.setblocking(True)
            return sock, addr
        timeout = self.gettimeout()
        deadline = None if not timeout else time.monotonic() + timeout
        poller = watched = None
        spin_from = -1.0      # when the busy-poll phase began (-1: not yet)
        spun = False
        while True:
            got = self._accept_shm(lst)
            if got is None:
                try:
                    fd, addr = self._accept_nowait()
                except (BlockingIOError, InterruptedError):
                    pass
                else:
                    sock = self._kernel_accepted(fd, addr)
                    if _std.getdefaulttimeout() is None:
                        sock.setblocking(True)
                    got = sock, addr
            if got is not None:
                if spin_from >= 0:
                    lst.adapt(spun, time.monotonic() - spin_from)
                return got
            if timeout == 0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            if spin_from < 0:
                # Busy-poll first (as a ring reader does): a client that
                # connects soon is then served without our being put to
                # sleep and woken up, which costs both sides more than the
                # connection itself.  The budget adapts (see _Listener).
                # Closed connections' unmapping waited for this moment.
                _connection.reap()
                spin_from = time.monotonic()
                budget = lst.spin_budget()
                if deadline is not None:
                    budget = min(budget, max(0.0, deadline - spin_from))
                if budget > 0 and spin_readable((self.fileno(), lst.usock.fileno()), budget):
                    spun = True
                    continue
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            if wait_ms == 0:
                raise TimeoutError("timed out")
            # Clients whose hello is late are watched too, until their time
            # is up (the next accept attempt then drops them).
            fds = self._accept_fds()
            first = lst.next_deadline()
            if first is not None:
                left = max(0, int((first - time.monotonic()) * 1000) + 1)
                wait_ms = left if wait_ms is None else min(wait_ms, left)
            if poller is None or fds != watched:
                poller, watched = _real_poll(), fds
                for fd in fds:
                    poller.register(fd, _select.POLLIN)
            poller.poll(wait_ms)
            if self.fileno() < 0 or self._lst is None:
                raise _ebadf()

    def _accept_fds(self) -> list[int]:
        """The fds whose readability may mean a client for ``accept()``:
        the TCP listener's, the registry entry's, and those of shared-memory
        clients whose hello is late.  (Listening sockets only.)"""
        return [self.fileno(), *self._lst.watch_fds()]

    def _kernel_accepted(self, fd: int, addr: Any) -> "socket":
        """The socket object for a connection accepted by the kernel, with
        its reason: the listener's own (disabled, ruled out, no registry) if
        it offered no shared memory, else the client's not being shrimpio."""
        sock = type(self)(self.family, self.type, self.proto, fileno=fd)
        if self._is_tcp():
            if self._lst is None and self._route is not None and self._route.path == _route.TCP:
                sock._route = self._route
            else:
                sock._route = _route.Route(_route.TCP, "peer is not shrimpio")
            sock._peer = addr
            _stat.track_tcp(sock, sock._route.reason)
        return sock

    def _accept_nowait(self) -> tuple[int, Any]:
        """Accept a pending TCP connection, or raise BlockingIOError at once.
        (``_accept`` on this object would first wait up to its timeout for
        the TCP side, while shared-memory clients queue unseen.)"""
        tmp = _csocket.socket(self.family, self.type, self.proto, self.fileno())
        try:
            tmp.settimeout(0.0)
            return tmp._accept()
        finally:
            tmp.detach()

    def _accept_shm(self, lst: _Listener) -> Optional[tuple["socket", Any]]:
        return _accept.accept_shm(self, lst, type(self) is socket)

    # -- data --------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """As ``socket.send``."""
        conn = self._shm
        if conn is None:
            n = super().send(data, flags)
            self._sent += n
            return n
        return conn.stream.send(data, flags, self.gettimeout())

    def sendall(self, data: Any, flags: int = 0) -> None:
        """As ``socket.sendall``."""
        conn = self._shm
        if conn is None:
            super().sendall(data, flags)
            self._sent += memoryview(data).nbytes
            return
        conn.stream.sendall(data, flags, self.gettimeout())

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        """As ``socket.sendmsg`` (gather); no ancillary data over shared memory."""
        conn = self._shm
        if conn is None:
            if ancdata:
                ancdata = list(ancdata)
                _escape_passed_fds(ancdata)
            n = super().sendmsg(buffers, ancdata, flags, *([address] if address is not None else []))
            self._sent += n
            return n
        if list(ancdata):
            raise OSError(errno.EINVAL, "ancillary data is not supported on TCP sockets")
        return conn.stream.sendmsg(list(buffers), flags, self.gettimeout())

    def sendto(self, data: Any, *args: Any) -> int:
        """As ``socket.sendto``; a connected stream ignores the address."""
        if self._shm is None:
            n = super().sendto(data, *args)
            self._sent += n
            return n
        if not 1 <= len(args) <= 2:
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        flags = args[0] if len(args) == 2 else 0
        self._address_check(args[-1], "sendto")   # (then ignored, as by a connected stream)
        return self.send(data, flags)

    def _address_check(self, address: Any, call: str) -> None:
        """The first check the stdlib makes of an AF_INET/AF_INET6 address."""
        if not isinstance(address, tuple):
            raise TypeError(f"{call}(): AF_INET{'6' if self.family == _std.AF_INET6 else ''} "
                            f"address must be tuple, not {type(address).__name__}")

    def sendfile(self, file: Any, offset: int = 0, count: Optional[int] = None) -> int:
        """As ``socket.sendfile``; over shared memory the file's bytes are
        read in large blocks and copied into the ring."""
        if self._shm is None:
            n = super().sendfile(file, offset, count)
            return n
        return self._sendfile_ring(file, offset, count)

    def _sendfile_ring(self, file: Any, offset: int, count: Optional[int]) -> int:
        self._check_sendfile_params(file, offset, count)    # the stdlib's checks
        try:
            fileno = file.fileno()
            regular = stat.S_ISREG(os.fstat(fileno).st_mode)
        except (AttributeError, OSError, ValueError):
            regular = False
        if not regular:
            return self._sendfile_use_send(file, offset, count)   # a pipe, a BytesIO...
        if self.gettimeout() == 0:
            raise ValueError("non-blocking sockets are not supported")
        total = 0
        block = 256 * 1024
        try:
            while count is None or total < count:
                want = block if count is None else min(block, count - total)
                data = os.pread(fileno, want, offset + total)
                if not data:
                    break
                self.sendall(data)
                total += len(data)
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """As ``socket.recv``."""
        conn = self._shm
        if conn is None:
            data = super().recv(bufsize, flags)
            self._received += len(data)
            return data
        if conn.kit_due:
            self._kit_while_waiting(conn, flags)
        return conn.stream.recv(bufsize, flags, self.gettimeout())

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As ``socket.recv_into``."""
        conn = self._shm
        if conn is None:
            n = super().recv_into(buffer, nbytes, flags)
            self._received += n
            return n
        if conn.kit_due:
            self._kit_while_waiting(conn, flags)
        return conn.stream.recv_into(buffer, nbytes, flags, self.gettimeout())

    def _kit_while_waiting(self, conn: Connection, flags: int) -> None:
        """A read of a new connection is about to wait for the peer (a
        client waiting for its first answer): build the spare kit for this
        process's next connect now, while the peer works."""
        if flags & _MSG_DONTWAIT or self.gettimeout() == 0:
            return
        try:
            if conn.rx.readable() or conn.rx.at_eof():
                return                  # no wait: keep it for a later read
        except (OSError, ValueError):
            pass
        conn.kit_due = False
        _connection.refill()            # (mapped over a closed connection's segment)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        """As ``socket.recvfrom``; a connected stream has no source address."""
        if self._shm is None:
            data, addr = super().recvfrom(bufsize, flags)
            self._received += len(data)
            return data, addr
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        """As ``socket.recvfrom_into``."""
        if self._shm is None:
            n, addr = super().recvfrom_into(buffer, nbytes, flags)
            self._received += n
            return n, addr
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple:
        """As ``socket.recvmsg``; no ancillary data over shared memory."""
        if self._shm is None:
            res = super().recvmsg(bufsize, ancbufsize, flags)
            self._received += len(res[0])
            return res
        return _sockargs.recvmsg(self, self._conn(), bufsize, ancbufsize, flags)

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple:
        """As ``socket.recvmsg_into`` (scatter); no ancillary data over shared memory."""
        if self._shm is None:
            res = super().recvmsg_into(buffers, ancbufsize, flags)
            self._received += res[0]
            return res
        return _sockargs.recvmsg_into(self, self._conn(), buffers, ancbufsize, flags)

    # -- shutdown and close --------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """As ``socket.shutdown``: half-close either direction, or both."""
        conn = self._shm
        if conn is None:
            return super().shutdown(how)
        how = _sockargs.index_arg(how)
        if how not in (_std.SHUT_RD, _std.SHUT_WR, _std.SHUT_RDWR):
            raise OSError(errno.EINVAL, "Invalid argument")
        self._conn()
        if how in (_std.SHUT_RD, _std.SHUT_RDWR):
            conn.rd_shut = True
            if how == _std.SHUT_RDWR:
                # Linux TCP answers data that arrives after SHUT_RDWR with a
                # reset; after SHUT_RD alone it still accepts (and we can
                # still read) it.  So only SHUT_RDWR fails the peer's writes.
                try:
                    conn.rx.close_read()
                except (OSError, ValueError):
                    pass
            # Threads blocked in recv() on this connection sleep on the data
            # doorbell (our control socket), which only the peer rings.  As
            # with TCP, SHUT_RD must wake them with EOF: shutting the control
            # socket's read side makes it report end of file, their wait
            # returns "peer gone", and the read sees b"".  (The peer is not
            # disturbed: its rings of this doorbell just fail, ignored; the
            # pollers know this EOF is ours, see _poll.drain.)
            try:
                StdSocket.shutdown(self, _std.SHUT_RD)
            except OSError:
                pass
        if how in (_std.SHUT_WR, _std.SHUT_RDWR):
            try:
                conn.tx.shutdown_write()
            except (OSError, ValueError):
                pass

    def _real_close(self, _ss: Any = _csocket.socket) -> None:
        self._let_go()
        _ss.close(self)

    def _let_go(self) -> None:
        """What closing this object means beyond its fd: the report, its
        share of the connection, the listener's registry entry."""
        fd = self.fileno()
        if fd >= 0 and self._esc is None and _report_wanted():
            self._report()
        _stat.tcp_closing(self)
        conn, self._shm = self._shm, None
        lst, self._lst = self._lst, None
        # (Our _by_fd entry may stay: it is checked against fileno() on use,
        # overwritten when the fd number comes back, and weak.)
        if conn is not None:
            if conn.refs > 1:
                conn.keep_bell(fd)      # others still use it: not our fd as doorbell
            conn.release()
        if lst is not None:
            lst.close()

    def __del__(self) -> None:
        # Collected without close(): as a kernel socket's fd is closed then
        # (with a ResourceWarning), the connection goes too, so the peer
        # reads EOF (the connection holds fds of its own: without this the
        # peer would wait for ever), and a listener's entry goes.
        try:
            if getattr(self, "_shm", None) is not None or getattr(self, "_lst", None) is not None:
                if self.fileno() >= 0:
                    self._let_go()
        except Exception:
            pass                    # (interpreter shutdown: modules half gone)
        super().__del__()

    def _report(self) -> None:
        from ._report import connection_closing
        record = _report_record(self)
        if record is not None:
            connection_closing(record)

    def detach(self) -> int:
        """As ``socket.detach``.  The fd of a shared-memory connection then
        leaves shrimpio's hands (``multiprocessing.connection`` reads and
        writes it directly): the connection escapes to a kernel stream on the
        same fd number (see :mod:`shrimpio._escape`), unless another socket
        object of this process holds the same fd (``ssl.SSLSocket`` is made
        that way).  ``socket.socket(fileno=fd)`` made on it before any byte
        moved takes it back onto shared memory."""
        fd = self.fileno()
        conn = self._shm
        if conn is not None and fd >= 0:
            other = _by_fd.get(fd)
            if other is not None and other is not self and other._shm is conn:
                self._shm = None         # the other object owns the fd and the connection
                with conn.lock:
                    conn.refs -= 1
            else:
                _escape.escape(self, "detach()")
        if fd >= 0 and _by_fd.get(fd) is self:
            del _by_fd[fd]
        self._shm = None
        return super().detach()

    def _detach_keep(self) -> int:
        """``detach()`` for shrimpio's own hand-overs: a shared-memory
        connection stays on shared memory, owned by the bare fd until a new
        socket object adopts it (``socket.socket(fileno=fd)``)."""
        fd = self.fileno()
        if fd >= 0 and _by_fd.get(fd) is self:
            del _by_fd[fd]
        conn, self._shm = self._shm, None
        if conn is not None:
            _detached[_inode(fd)] = conn    # the bare fd keeps it; a new object adopts it
        return super().detach()

    def dup(self) -> "socket":
        """As ``socket.dup``: a new object (and fd) on the same connection."""
        sock = type(self)(self.family, self.type, self.proto, fileno=os.dup(self.fileno()))
        sock.settimeout(self.gettimeout())
        if self._shm is None:
            sock._route = self._route
        return sock

    # -- addresses and options -------------------------------------------------------

    def getsockname(self) -> Any:
        """As ``socket.getsockname``."""
        if self._shm is not None:
            self._conn()
            return self._local
        if self._esc is not None and self.fileno() >= 0:
            return self._local
        return super().getsockname()

    def getpeername(self) -> Any:
        """As ``socket.getpeername``."""
        if self._shm is not None:
            self._conn()
            return self._peer
        if self._esc is not None and self.fileno() >= 0:
            return self._peer
        return super().getpeername()

    def setsockopt(self, level: int, optname: int, value: Any, optlen: Any = _NOARG) -> None:
        """As ``socket.setsockopt``; buffer sizes before connect size the rings
        (over shared memory see ``_sockargs.setsockopt``)."""
        if level == _std.SOL_SOCKET and optname in (_std.SO_SNDBUF, _std.SO_RCVBUF) \
                and isinstance(value, int):
            self._bufs[optname] = value
        if self._shm is None:
            if optlen is _NOARG:
                return super().setsockopt(level, optname, value)
            return super().setsockopt(level, optname, value, optlen)
        self._conn()
        _sockargs.setsockopt(self, level, optname, value, optlen)

    def getsockopt(self, level: int, optname: int, buflen: Any = _NOARG) -> Any:
        """As ``socket.getsockopt`` (over shared memory see ``_sockargs.getsockopt``)."""
        if self._shm is None:
            if buflen is _NOARG:
                return super().getsockopt(level, optname)
            return super().getsockopt(level, optname, buflen)
        return _sockargs.getsockopt(self, self._conn(), level, optname, buflen)


# Listeners of this process with a registry entry, so that the entries go
# when the process exits without closing them (and, once per process, the
# stale entries of listeners that died go when one starts listening).
_listeners: "weakref.WeakSet[_Listener]" = weakref.WeakSet()
_listen_hooked = 0          # the pid that hooked its exit and swept


def _listening(lst: _Listener) -> None:
    global _listen_hooked
    _listeners.add(lst)
    if _listen_hooked == os.getpid():
        return
    _listen_hooked = os.getpid()
    _control.on_exit(_close_listeners)
    try:
        _registry().sweep()
    except OSError:
        pass


def _close_listeners() -> None:
    """At exit: the registry entries of listeners still open go (a forked
    child's copy of a listener removes the entry only if nobody else
    listens there, see _accept.Listener.close)."""
    for lst in list(_listeners):
        try:
            lst.close()
        except OSError:
            pass


def _escape_passed_fds(ancdata: list) -> None:
    """Before fds go to another process in ``SCM_RIGHTS``: a shared-memory
    connection among them escapes to a kernel stream (the other process
    could only read its doorbell), and an escaped one can no longer be
    taken back (see _escape)."""
    import array
    for item in ancdata:
        try:
            level, kind, data = item
        except (TypeError, ValueError):
            return                       # the stdlib raises its own error
        if level != _std.SOL_SOCKET or kind != _std.SCM_RIGHTS:
            continue
        fds = array.array("i")
        try:
            raw = memoryview(data).cast("B")
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
        except (TypeError, ValueError):
            continue
        for fd in fds:
            conn = _conn_of_fd(fd)
            if conn is not None:
                _escape.escape_conn(conn, "fd sent to another process", fd)
            _escape.shared(fd)


def _conn_of_fd(fd: int) -> Optional[Connection]:
    """The live shared-memory connection whose control socket ``fd`` is
    (a socket object's fd or a bare copy of one), or None."""
    sock = _by_fd.get(fd)
    if sock is not None and sock._shm is not None and sock.fileno() == fd:
        return None if sock._shm.closed else sock._shm
    if not (_by_inode or _detached or _unindexed):
        return None
    try:
        key = _inode(fd)
    except OSError:
        return None
    if _unindexed and key not in _by_inode and key not in _detached:
        _index_pending()
    conn = _detached.get(key) or _by_inode.get(key)
    return None if conn is None or conn.closed else conn


def _report_wanted() -> bool:
    return bool(_control.getenv("SHRIMPIO_REPORT"))


def _report_record(sock: "socket") -> Optional[dict]:
    """What ``SHRIMPIO_REPORT`` says about a connected socket (None for
    listeners and unconnected or non-TCP sockets)."""
    if sock._lst is not None or not sock._is_tcp():
        return None
    try:
        local = sock.getsockname()
    except OSError:
        return None
    try:
        peer = sock.getpeername()
    except OSError:          # a kernel connection the peer already closed
        peer = sock._peer
    if not peer:
        return None          # never connected
    out = info(sock)
    out.update(local=local, peer=peer)
    return out


def info(sock: Any) -> dict:
    """Which path a socket's connection took, why, and its byte counts.

    ``{"path": "shm" | "tcp" | None, "reason": str, "bytes_sent": int,
    "bytes_received": int}``; ``path`` is None for sockets that are neither
    (UDP, Unix, unconnected)."""
    if not isinstance(sock, socket):
        return {"path": "tcp" if _is_stream_inet(sock) else None,
                "reason": "not a shrimpio socket", "bytes_sent": 0, "bytes_received": 0}
    conn = sock._shm
    if conn is not None or sock._lst is not None:
        out: dict = {"path": "shm", "reason": ""}
    elif sock._route is not None:
        out = {"path": sock._route.path, "reason": sock._route.reason}
    else:
        out = {"path": "tcp" if sock._is_tcp() else None, "reason": ""}
    if conn is not None:
        out.update(bytes_sent=conn.bytes_sent, bytes_received=conn.bytes_received,
                   ring_bytes=(conn.tx.capacity, conn.rx.capacity))
    elif sock._esc is not None:
        relayed = sock._esc.relay.conn          # the relay counts what crossed
        out.update(bytes_sent=relayed.bytes_sent, bytes_received=relayed.bytes_received)
    else:
        out.update(bytes_sent=sock._sent, bytes_received=sock._received)
    if sock._lst is not None:
        out["listener"] = sock._lst.name
    return out


def _is_stream_inet(sock: Any) -> bool:
    try:
        return (sock.family in (_std.AF_INET, _std.AF_INET6)
                and sock.type & _TYPE_MASK == _STREAM)
    except (AttributeError, OSError):
        return False
