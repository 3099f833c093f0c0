"""TLS over shared-memory connections: ``SSLContext.wrap_socket`` on a shrimpio socket.

Theory of operation
-------------------
The stdlib's ``ssl.SSLSocket`` takes over the wrapped socket's fd and hands
it to its C TLS engine (``_ssl._SSLSocket``), which reads and writes that fd
itself.  A shared-memory connection's fd is its control socket (the
doorbell), not the byte stream, so that engine would read doorbell bytes and
write ciphertext where the peer never looks.

Under the patch (:mod:`shrimpio.patch` sets ``SSLContext.sslsocket_class``),
``wrap_socket`` of a shrimpio socket that is on shared memory, listening, or
not yet connected makes :class:`SSLSocket` instead: a subclass of *both*
``ssl.SSLSocket`` (so ``isinstance`` holds and every method is the stdlib's
own Python code) and :class:`shrimpio.socket.socket` (so the object keeps
the connection, its fd and its report, and the pollers find it in
``shrimpio.socket._by_fd``).  The stdlib's methods drive the engine they
find in ``_sslobj``; for a shared-memory connection that is an
:class:`_Engine`: the same calls as the C engine, made by the C engine of
``SSLContext.wrap_bio`` over two ``ssl.MemoryBIO`` objects, with the
ciphertext moved between the BIOs and the connection's rings (its
``Stream``).  Everything OpenSSL decides (alerts, certificate errors,
``close_notify``, ragged EOF) therefore comes from OpenSSL with the
stdlib's types and messages; what the C engine does around OpenSSL is done
here with the same results:

* the socket's timeout: ``None`` blocks on the ring, ``0.0`` turns "needs
  more bytes" into the engine's own ``SSLWantReadError`` (and a ring that
  cannot take the ciphertext into ``SSLWantWriteError``), a number is one
  deadline for the whole call, ending in ``TimeoutError("The read/write/
  handshake operation timed out")``;
* ciphertext is taken from the ring one TLS record at a time, as OpenSSL
  reads a socket (CPython leaves read-ahead off): the rest stays in the
  ring, so select/poll/epoll report what a kernel socket would (data the
  engine already decrypted, ``pending()``, is not readiness, as with the
  stdlib), and after ``unwrap()`` the bytes behind the peer's
  ``close_notify`` are still in the ring for the plain socket;
* a write that the ring cannot take in time keeps its ciphertext and
  raises; the retry (the same data, as OpenSSL requires) sends the rest
  first, as OpenSSL's pending-write state does;
* one thread at a time is in OpenSSL (no call waits while inside it), so a
  reader thread and a writer thread may share the socket; the stdlib's
  engine does not serialise them, and OpenSSL objects are not thread-safe;
* if the connection's fd escapes to a kernel stream (:mod:`shrimpio._escape`)
  the engine moves its ciphertext through the socket's fd from then on.

A kernel TCP connection keeps the stdlib's C engine: with the stdlib's
``ssl.SSLSocket``, or with :class:`SSLSocket` when it holds a ``shrimpio
stat`` slot (a connection of a patched program that went by TCP), so that
the TLS socket is listed while it is open.  A socket wrapped before ``connect()`` does not yet know
its path: it is made here, and ``connect()`` gives it the C engine if the
connection went to TCP.
"""

from __future__ import annotations

import errno
import socket as _std
import ssl
import threading
import time
import weakref
from typing import Any, Optional

from . import _sockinfo, socket as _ss

__all__ = ["SSLSocket", "StdSSLSocket"]

#: The stdlib's class (what a kernel connection is wrapped in).
StdSSLSocket = ssl.SSLSocket
_StdSocket = _ss.StdSocket
_csocket = _ss._csocket.socket
_csocket_detach = _csocket.detach
_settimeout = _csocket.settimeout
_SSLError = ssl.SSLError
_WantRead = ssl.SSLWantReadError
_WantWrite = ssl.SSLWantWriteError
_monotonic = time.monotonic

# What the C engine says when a call's deadline passes (Modules/_ssl.c;
# the handshake's message is completed by _handshake_timed_out()).
_HANDSHAKE = "The handshake operation timed out"
_READ = "The read operation timed out"
_WRITE = "The write operation timed out"

_MSG_PEEK = int(_std.MSG_PEEK)
_HEADER = 5                      # TLS record header: type, version (2), length (2)
_RECORD_MAX = 16384 + 2048       # the longest record payload a peer may send
_CHUNK = 128 * 1024              # plaintext encrypted per step of a large write


def _want_write() -> _WantWrite:
    return _WantWrite(ssl.SSL_ERROR_WANT_WRITE, "The operation did not complete (write)")


_handshake_message: list = []


def _handshake_timed_out() -> TimeoutError:
    """The stdlib's handshake timeout, message and all: the C engine puts
    its source position in front ("_ssl.c:NNN: The handshake operation
    timed out"), so the first time one is needed, a handshake over a
    socketpair that no one answers is given a deadline that has passed
    by the time the ClientHello is written, and its message is kept."""
    if not _handshake_message:
        text = _HANDSHAKE
        a, b = _ss._csocket.socketpair()
        try:
            sock = _StdSocket(fileno=a.detach())
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = StdSSLSocket._create(sock, do_handshake_on_connect=False, context=ctx)
            with tls:
                tls.settimeout(1e-6)
                try:
                    tls.do_handshake()
                except TimeoutError as exc:
                    if str(exc).endswith(_HANDSHAKE):
                        text = str(exc)
                except OSError:
                    pass
        finally:
            b.close()
        _handshake_message.append(text)
    return TimeoutError(_handshake_message[0])


class _Engine:
    """What ``ssl.SSLSocket`` keeps in ``_sslobj`` for a shared-memory
    connection: the methods of the C engine (read, write, do_handshake,
    shutdown, pending, and the rest by delegation), over MemoryBIOs and the
    connection's rings (see the module docstring)."""

    __slots__ = ("_obj", "_in", "_out", "_conn", "_stream", "_backlog", "_lock", "_ssl", "_wdone",
                 "_need", "_hdr", "_body", "_raw", "_buf", "_view", "_ready")

    def __init__(self, sock: "SSLSocket", server_side: bool, hostname: Any, session: Any) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        # owner=sock: callbacks (SNI, msg_callback) see the SSLSocket, as
        # with the stdlib's engine.
        self._obj = sock._context._wrap_bio(self._in, self._out, server_side, hostname,
                                            owner=sock, session=session)
        self._conn = sock._shm
        self._stream: Any = self._conn.stream
        self._backlog = b""          # ciphertext not yet in the ring
        self._lock = threading.Lock()  # taking from the out-BIO and pushing it, in order
        # One thread at a time in OpenSSL: a reader thread and a writer
        # thread may share the socket, and an SSL object is not safe for
        # that (a writer entering while the reader processes a session
        # ticket sees the handshake state).  Never held while waiting.
        self._ssl = threading.Lock()
        self._wdone = 0              # plaintext of an unfinished write already encrypted
        self._need = _HEADER         # bytes still to read of the record's header or body
        self._hdr = b""
        self._body = False
        self._raw = False            # the peer sent something that is not TLS records
        self._buf = bytearray(_HEADER + _RECORD_MAX)
        self._view = memoryview(self._buf)
        self._ready = False          # handshake done, no EOF or close_notify seen

    def _io(self) -> Any:
        """The connection's stream; if its fd escaped to a kernel stream
        (shrimpio._escape: the fd was detached or handed to another
        process), the same calls on the socket's fd, where the escape
        carries the byte stream on."""
        conn = self._obj.owner._shm
        if conn is not self._conn:
            self._conn = conn
            self._stream = _Escaped(self._obj.owner) if conn is None else conn.stream
        return self._stream

    # -- the clock of one call --------------------------------------------------------

    def _clock(self) -> tuple[bool, Optional[float]]:
        """(non-blocking, deadline) from the socket's timeout now."""
        timeout = self._obj.owner.gettimeout()
        if timeout is None:
            return False, None
        if timeout == 0:
            return True, None
        return False, _monotonic() + timeout

    # -- ciphertext in ----------------------------------------------------------------

    def _pull(self, nonblocking: bool, deadline: Optional[float], what: str) -> bool:
        """Feed the in-BIO the rest of the current record from the ring.
        True once the record (or end of stream) is in; False if the ring
        ran dry first and the call is non-blocking.  Waits at most until
        ``deadline`` (then ``TimeoutError(what)``)."""
        if self._in.eof:
            return False
        recv_into = self._io().recv_into
        while True:
            if nonblocking:
                t: Optional[float] = 0.0
            elif deadline is None:
                t = None
            else:
                t = deadline - _monotonic()
                if t <= 0:
                    raise TimeoutError(what)
            want, whole = self._need, False
            try:
                if self._raw:
                    want = len(self._buf)
                elif want == _HEADER and not self._body and not self._hdr:
                    # At a record's start: look at its header first, and
                    # take the whole record in one go if it is a sane one.
                    if recv_into(self._buf, _HEADER, _MSG_PEEK, t) == _HEADER:
                        h = self._buf
                        length = h[3] << 8 | h[4]
                        if 20 <= h[0] <= 24 and h[1] == 3 and length <= _RECORD_MAX:
                            want, whole = _HEADER + length, True
                n = recv_into(self._buf, want, 0, t)
            except BlockingIOError:
                return False
            except TimeoutError:
                raise TimeoutError(what) from None
            if n == 0:                   # end of stream (or the peer is gone)
                self._in.write_eof()
                return True
            got = self._view[:n]
            self._in.write(got)
            if self._raw:
                return True
            if whole:                    # the record, or its header and part of its body
                if n == want:
                    return True
                self._body, self._need = True, want - n      # (n >= 5: the peek saw them)
                continue
            if self._body:
                self._need -= n
                if self._need:
                    continue
                self._body, self._need = False, _HEADER
                return True
            hdr = self._hdr + got if self._hdr else bytes(got)
            if len(hdr) < _HEADER:
                self._hdr, self._need = hdr, _HEADER - len(hdr)
                continue
            self._hdr = b""
            length = hdr[3] << 8 | hdr[4]
            if not (20 <= hdr[0] <= 24 and hdr[1] == 3 and length <= _RECORD_MAX):
                # Not a TLS record header: OpenSSL says what is wrong with it.
                self._raw = True
                return True
            if length == 0:
                self._need = _HEADER
                return True
            self._body, self._need = True, length

    # -- ciphertext out ---------------------------------------------------------------

    def _send(self, nonblocking: bool, deadline: Optional[float], what: str,
              wait_lock: bool = True) -> None:
        """Push what the engine wrote (and any backlog) into the ring: all
        of it (waiting up to ``deadline``), or, non-blocking, what fits,
        raising ``SSLWantWriteError`` if some is left.  With ``wait_lock``
        false, leave it to the thread that is pushing now, if any."""
        if not self._lock.acquire(wait_lock):
            return
        try:
            stream = self._io()
            if self._out.pending:
                out = self._out.read()
                self._backlog = self._backlog + out if self._backlog else out
            data = self._backlog
            if not data:
                return
            if nonblocking:
                try:
                    n = stream.send(data, 0, 0.0)
                except BlockingIOError:
                    n = 0
                self._backlog = data[n:]
                if self._backlog:
                    raise _want_write()
                return
            if deadline is None:
                stream.sendall(data, 0, None)
                self._backlog = b""
                return
            view = memoryview(data)
            try:
                while view:
                    t = deadline - _monotonic()
                    if t <= 0:
                        raise TimeoutError(what)
                    try:
                        n = stream.send(view, 0, t)
                    except TimeoutError:
                        raise TimeoutError(what) from None
                    view = view[n:]
            finally:
                self._backlog = bytes(view)
        finally:
            self._lock.release()

    def _offer(self) -> None:
        """Push what a call that succeeded left behind if the ring takes it
        now; the rest waits for the next write."""
        try:
            self._send(True, None, _WRITE, wait_lock=False)
        except OSError:
            pass

    def _spill(self) -> None:
        """After an error from OpenSSL: send what it queued (an alert) if
        the ring takes it now, else drop it, as the C engine makes one
        attempt to write it to the socket.  (Kept, it would turn the next
        call's error into the ring's instead of OpenSSL's.)"""
        try:
            self._send(True, None, _WRITE, wait_lock=False)
        except OSError:
            self._backlog = b""

    # -- the C engine's calls -----------------------------------------------------------

    def do_handshake(self) -> None:
        try:
            self._handshake()
        except TimeoutError as exc:
            if str(exc) != _HANDSHAKE:
                raise
            raise _handshake_timed_out() from None

    def _handshake(self) -> None:
        self._drive(self._obj.do_handshake, _HANDSHAKE, _HANDSHAKE)
        self._ready = True

    def _drive(self, step: Any, sending: str, pulling: str) -> None:
        """Runs one TLS exchange (the handshake, the shutdown) to its end:
        each time the engine wants the peer's records, what it wrote goes out
        and the next records come in; what it wrote last goes out too.
        `sending` and `pulling` name the operation in a timeout's message."""
        nonblocking, deadline = self._clock()
        while True:
            try:
                with self._ssl:
                    step()
            except _WantRead:
                self._send(nonblocking, deadline, sending)
                if not self._pull(nonblocking, deadline, pulling):
                    raise
                continue
            except _SSLError:
                self._spill()
                raise
            break
        self._send(nonblocking, deadline, sending)

    def read(self, n: int = 1024, buffer: Any = None) -> Any:
        obj = self._obj
        clock = None
        if self._ready and n > 0 and not self._in.pending and not obj.pending() \
                and (buffer is None or _nonempty(buffer)):
            # The engine has nothing: it would ask for the next record.
            # Fetch it first (cheaper than its SSLWantReadError); if it is
            # not all there, the engine raises its own error below.
            clock = self._clock()
            self._pull(clock[0], clock[1], _READ)
        while True:
            try:
                with self._ssl:
                    data = obj.read(n, buffer) if buffer is not None else obj.read(n)
            except _WantRead:
                if clock is None:
                    clock = self._clock()
                if self._out.pending:
                    # What this read produced (the handshake, if it was
                    # not done): as OpenSSL writing from SSL_read.  An
                    # unfinished write's records wait for the next write.
                    self._send(clock[0], clock[1], _READ, wait_lock=False)
                if not self._pull(clock[0], clock[1], _READ):
                    raise
                continue
            except _SSLError:
                self._spill()
                raise
            break
        if data:
            self._ready = True
            if self._out.pending:        # a reply the record asked for (key update)
                self._offer()
        elif n > 0:
            self._ready = False          # close_notify: no more records to fetch
        return data

    def write(self, data: Any) -> int:
        obj = self._obj
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            return obj.write(data)       # the engine's own error for what it refuses
        total = len(view)
        if total == 0:
            return obj.write(data)
        done = self._wdone
        if done > total:
            self._wdone = 0
            raise _SSLError(ssl.SSL_ERROR_SSL, "bad length: a retried write must pass the same data")
        nonblocking, deadline = self._clock()
        try:
            while True:
                try:
                    self._send(nonblocking, deadline, _WRITE)
                    if done >= total:
                        break
                    with self._ssl:
                        done += obj.write(view[done:done + _CHUNK])
                except _WantRead:
                    # The handshake is not done: the engine drives it.
                    self._send(nonblocking, deadline, _WRITE)
                    if not self._pull(nonblocking, deadline, _WRITE):
                        raise
        except _SSLError as exc:
            if isinstance(exc, (_WantRead, _WantWrite)):
                self._wdone = done       # the retry carries on from here
            else:
                self._wdone = 0
                self._spill()
            raise
        except BaseException:            # a timeout, an interrupt, the ring's error
            self._wdone = done
            raise
        self._wdone = 0
        self._ready = True
        return total

    def shutdown(self) -> Any:
        self._drive(self._obj.shutdown, _WRITE, _READ)
        self._ready = False
        return self._obj.owner                 # as the C engine: the socket it runs on

    def pending(self) -> int:
        return self._obj.pending()

    @property
    def context(self) -> ssl.SSLContext:
        return self._obj.context

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._obj.context = ctx

    @property
    def session(self) -> Any:
        return self._obj.session

    @session.setter
    def session(self, session: Any) -> None:
        self._obj.session = session

    def __getattr__(self, name: str) -> Any:
        # getpeercert, cipher, version, selected_alpn_protocol, ...: the engine's.
        return getattr(self._obj, name)


class _Escaped:
    """The stream calls of :class:`_Engine` (socket semantics, with a
    timeout argument) on a socket's own fd: for a connection that escaped
    to a kernel stream while TLS ran over it.  The socket's timeout is set
    for the call and put back."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = weakref.ref(sock)     # (the engine belongs to the socket)

    def _call(self, method: Any, timeout: Optional[float], *args: Any) -> Any:
        sock = self._sock()
        if sock is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        old = sock.gettimeout()
        _settimeout(sock, timeout)
        try:
            return method(sock, *args)
        finally:
            _settimeout(sock, old)

    def recv_into(self, buffer: Any, nbytes: int, flags: int, timeout: Optional[float]) -> int:
        return self._call(_csocket.recv_into, timeout, buffer, nbytes, flags)

    def send(self, data: Any, flags: int, timeout: Optional[float]) -> int:
        return self._call(_csocket.send, timeout, data, flags)

    def sendall(self, data: Any, flags: int, timeout: Optional[float]) -> None:
        self._call(_csocket.sendall, timeout, data, flags)


def _nonempty(buffer: Any) -> bool:
    try:
        return len(buffer) > 0
    except TypeError:
        return False


def _takes(sock: Any) -> bool:
    """Is ``sock`` one for :class:`SSLSocket` (shrimpio, TCP, and on shared
    memory, listening, not connected yet, or connected by kernel TCP with a
    ``shrimpio stat`` slot, which the TLS socket then holds: with the
    stdlib's class the slot would stay with the detached socket, listed
    after the TLS socket's close or dropped with the detached object)?
    Other connected kernel sockets keep the stdlib's class."""
    if not isinstance(sock, _ss.socket) or sock.fileno() < 0:
        return False
    if sock._shm is not None or sock._lst is not None or sock._tcp is not None:
        return True
    if not sock._is_tcp():
        return False
    try:
        _StdSocket.getpeername(sock)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _move(sock: "_ss.socket", new: "SSLSocket") -> None:
    """Make ``new`` the owner of ``sock``'s fd and shrimpio state (its
    connection or listener, route, counters); ``sock`` is left detached, as
    the stdlib's wrap_socket leaves it."""
    fd = sock.fileno()
    _StdSocket.__init__(new, sock.family, sock.type, sock.proto, fd)
    for name in _ss.socket.__slots__:
        try:
            value = getattr(sock, name)
        except AttributeError:
            continue                     # a slot this object never set
        setattr(new, name, value)
    sock._clear()
    sock._closed = True
    _csocket_detach(sock)
    _ss._by_fd[fd] = new
    if _ss._report_wanted():
        _ss._report_at_exit(new)


class SSLSocket(StdSSLSocket, _ss.socket):
    """``ssl.SSLSocket`` over a shrimpio socket: the stdlib's class and
    methods, with :class:`_Engine` as the TLS engine of a shared-memory
    connection (see the module docstring).  Made by
    ``SSLContext.wrap_socket`` under the patch."""

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: Optional[int] = None) -> None:
        # Not how a TLS socket is made (that is SSLContext.wrap_socket):
        # shrimpio's accept() makes an accepted connection's object with the
        # listener's class; it is a plain socket until accept() wraps it.
        _ss.socket.__init__(self, family, type, proto, fileno)
        self._context = None
        self._session = None
        self._sslobj = None
        self._connected = False
        self.server_side = False
        self.server_hostname = None
        self.do_handshake_on_connect = False
        self.suppress_ragged_eofs = True

    @classmethod
    def _create(cls, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                suppress_ragged_eofs: bool = True, server_hostname: Any = None,
                context: Any = None, session: Any = None) -> Any:
        if not _takes(sock):
            return StdSSLSocket._create(
                sock=sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                context=context, session=session)
        # The stdlib's checks, in its order and words.
        if sock.getsockopt(_std.SOL_SOCKET, _std.SO_TYPE) != _std.SOCK_STREAM:
            raise NotImplementedError("only stream sockets are supported")
        if server_side:
            if server_hostname:
                raise ValueError("server_hostname can only be specified in client mode")
            if session is not None:
                raise ValueError("session can only be specified in client mode")
        if context.check_hostname and not server_hostname:
            raise ValueError("check_hostname requires server_hostname")
        timeout = sock.gettimeout()
        self = cls.__new__(cls)
        _move(sock, self)
        self._context = context
        self._session = session
        self._sslobj = None
        self.server_side = server_side
        self.server_hostname = context._encode_hostname(server_hostname)
        self.do_handshake_on_connect = do_handshake_on_connect
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.settimeout(timeout)
        # Listening or not yet connected: no engine until connect().
        self._connected = connected = self._shm is not None or self._tcp is not None
        if connected:
            try:
                self._sslobj = self._engine(server_side)
                if do_handshake_on_connect:
                    if timeout == 0.0:
                        raise ValueError("do_handshake_on_connect should not be specified "
                                         "for non-blocking sockets")
                    self.do_handshake()
            except (OSError, ValueError):
                self.close()
                raise
        return self

    def _real_close(self) -> None:
        # The stdlib's drops the engine before the socket closes, and the
        # report is written after: keep the kernel's counts of a C engine.
        counts = _sockinfo.tls_kernel_counts(self)
        if counts is not None:
            self._sent, self._received = counts
        super()._real_close()

    def _engine(self, server_side: bool) -> Any:
        """The TLS engine for the connection this socket now has: ours over
        the rings, or the stdlib's over a kernel fd."""
        if self._shm is not None:
            return _Engine(self, server_side, self.server_hostname, self._session)
        return self._context._wrap_socket(self, server_side, self.server_hostname,
                                          owner=self, session=self._session)

    def _real_connect(self, addr: Any, connect_ex: bool) -> Optional[int]:
        # As the stdlib's, but the engine is chosen once connect() has
        # decided the path.
        if self.server_side:
            raise ValueError("can't connect in server-side mode")
        if self._connected or self._sslobj is not None:
            raise ValueError("attempt to connect already-connected SSLSocket!")
        try:
            rc: Optional[int] = None
            if connect_ex:
                rc = 0
                try:
                    _ss.socket.connect(self, addr)
                except (BlockingIOError, InterruptedError) as exc:
                    rc = exc.errno or errno.EINPROGRESS
                except OSError as exc:
                    if exc.errno is None:
                        raise
                    rc = exc.errno
            else:
                _ss.socket.connect(self, addr)
            self._sslobj = self._engine(False)
            if not rc:
                self._connected = True
                if self.do_handshake_on_connect:
                    self.do_handshake()
            return rc
        except (OSError, ValueError):
            self._sslobj = None
            raise
