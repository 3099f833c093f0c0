# Included by _fastpath.pyx: the per-call data path of a shared-memory stream
# socket, in C so that socket.send/recv_into over shared memory cost little
# more than the ring operations themselves.  It implements socket semantics
# (flags, timeouts, errors) on top of two rings; shrimpio/socket.py calls it.

import socket as _pysocket

cdef int _MSG_DONTWAIT = int(_pysocket.MSG_DONTWAIT)
cdef int _MSG_PEEK = int(_pysocket.MSG_PEEK)
cdef int _MSG_WAITALL = int(_pysocket.MSG_WAITALL)
cdef int _MSG_OOB = int(_pysocket.MSG_OOB)
cdef int _MSG_ERRQUEUE = int(getattr(_pysocket, "MSG_ERRQUEUE", 0x2000))
cdef int _MSG_FASTOPEN = int(getattr(_pysocket, "MSG_FASTOPEN", 0x20000000))
cdef int _MSG_CMSG_COMPAT = <int>0x80000000   # kernel-internal: sendmsg/recvmsg refuse it
# Flags whose answer is an error on a connected Linux TCP socket, whatever
# the data: the calls check them only when one of these bits is set.
cdef int _ODD_SEND = _MSG_FASTOPEN | _MSG_CMSG_COMPAT
cdef int _ODD_RECV = _MSG_ERRQUEUE | _MSG_OOB | _MSG_CMSG_COMPAT

from cpython.number cimport PyNumber_Index

cdef class Stream


cdef inline int _flags_arg(object flags) except? -1:
    """``flags`` as CPython's socket module takes it: an integer (its
    ``__index__``; TypeError for a float), OverflowError beyond a C int."""
    if type(flags) is not int:
        flags = PyNumber_Index(flags)
    return flags


cdef int _odd_send_flags(Stream st, int flags, bint msg) except -1:
    """What Linux TCP answers to these send flags on a connected socket."""
    if st.closed or st.tx.h == NULL:
        raise OSError(_errno.EBADF, "Bad file descriptor")
    if msg and flags & _MSG_CMSG_COMPAT:
        raise OSError(_errno.EINVAL, "Invalid argument")
    if flags & _MSG_FASTOPEN:
        raise OSError(_errno.EISCONN, "Transport endpoint is already connected")
    return 0


cdef int _odd_recv_flags(Stream st, int flags, bint msg) except -1:
    """What Linux TCP answers to these receive flags (never urgent data,
    an empty error queue)."""
    if st is not None and (st.closed or st.rx.h == NULL):
        raise OSError(_errno.EBADF, "Bad file descriptor")
    if msg and flags & _MSG_CMSG_COMPAT:
        raise OSError(_errno.EINVAL, "Invalid argument")
    if flags & _MSG_ERRQUEUE:
        raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
    if flags & _MSG_OOB:
        raise OSError(_errno.EINVAL, "Invalid argument")
    return 0


def check_recvmsg_flags(flags):
    """Validate ``recvmsg``-style flags as the stdlib would (type, range,
    the ones Linux refuses for a connected TCP socket); returns them as an int."""
    cdef int f = _flags_arg(flags)
    if f & _ODD_RECV:
        _odd_recv_flags(None, f, True)
    return f


@cython.no_gc               # (its two rings lead nowhere back: see _fastpath.pxd)
cdef class Stream:
    """The data path of one shared-memory stream connection: ``tx`` carries
    our bytes to the peer, ``rx`` the peer's to us.  Methods take the
    socket's timeout (``None``, ``0.0`` or seconds) and flags and behave as
    the stdlib socket's methods of the same name."""

    cdef public Ring tx
    cdef public Ring rx
    cdef public unsigned long long bytes_sent
    cdef public unsigned long long bytes_received
    cdef public bint rd_shut       # shutdown(SHUT_RD) in this process
    cdef public bint closed
    cdef bint reset_told           # the peer's death or close was reported as a reset
    cdef bint pipe_told            # a send was taken (and dropped) after the peer closed

    def __cinit__(self, Ring tx not None, Ring rx not None):
        self.tx = tx
        self.rx = rx

    cdef inline double _t(self, int flags, object timeout) except? -2.0:
        # As CPython: MSG_DONTWAIT makes a blocking socket's call non-blocking;
        # a socket with a timeout still waits up to it.
        if timeout is None:
            return 0.0 if flags & _MSG_DONTWAIT else -1.0
        return _timeout_arg(timeout)

    def send(self, data, flags_=0, timeout=None):
        """As ``socket.send``: blocking sends queue everything (as Linux TCP);
        otherwise what fits."""
        cdef Py_buffer buf
        cdef int flags = _flags_arg(flags_)
        cdef double t = self._t(flags, timeout)
        cdef Py_ssize_t done = 0, n
        cdef uint64_t head0 = self.tx.head
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if flags & _ODD_SEND:
                _odd_send_flags(self, flags, False)
            if buf.len == 0:
                try:
                    _ring_writable_check(self.tx)
                except (OSError, ValueError):
                    return self._write_failed(0, head0)
                return 0
            while True:
                try:
                    n = _ring_write_bufs(self.tx, &buf, 1, buf.len, t, False) if done == 0 else \
                        self._write_rest(&buf, done, t)
                except (OSError, ValueError):
                    if not done:
                        done = self._write_failed(buf.len, head0)
                    break               # report what went in; the error comes next call
                done += n
                if t >= 0 or done >= buf.len:
                    break
            self.bytes_sent += done
            return done
        finally:
            PyBuffer_Release(&buf)

    cdef Py_ssize_t _write_rest(self, Py_buffer *buf, Py_ssize_t done, double t) except -1:
        cdef Py_buffer rest
        rest.buf = <char *>buf.buf + done
        rest.len = buf.len - done
        return _ring_write_bufs(self.tx, &rest, 1, rest.len, t, False)

    cdef Py_ssize_t _send_now(self, Py_buffer *buf) except -1:
        """A non-blocking send for the asyncio transport: what fits now
        (``BlockingIOError`` if nothing does), errors as ``send``'s."""
        cdef Py_ssize_t n = 0
        try:
            n = _ring_write_bufs(self.tx, buf, 1, buf.len, 0.0, False)
        except (OSError, ValueError):
            self._translate()
        self.bytes_sent += n
        return n

    cdef bint _unread_by_peer(self):
        """Did bytes we sent stay unread in the peer's ring?"""
        cdef Ring tx = self.tx
        if tx.h == NULL or tx.broken or self.rd_shut:
            return False
        return shr_load_tail(tx.h) != tx.head

    cdef Py_ssize_t _write_failed(self, Py_ssize_t want, uint64_t head0) except -1:
        """A write of ``want`` bytes failed (the exception is being handled)
        and re-raises it as the socket's, unless the peer had closed its
        reading side before a byte of the call went in (``head0``: our
        index before it).  Then as Linux TCP, where the peer's kernel takes
        what comes after its close and answers with a reset: the first send
        since succeeds (the bytes, which nobody will read, are dropped: up
        to a ring's worth, as a socket buffer's), and later ones raise
        ``BrokenPipeError``.  A peer that closed with bytes of ours unread
        was reset at once: the first send or recv raises
        ``ConnectionResetError``.  Returns the count the send reports."""
        cdef Ring tx = self.tx
        import sys
        exc = sys.exc_info()[1]
        if not (isinstance(exc, BrokenPipeError) and not self.closed and tx.h != NULL
                and not tx.wshut and not tx.broken and tx.head == head0
                and shr_load_rshut(tx.h)):
            self._translate()
        if self._reset_due():
            self.reset_told = True
            raise ConnectionResetError(_errno.ECONNRESET, "Connection reset by peer") from None
        if self.reset_told or self.pipe_told:
            raise BrokenPipeError(_errno.EPIPE, "Broken pipe") from None
        if want:
            self.pipe_told = True
        return min(<uint64_t>want, tx.cap)

    cdef bint _reset_due(self):
        """Did the peer close (not only shut down) leaving bytes of ours
        unread, and was that not reported yet?  (Linux TCP answers such a
        close with a reset.)  Asks the doorbell (one poll) only then."""
        cdef Ring tx = self.tx
        if self.reset_told or self.closed or tx.h == NULL or tx.broken:
            return False
        if not shr_load_rshut(tx.h) or shr_load_tail(tx.h) == tx.head:
            return False
        return _ring_peer_gone(tx, self.rx.data_bell)

    cdef Py_ssize_t _eof(self) except -1:
        """End of stream for a read: 0, or the reset a close with bytes of
        ours unread stands for (once, as over TCP: see _write_failed)."""
        if self._reset_due():
            self.reset_told = True
            raise ConnectionResetError(_errno.ECONNRESET, "Connection reset by peer")
        return 0

    cdef int _translate(self) except -1:
        """Re-raise the ring exception being handled as the socket's."""
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):
            raise TimeoutError("timed out") from None
        if isinstance(exc, ValueError) and (self.closed or self.tx.h == NULL or self.rx.h == NULL):
            raise OSError(_errno.EBADF, "Bad file descriptor") from None
        raise exc

    def sendall(self, data, flags_=0, timeout=None):
        """As ``socket.sendall`` (the timeout covers the whole call)."""
        cdef Py_buffer buf
        cdef int flags = _flags_arg(flags_)
        cdef double t = self._t(flags, timeout)
        cdef uint64_t head0 = self.tx.head
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if flags & _ODD_SEND:
                _odd_send_flags(self, flags, False)
            try:
                if buf.len == 0:
                    _ring_writable_check(self.tx)
                else:
                    _ring_write_bufs(self.tx, &buf, 1, buf.len, t, True)
            except (OSError, ValueError):
                if self._write_failed(buf.len, head0) < buf.len:
                    raise BrokenPipeError(_errno.EPIPE, "Broken pipe") from None
            self.bytes_sent += buf.len
        finally:
            PyBuffer_Release(&buf)

    def sendmsg(self, buffers, flags_=0, timeout=None):
        """As ``socket.sendmsg`` without ancillary data: a gather write;
        blocking, it queues everything (as ``send``)."""
        cdef int flags = _flags_arg(flags_)
        cdef double t = self._t(flags, timeout)
        cdef Py_ssize_t n = 0
        cdef uint64_t head0 = self.tx.head
        if flags & _ODD_SEND:
            _odd_send_flags(self, flags, True)
        try:
            n = self.tx.writev(buffers, None if t < 0 else t, t < 0)
        except (OSError, ValueError):
            n = self._write_failed(sum([memoryview(b).nbytes for b in buffers]), head0)
        self.bytes_sent += n
        return n

    def recv(self, Py_ssize_t bufsize, flags_=0, timeout=None):
        """As ``socket.recv``."""
        cdef int flags = _flags_arg(flags_)
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        out = PyBytes_FromStringAndSize(NULL, bufsize)
        cdef Py_ssize_t n = self._recv(PyBytes_AS_STRING(out), bufsize, flags, timeout)
        return out if n == bufsize else out[:n]

    def recv_into(self, buffer, Py_ssize_t nbytes=0, flags_=0, timeout=None):
        """As ``socket.recv_into``."""
        cdef Py_buffer buf
        cdef int flags = _flags_arg(flags_)
        try:
            PyObject_GetBuffer(buffer, &buf, PyBUF_WRITABLE)
        except (BufferError, TypeError):
            raise TypeError("recv_into() argument 1 must be read-write bytes-like object, not %s"
                            % ("None" if buffer is None else type(buffer).__name__)) from None
        try:
            if nbytes < 0:
                raise ValueError("negative buffersize in recv_into")
            if nbytes > buf.len:
                raise ValueError("buffer too small for requested bytes")
            return self._recv(<char *>buf.buf, nbytes or buf.len, flags, timeout)
        finally:
            PyBuffer_Release(&buf)

    cdef Py_ssize_t _recv(self, char *dst, Py_ssize_t nbytes, int flags, object timeout) except -1:
        cdef double t = self._t(flags, timeout)
        cdef Py_ssize_t n, got
        cdef int armed
        cdef Ring rx = self.rx
        if nbytes == 0:
            if self.closed or rx.h == NULL:
                raise OSError(_errno.EBADF, "Bad file descriptor")
            return 0
        if flags & _ODD_RECV:
            _odd_recv_flags(self, flags, False)
        if self.rd_shut:
            # As Linux after shutdown(SHUT_RD): a read never waits; it gets
            # what is there (the peer may still send), else end of file.
            t = 0.0
        try:
            if flags & _MSG_PEEK:
                if t != 0 and not _ring_avail(rx) and not rx.at_eof():
                    if not rx.wait_readable(None if t < 0 else t):
                        raise TimeoutError("timed out")
                n = <Py_ssize_t>min(_ring_avail(rx), <uint64_t>nbytes)
                if n == 0 and t == 0 and not rx.at_eof():
                    armed = _ring_arm_reader(rx)
                    if armed == 0:
                        raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
                    n = <Py_ssize_t>min(_ring_avail(rx), <uint64_t>nbytes)   # came meanwhile (or gone: 0)
                _ring_copy_out(rx, dst, n)        # a copy across the wrap; nothing consumed
                return n
            if flags & _MSG_WAITALL and t != 0:
                got = 0
                while got < nbytes:
                    n = _ring_read(rx, dst + got, nbytes - got, t)
                    if n == 0:
                        break
                    got += n
                n = got
            else:
                n = _ring_read(rx, dst, nbytes, t)
        except RingCorruptedError:
            raise                   # the peer broke the ring: its calls raise
        except ConnectionResetError:
            # The peer is gone without shutting its side (it died).  As
            # Linux TCP: if bytes of ours were left unread, its kernel
            # answered with a reset: ECONNRESET, once; else (and after
            # that) end of file.  (Its data came first: the ring said so.)
            if not self.reset_told and self._unread_by_peer():
                self.reset_told = True
                raise ConnectionResetError(_errno.ECONNRESET, "Connection reset by peer") from None
            return 0
        except BlockingIOError:
            if self.rd_shut:
                return 0
            raise
        except (TimeoutError, ValueError):
            self._translate()
        if n == 0:
            return self._eof()
        self.bytes_received += n
        return n
