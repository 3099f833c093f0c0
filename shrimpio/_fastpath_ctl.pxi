# Included by _fastpath.pyx: the system calls of a connection's set-up that
# Python makes dear (see _fastpath_ctl.h), and writing the two ring headers
# of a new connection's segment.

cdef extern from "_fastpath_ctl.h" nogil:
    int SHR_CTL_MAX_FDS
    ssize_t shr_sendmsg_fds(int sock, const char *buf, size_t len, const int *fds, int nfds)
    ssize_t shr_recvmsg_fds(int sock, char *buf, size_t len, int *fds, int maxfds, int *nfds,
                            int *msg_flags, int flags)


def sendmsg_fds(int sock, data, fds=()):
    """``sendmsg(sock, [data], [(SOL_SOCKET, SCM_RIGHTS, fds)], MSG_NOSIGNAL)``
    for at most 16 fds: the bytes sent.  Signals are handled as by the
    socket module (a handler runs, the call is retried)."""
    cdef Py_buffer buf
    cdef int fdv[16]
    cdef int nfds = 0
    cdef ssize_t r
    for fd in fds:
        if nfds == SHR_CTL_MAX_FDS:
            raise ValueError("at most %d fds in one message" % SHR_CTL_MAX_FDS)
        fdv[nfds] = fd
        nfds += 1
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        while True:
            with nogil:
                r = shr_sendmsg_fds(sock, <const char *>buf.buf, buf.len, fdv, nfds)
            if r >= 0:
                return r
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            PyErr_SetFromErrno(OSError)
    finally:
        PyBuffer_Release(&buf)


def recvmsg_fds(int sock, Py_ssize_t bufsize, int maxfds, int flags=0):
    """``recvmsg`` of one datagram of at most ``bufsize`` bytes with room for
    ``maxfds`` (at most 16) fds: ``(data, fds, msg_flags)``.  The fds are the
    caller's.  Errors (``BlockingIOError`` with ``MSG_DONTWAIT``...) as
    ``OSError``; signals as by the socket module."""
    cdef int fdv[16]
    cdef int nfds = 0, mflags = 0
    cdef ssize_t r
    cdef char *p
    if bufsize < 0 or maxfds < 0 or maxfds > SHR_CTL_MAX_FDS:
        raise ValueError("bad buffer size or fd count")
    out = PyBytes_FromStringAndSize(NULL, bufsize)
    p = PyBytes_AS_STRING(out)
    while True:
        with nogil:
            r = shr_recvmsg_fds(sock, p, bufsize, fdv, maxfds, &nfds, &mflags, flags)
        if r >= 0:
            break
        if errno == EINTR:
            PyErr_CheckSignals()
            continue
        PyErr_SetFromErrno(OSError)
    return (out if r == bufsize else out[:r]), [fdv[i] for i in range(nfds)], mflags


def prepare_rings(Segment seg not None, Py_ssize_t offset2, capacity1, capacity2,
                  Py_ssize_t small=0):
    """Write the headers of two empty rings, at offset 0 and ``offset2`` of
    ``seg`` (a new connection's segment, before anyone attaches): what
    ``Ring(seg, ..., create=True)`` does, without making the objects.
    With ``small``, two-area rings (header version 2): the headers and
    small areas must lie in the segment's hot part (the large areas are
    checked by the rings that attach)."""
    cdef uint64_t c1, c2
    if seg.base == NULL:
        raise ValueError("segment is closed")
    c1 = capacity1
    c2 = capacity2
    for cap in (c1, c2):
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1)):
            raise ValueError("ring capacity must be a power of two in [%d, 2**40], got %d"
                             % (MIN_CAPACITY, cap))
    if small:
        if (small < <Py_ssize_t>MIN_CAPACITY or small & (small - 1) or offset2 % 64
                or offset2 < SHR_RING_HEADER + small or offset2 + SHR_RING_HEADER + small > min(seg.size, seg.mapped)
                or <uint64_t>small >= c1 or <uint64_t>small >= c2):
            raise ValueError("the two rings do not fit the segment")
    elif (offset2 < 0 or offset2 % 64 or <uint64_t>offset2 < SHR_RING_HEADER + c1
            or offset2 + SHR_RING_HEADER > seg.size
            or <uint64_t>(seg.size - offset2 - SHR_RING_HEADER) < c2):
        raise ValueError("the two rings do not fit the segment")
    shr_init(<shr_ring_hdr *>seg.base, c1, small)
    shr_init(<shr_ring_hdr *>(seg.base + offset2), c2, small)
    # A new connection's readers count as asleep: the first byte each way
    # rings the doorbell, so a program that waits for the fd in a poller of
    # its own before it ever reads sees the data come (_ring_arm_reader
    # keeps it so after a read that found the ring empty).
    shr_reader_asleep(<shr_ring_hdr *>seg.base)
    shr_reader_asleep(<shr_ring_hdr *>(seg.base + offset2))
