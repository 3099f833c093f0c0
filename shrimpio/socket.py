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
This module holds the class and its data calls; its helpers are
:mod:`shrimpio._socklisten` (``listen()``/``accept()``),
:mod:`shrimpio._sockindex` (which object or connection an fd is),
:mod:`shrimpio._sockinfo` (``info()`` and ``SHRIMPIO_REPORT``) and
:mod:`shrimpio._sockargs` (argument checks and options over shared memory).
"""

from __future__ import annotations

import errno
import os
import stat
import _socket as _csocket
import _thread
import socket as _std
from typing import Any, Optional

from . import _accept, _connection, _escape, _handshake, _route, _socklate, _socklisten, _stat
from ._connection import Connection
from ._fastpath import close_fd as _close_fd
from . import _sockargs
from ._sockargs import NOARG as _NOARG
from ._accept import Listener as _Listener
from ._sockindex import (  # noqa: F401  (the old names: other modules use them)
    by_fd as _by_fd, by_inode as _by_inode, conn_of_fd as _conn_of_fd, detached as _detached,
    ebadf as _ebadf, escape_passed_fds as _escape_passed_fds, fd_change_hooks,
    fd_changing as _fd_changing, index_pending as _index_pending, inode as _inode,
    unindexed as _unindexed, unindexed_add as _unindexed_add,
)
from ._sockinfo import (  # noqa: F401
    info, info_fd_hooks, report_at_exit as _report_at_exit, report_exit_hooks,
    report_record as _report_record, report_wanted as _report_wanted,
    reportable as _reportable, reported_at_exit as _reported_at_exit,
)

__all__ = ["socket", "info", "StdSocket"]

#: The stdlib class, whatever ``shrimpio.patch`` does to the module attribute.
StdSocket = _std.socket
_STREAM = _std.SOCK_STREAM
_TYPE_MASK = ~(getattr(_std, "SOCK_NONBLOCK", 0) | getattr(_std, "SOCK_CLOEXEC", 0))
_AF_INET, _AF_INET6 = int(_std.AF_INET), int(_std.AF_INET6)
_MSG_DONTWAIT = int(_std.MSG_DONTWAIT)
_AF_UNIX, _SOCK_SEQPACKET = int(_std.AF_UNIX), int(_std.SOCK_SEQPACKET)
_LATE_ERRNOS = _socklate.LATE_ERRNOS
_registry = _handshake.registry
# family and type as plain ints: the stdlib properties build enum members,
# which costs a microsecond a time on the connect and accept paths.
#: Sockets being closed (by id): a lock their closer holds, and its thread.
_closing: dict[int, Any] = {}
#: Sockets whose connect() sets up shared memory now: id -> a lock it holds.
_connecting: dict[int, Any] = {}
_allocate_lock = _thread.allocate_lock
_get_ident = _thread.get_ident
_family = _csocket.socket.family.__get__
_type = _csocket.socket.type.__get__


class socket(StdSocket):
    """``socket.socket`` with shared-memory connections between shrimpio
    sockets of one host and user (see the module docstring)."""

    __slots__ = ("_shm", "_lst", "_route", "_sent", "_received", "_bufs", "_opts",
                 "_local", "_peer", "_unbound", "_esc", "_tcp")

    #: A reason, in a subclass whose sockets must stay on kernel TCP (their
    #: owner polls the fd in the kernel: shrimpio._eventlet); their
    #: connections and listeners report it.
    _only_tcp: Optional[str] = None

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
        self._tcp: Optional[_stat.Slot] = None      # a kernel connection's stat slot
        if _report_wanted():
            _report_at_exit(self)

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
            _sockargs.address_check(self, address, "connect")     # parsed first, as by the stdlib
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        if self._is_tcp() and self.fileno() >= 0:
            if fd_change_hooks:
                _fd_changing(self.fileno())      # (registered in an epoll before connect)
            # (Another thread's recv or send meanwhile waits for this: see
            # _await_connect.)
            lock = _allocate_lock()
            lock.acquire()
            _connecting[id(self)] = lock
            try:
                if self._try_shm(address, kit_later=True, late=True):
                    return
            finally:
                del _connecting[id(self)]
                lock.release()
        super().connect(address)
        self._remember_peer()
        if self._route is not None and self._route.path == _route.TCP:
            _stat.track_tcp(self, self._route.reason)

    def _await_connect(self) -> bool:
        """A call found the fd not connected (ENOTCONN): if this socket's
        connect() is setting up shared memory in another thread, wait for
        it; True if the socket is on shared memory now (try again: the
        connect may also have ended while the failed call was in the
        kernel).  The listener's accept() may return before that connect
        does, and the kernel's recv on a socket whose connect is under way
        waits for it."""
        lock = _connecting.get(id(self))
        if lock is not None:
            with lock:
                pass
        return self._shm is not None

    def _settled(self) -> "Connection | None":
        """The connection a read or write found missing, once any connect()
        of this socket under way in another thread has ended (None: the
        kernel's socket).  Neither may reach the kernel during that connect:
        it swaps the fd for the control socket (dup2), and a read that got
        there after the swap would take a doorbell byte as data, a write
        would send the listener a datagram instead of the stream's bytes."""
        if _connecting:
            self._await_connect()
        return self._shm

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

    def _try_shm(self, address: Any, kit_later: bool = False, late: bool = False) -> bool:
        """Connect over shared memory if the route allows and a shrimpio
        listener answers; False (with the reason recorded) to go by TCP
        (see _handshake.connect_shm)."""
        return _handshake.connect_shm(self, address, kit_later, late)

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
        _socklisten.listen(self, backlog)

    def _adopt_listener(self, name: str, usock_fd: int) -> None:
        """This kernel listening socket came from another process with its
        registry socket (see _mpconn): share that entry's queue of clients."""
        _socklisten.adopt_listener(self, name, usock_fd)

    def settimeout(self, value: Optional[float]) -> None:
        super().settimeout(value)
        if self._lst is not None and self._lst.shared:
            os.set_blocking(self.fileno(), False)   # see _accept_nowait

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def accept(self) -> tuple["socket", Any]:
        """As ``socket.accept``; serves TCP and shared-memory clients."""
        return _socklisten.accept(self)

    def _accept_fds(self) -> list[int]:
        """The fds whose readability may mean a client for ``accept()``:
        the TCP listener's, the registry entry's, and those of shared-memory
        clients whose hello is late (a listener kept on TCP: its own fd
        alone).  (Listening sockets only.)"""
        lst = self._lst
        return [self.fileno()] if lst is None else [self.fileno(), *lst.watch_fds()]

    def _kernel_accepted(self, fd: int, addr: Any) -> "socket":
        """The socket object for a connection accepted by the kernel, with
        the reason it is not shared memory."""
        return _socklisten.kernel_accepted(self, fd, addr)

    def _accept_nowait(self) -> tuple[int, Any]:
        """Accept a pending TCP connection, or raise BlockingIOError at once
        (see _socklisten.accept_nowait)."""
        return _socklisten.accept_nowait(self)

    def _accept_shm(self, lst: _Listener) -> Optional[tuple["socket", Any]]:
        return _accept.accept_shm(self, lst, type(self) is socket)

    # -- data --------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """As ``socket.send``."""
        conn = self._shm or self._settled()
        if conn is None:
            n = super().send(data, flags)
            self._sent += n
            return n
        try:
            return conn.stream.send(data, flags, self.gettimeout())
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS and self._late(conn):
                return self.send(data, flags)     # (nothing of this call went in)
            raise

    def sendall(self, data: Any, flags: int = 0) -> None:
        """As ``socket.sendall``."""
        conn = self._shm or self._settled()
        if conn is None:
            super().sendall(data, flags)
            self._sent += memoryview(data).nbytes
            return
        before = conn.stream.bytes_sent
        try:
            conn.stream.sendall(data, flags, self.gettimeout())
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS:
                done = conn.stream.bytes_sent - before      # (in the ring: sent again with it)
                if self._late(conn):
                    with memoryview(data) as view, view.cast("B") as rest:
                        return self.sendall(rest[done:], flags)
            raise

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        """As ``socket.sendmsg`` (gather).  Over shared memory, ancillary data
        and the address are checked, then ignored, as by Linux TCP
        (``_sockargs.sendmsg``)."""
        conn = self._shm or self._settled()
        if conn is None:
            if ancdata:
                ancdata = list(ancdata)
                _escape_passed_fds(ancdata)
            n = super().sendmsg(buffers, ancdata, flags, *([address] if address is not None else []))
            self._sent += n
            return n
        if address is not None or type(ancdata) not in (tuple, list) or ancdata:
            return _sockargs.sendmsg(self, self._conn(), buffers, ancdata, flags, address)
        buffers = list(buffers)
        try:
            return conn.stream.sendmsg(buffers, flags, self.gettimeout())
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS and self._late(conn):
                return self.sendmsg(buffers, ancdata, flags)     # (nothing of this call went in)
            raise

    def sendto(self, data: Any, *args: Any) -> int:
        """As ``socket.sendto``; a connected stream ignores the address."""
        if (self._shm or self._settled()) is None:
            n = super().sendto(data, *args)
            self._sent += n
            return n
        if not 1 <= len(args) <= 2:
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        flags = args[0] if len(args) == 2 else 0
        _sockargs.address_check(self, args[-1], "sendto")   # (then ignored, as by a connected stream)
        return self.send(data, flags)

    def sendfile(self, file: Any, offset: int = 0, count: Optional[int] = None) -> int:
        """As ``socket.sendfile``; over shared memory the file's bytes are
        read in large blocks and copied into the ring."""
        if (self._shm or self._settled()) is None:
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
        conn = self._shm or self._settled()
        if conn is None:
            try:
                data = super().recv(bufsize, flags)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN and self._await_connect():
                    return self.recv(bufsize, flags)
                raise
            self._received += len(data)
            return data
        if conn.kit_due:
            self._kit_while_waiting(conn, flags)
        try:
            data = conn.stream.recv(bufsize, flags, self.gettimeout())
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS and self._late(conn):
                return self.recv(bufsize, flags)
            raise
        if not data and conn.client and bufsize and self._late(conn):
            return self.recv(bufsize, flags)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As ``socket.recv_into``."""
        conn = self._shm or self._settled()
        if conn is None:
            try:
                n = super().recv_into(buffer, nbytes, flags)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN and self._await_connect():
                    return self.recv_into(buffer, nbytes, flags)
                raise
            self._received += n
            return n
        if conn.kit_due:
            self._kit_while_waiting(conn, flags)
        try:
            n = conn.stream.recv_into(buffer, nbytes, flags, self.gettimeout())
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS and self._late(conn):
                return self.recv_into(buffer, nbytes, flags)
            raise
        if n == 0 and conn.client and self._late(conn):
            return self.recv_into(buffer, nbytes, flags)
        return n

    def _late(self, conn: Connection) -> bool:
        """The peer looks gone: if it is a listener that sent this client to
        TCP instead (out of fds), go on by TCP (see _socklate)."""
        return _socklate.late_fallback(self, conn)

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
        if (self._shm or self._settled()) is None:
            data, addr = super().recvfrom(bufsize, flags)
            self._received += len(data)
            return data, addr
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        """As ``socket.recvfrom_into``."""
        if (self._shm or self._settled()) is None:
            n, addr = super().recvfrom_into(buffer, nbytes, flags)
            self._received += n
            return n, addr
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple:
        """As ``socket.recvmsg``; no ancillary data over shared memory."""
        if (self._shm or self._settled()) is None:
            res = super().recvmsg(bufsize, ancbufsize, flags)
            self._received += len(res[0])
            return res
        return _sockargs.recvmsg(self, self._conn(), bufsize, ancbufsize, flags)

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple:
        """As ``socket.recvmsg_into`` (scatter); no ancillary data over shared memory."""
        if (self._shm or self._settled()) is None:
            res = super().recvmsg_into(buffers, ancbufsize, flags)
            self._received += res[0]
            return res
        conn = self._conn()
        if conn.client and isinstance(buffers, (list, tuple)) is False:
            try:
                buffers = list(buffers)     # (read again should the call move to TCP)
            except TypeError:
                pass                        # (the checks below say what the stdlib says)
        try:
            res = _sockargs.recvmsg_into(self, conn, buffers, ancbufsize, flags)
        except OSError as exc:
            if conn.client and exc.errno in _LATE_ERRNOS and self._late(conn):
                return self.recvmsg_into(buffers, ancbufsize, flags)
            raise
        if res[0] == 0 and conn.client and self._late(conn):
            return self.recvmsg_into(buffers, ancbufsize, flags)
        return res

    # -- shutdown and close --------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """As ``socket.shutdown``: half-close either direction, or both."""
        conn = self._shm
        if conn is None:
            return super().shutdown(how)
        how = _sockargs.c_int_arg(how)
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
        # Several threads may close one socket at once (a library's I/O
        # thread and its owner).  The stdlib's close is atomic (in C, under
        # the GIL); ours does Python work first (the report, the
        # connection's release), where the GIL can change hands.  The first
        # closer does it all; the others wait until it has (as the kernel's
        # close, a close that returned means the fd is closed), then find
        # the fd closed and do nothing.
        # (A close made inside the first one, by the same thread, returns:
        # the first one finishes the work.)
        mine = (_allocate_lock(), _get_ident())
        mine[0].acquire()
        first = _closing.setdefault(id(self), mine)      # atomic under the GIL
        if first is not mine:
            if first[1] != mine[1]:
                with first[0]:
                    pass
            return
        try:
            shm = self._shm is not None
            self._let_go()
            if shm:
                # A connection's fd is a Unix socket: closed keeping the GIL
                # (see close_fd), as the stdlib's close would otherwise.
                fd = _ss.detach(self)
                if fd >= 0:
                    _close_fd(fd)
            else:
                _ss.close(self)
        finally:
            del _closing[id(self)]
            mine[0].release()

    def _let_go(self) -> None:
        """What closing this object means beyond its fd: the report, its
        share of the connection, the listener's registry entry."""
        fd = self.fileno()
        if fd >= 0 and self._esc is None and _report_wanted():
            self._report()
        if self._tcp is not None:
            _stat.tcp_closing(self)
        conn, self._shm = self._shm, None
        lst, self._lst = self._lst, None
        # (Our _by_fd entry may stay: it is checked against fileno() on use,
        # overwritten when the fd number comes back, and weak.)
        if conn is not None:
            if conn.refs > 1:
                conn.keep_bell(fd)      # others still use it: not our fd as doorbell
            elif conn.client and _socklate.linger(self, conn, fd):
                return                  # its hello is unread: see _socklate
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
            elif getattr(self, "_tcp", None) is not None:
                _stat.tcp_closing(self)     # (detached, or collected unclosed)
        except Exception:
            pass                    # (interpreter shutdown: modules half gone)
        super().__del__()

    def _report(self) -> None:
        if _reported_at_exit():
            return          # reported at exit already (as still open)
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

