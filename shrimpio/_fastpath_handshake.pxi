# Included by _fastpath.pyx: the system calls of a stream connection's
# set-up, one Python call per side (the protocol, its checks and the
# objects stay in shrimpio/_handshake.py and _connection.py).
#
# A connect or an accept is a dozen system calls of a microsecond or two
# each; made one by one from Python, each costs several times that in
# objects (socket wrappers, tuples, exceptions for EAGAIN) and calls.  Here
# they run in C with the GIL released, and only their results come back.

cdef extern from "_fastpath_ctl.h" nogil:
    int shr_dial_unix(const char *path, size_t len, long long timeout_us)
    long long shr_peer_uid(int sock)
    int shr_is_unix_seqpacket(int fd)
    int shr_stream_hello(int ctl, int user, int family, const char *ip, size_t iplen,
                         const char *pre, const char *head, size_t headlen,
                         const char *tail, size_t taillen, const int *fds, int *port)

cdef extern from "<sys/socket.h>" nogil:
    int accept4(int sockfd, void *addr, void *addrlen, int flags)
    int SOCK_CLOEXEC
    int MSG_DONTWAIT
    int MSG_CMSG_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    unsigned int geteuid()

cdef extern from "<errno.h>" nogil:
    int EAGAIN, EWOULDBLOCK, ECONNABORTED

cdef extern from "<fcntl.h>" nogil:
    int F_DUPFD_CLOEXEC


cdef long long _timeout_us(timeout) except? -2:
    """None -> -1 (wait as long as it takes); seconds -> microseconds."""
    if timeout is None:
        return -1
    t = float(timeout)
    if t <= 0:
        return 0
    return max(1, <long long>(t * 1e6 + 0.5))


def dial_unix(bytes path not None, timeout=None):
    """A blocking ``AF_UNIX``/``SOCK_SEQPACKET`` socket (close-on-exec)
    connected to ``path``: its fd, or ``-errno`` (``-EAGAIN``: the
    listener's backlog stayed full for ``timeout`` seconds; ``None`` waits
    as long as that takes, 0 not at all).  Signals are handled as by the
    socket module (a handler runs, the call is retried)."""
    cdef long long us = _timeout_us(timeout)
    cdef const char *p = path
    cdef size_t n = len(path)
    cdef int fd
    while True:
        with nogil:
            fd = shr_dial_unix(p, n, us)
        if fd != -EINTR:
            return fd
        PyErr_CheckSignals()


def stream_connect(bytes path not None, timeout, int user_fd, int family, bytes ip not None,
                   bytes pre not None, bytes head not None, bytes tail not None, int seg_fd,
                   int space_fd):
    """A client's connect to a listener's registry entry ``path``, in one call:
    dial (as :func:`dial_unix`), check that the listener is this user
    (``SO_PEERCRED``), and, if ``seg_fd >= 0``, bind ``user_fd`` to (``ip``,
    0) and send the hello ``pre`` + length + ``head`` + port + ``tail``
    with ``seg_fd`` and ``space_fd`` (see ``shr_stream_hello``).

    Returns ``(ctl, port)``: ``ctl < 0`` is ``-errno`` of the dial (nothing
    else done); ``port == 0`` means no hello went (no kit, or the socket
    was bound already): the caller sends it its own way over ``ctl``, now
    its fd.  A listener of another user raises ``PermissionError``; other
    failures ``OSError``; either way ``ctl`` is closed."""
    cdef int ctl, rc = 0, port = 0, err
    cdef long long uid
    cdef int fds[2]
    if len(pre) != 8:
        raise ValueError("pre must be the 8 bytes of the header before its length")
    ctl = dial_unix(path, timeout)
    if ctl < 0:
        return ctl, 0
    fds[0] = seg_fd
    fds[1] = space_fd
    cdef const char *ipp = ip
    cdef const char *prep = pre
    cdef const char *hp = head
    cdef const char *tp = tail
    cdef size_t ipn = len(ip), hn = len(head), tn = len(tail)
    with nogil:
        uid = shr_peer_uid(ctl)
        err = errno
        if uid == geteuid() and seg_fd >= 0:
            rc = shr_stream_hello(ctl, user_fd, family, ipp, ipn, prep, hp, hn, tp, tn, fds, &port)
            err = errno
    if uid < 0 or rc < 0:
        close(ctl)
        raise OSError(err, _os.strerror(err))
    if uid != geteuid():
        close(ctl)
        raise PermissionError(_errno.EACCES, "shrimpio endpoint is served by uid %d, not by "
                              "this user (uid %d)" % (uid, geteuid()))
    return ctl, (port if rc == 1 else 0)


def stream_accept(int listener, double spin, double wait, Py_ssize_t bufsize, int maxfds):
    """The next client of a (non-blocking) registry listener that is this
    user and sends a message, in one call: ``accept4``, ``SO_PEERCRED``
    (another user's client is dropped), a second fd of the connection (the
    server's doorbell), a busy-poll of up to ``spin`` seconds for the
    message, then a wait of up to ``wait`` seconds, and ``recvmsg`` (at most
    ``bufsize`` bytes and ``maxfds`` fds).

    Returns ``(ctl, bell, data, fds, msg_flags, space_ok)``, everything the
    caller's to check and close (``space_ok``: ``fds[1]`` is a Unix
    seqpacket socket), or None when no client is waiting.  A client that
    fails before its message (dies, sends nothing in time, is refused) is
    closed (it reads EOF) and the next one taken."""
    cdef int fd, bell, r, nfds = 0, mflags = 0, space_ok = 0, interrupted
    cdef long long uid
    cdef ssize_t got
    cdef int fdv[16]
    cdef pollfd p
    cdef int64_t limit
    cdef char *buf
    if bufsize < 0 or maxfds < 0 or maxfds > SHR_CTL_MAX_FDS or spin != spin or wait != wait:
        raise ValueError("bad buffer size, fd count or time")
    out = PyBytes_FromStringAndSize(NULL, bufsize)
    buf = PyBytes_AS_STRING(out)
    while True:
        with nogil:
            fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC)
        if fd < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR or errno == ECONNABORTED:
                return None           # (a signal: the caller's loop comes back)
            PyErr_SetFromErrno(OSError)
        got = -1
        with nogil:
            uid = shr_peer_uid(fd)
            bell = fcntl(fd, F_DUPFD_CLOEXEC, 0) if uid == geteuid() else -1
            if bell >= 0:
                # The client sends its hello right after its connect: spin
                # for it as a ring reader would, then sleep.
                p.fd = fd
                p.events = POLLIN
                p.revents = 0
                limit = shr_now_ns() + <int64_t>(min(max(spin, 0.0), 1.0) * 1e9)
                while poll(&p, 1, 0) == 0 and shr_now_ns() < limit:
                    for r in range(16):
                        shr_cpu_relax()
        if bell >= 0:
            limit = shr_now_ns() + <int64_t>(min(max(wait, 0.0), 60.0) * 1e9)
            while True:
                interrupted = 0
                with nogil:
                    while True:
                        got = shr_recvmsg_fds(fd, buf, bufsize, fdv, maxfds, &nfds, &mflags,
                                              MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
                        if got >= 0 or (errno != EAGAIN and errno != EINTR):
                            break
                        r = <int>((limit - shr_now_ns()) // 1000000)
                        if r <= 0:
                            break                 # nothing in time
                        r = poll(&p, 1, r)
                        if r == 0:
                            break
                        if r < 0 and errno == EINTR:
                            interrupted = 1
                            break
                    if got > 0 and nfds >= 2:
                        space_ok = shr_is_unix_seqpacket(fdv[1])
                if not interrupted:
                    break
                try:
                    PyErr_CheckSignals()      # a handler runs; the wait goes on
                except BaseException:
                    close(bell)
                    close(fd)
                    raise
        if got > 0 or nfds > 0:
            return (fd, bell, out if got == bufsize else out[:got], [fdv[i] for i in range(nfds)],
                    mflags, bool(space_ok))
        if bell >= 0:
            close(bell)
        close(fd)                    # refused, dead or silent: it reads EOF
        PyErr_CheckSignals()
