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
    cdef bint reset_told           # the peer's death was reported as a reset

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
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if flags & _ODD_SEND:
                _odd_send_flags(self, flags, False)
            if buf.len == 0:
                self._call_check(self.tx)
                return 0
            while True:
                try:
                    n = self.tx._write_bufs(&buf, 1, buf.len, t, False) if done == 0 else \
                        self._write_rest(&buf, done, t)
                except OSError:
                    if done:
                        break           # report what went in; the error comes next call
                    self._translate()
                except ValueError:
                    if done:
                        break
                    self._translate()
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
        return self.tx._write_bufs(&rest, 1, rest.len, t, False)

    cdef Py_ssize_t _send_now(self, Py_buffer *buf) except -1:
        """A non-blocking send for the asyncio transport: what fits now
        (``BlockingIOError`` if nothing does), errors as ``send``'s."""
        cdef Py_ssize_t n = 0
        try:
            n = self.tx._write_bufs(buf, 1, buf.len, 0.0, False)
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

    cdef int _call_check(self, Ring ring) except -1:
        try:
            ring._writable_check()
        except ValueError:
            self._translate()
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
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if flags & _ODD_SEND:
                _odd_send_flags(self, flags, False)
            try:
                if buf.len == 0:
                    self.tx._writable_check()
                else:
                    self.tx._write_bufs(&buf, 1, buf.len, t, True)
            except (OSError, ValueError):
                self._translate()
            self.bytes_sent += buf.len
        finally:
            PyBuffer_Release(&buf)

    def sendmsg(self, buffers, flags_=0, timeout=None):
        """As ``socket.sendmsg`` without ancillary data: a gather write;
        blocking, it queues everything (as ``send``)."""
        cdef int flags = _flags_arg(flags_)
        cdef double t = self._t(flags, timeout)
        cdef Py_ssize_t n = 0
        if flags & _ODD_SEND:
            _odd_send_flags(self, flags, True)
        try:
            n = self.tx.writev(buffers, None if t < 0 else t, t < 0)
        except (OSError, ValueError):
            self._translate()
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
                if t != 0 and not rx._avail() and not rx.at_eof():
                    if not rx.wait_readable(None if t < 0 else t):
                        raise TimeoutError("timed out")
                n = <Py_ssize_t>min(rx._avail(), <uint64_t>nbytes)
                if n == 0 and t == 0 and not rx.at_eof():
                    armed = rx._arm_reader()
                    if armed == 0:
                        raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
                    n = <Py_ssize_t>min(rx._avail(), <uint64_t>nbytes)   # came meanwhile (or gone: 0)
                rx._copy_out(dst, n)        # a copy across the wrap; nothing consumed
                return n
            if flags & _MSG_WAITALL and t != 0:
                got = 0
                while got < nbytes:
                    n = rx._read(dst + got, nbytes - got, t)
                    if n == 0:
                        break
                    got += n
                self.bytes_received += got
                return got
            n = rx._read(dst, nbytes, t)
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
        self.bytes_received += n
        return n
