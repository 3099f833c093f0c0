# Included by _fastpath.pyx: the system calls of a stream connection's
# set-up, one Python call per side (the protocol, its checks and the
# objects stay in shrimpio/_handshake.py and _connection.py).
#
# A connect or an accept is a dozen system calls of a microsecond or two
# each; made one by one from Python, each costs several times that in
# objects (socket wrappers, tuples, exceptions for EAGAIN) and calls.  Here
# they run in C with the GIL released, and only their results come back.

cdef extern from "_fastpath_ctl.h" nogil:
    int shr_dial_unix(const char *path, size_t len, long long timeout_us, int *nonblock)
    long long shr_peer_uid(int sock)
    int shr_is_unix_seqpacket(int fd)
    int shr_bind_local(int user, int family, const char *ip, size_t iplen, int *port,
                       int *claimed)
    int shr_claim_ip(int family, const char *ip, size_t iplen, int port, int *out, int other)
    void shr_port_give(int port)
    int shr_ports_use(int fd)
    int shr_send_hello(int ctl, const char *pre, const char *head, size_t headlen,
                       const char *tail, size_t taillen, int port, const int *fds)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    unsigned long FIONBIO

cdef extern from "<sys/socket.h>" nogil:
    int accept4(int sockfd, void *addr, void *addrlen, int flags)
    int SOCK_CLOEXEC
    int MSG_DONTWAIT
    int MSG_CMSG_CLOEXEC
    int MSG_CTRUNC

cdef extern from "<unistd.h>" nogil:
    unsigned int geteuid()

cdef extern from "<poll.h>" nogil:
    short POLLHUP

cdef extern from "<errno.h>" nogil:
    int EAGAIN, EWOULDBLOCK, ECONNABORTED, EMFILE

cdef extern from "<fcntl.h>" nogil:
    int F_DUPFD_CLOEXEC

cdef extern from "<sys/resource.h>" nogil:
    ctypedef unsigned long rlim_t
    struct rlimit:
        rlim_t rlim_cur
        rlim_t rlim_max
    int getrlimit(int resource, rlimit *rlim)
    int setrlimit(int resource, const rlimit *rlim)
    int RLIMIT_NOFILE

#: fds a hello brings (the segment, the space doorbell).
cdef int _HELLO_FDS = 2


cdef int _room_for_fds(int near, int n) noexcept nogil:
    """Can this process open ``n`` more fds?  ``near`` is the fd the kernel
    just gave us (the lowest free one then): far below the limit, yes
    without asking; near it, by taking (and giving back) ``n`` fds.  A hello
    received without room for its fds would lose them (the kernel drops
    what it cannot install) and with them the client."""
    cdef rlimit lim
    cdef int probe[4]
    cdef int i, got = 0, ok = 1
    if getrlimit(RLIMIT_NOFILE, &lim) != 0 or lim.rlim_cur > <rlim_t>(near + 64):
        return 1
    for i in range(n):
        probe[i] = fcntl(near, F_DUPFD_CLOEXEC, 0)
        if probe[i] < 0:
            ok = 0
            break
        got += 1
    for i in range(got):
        close(probe[i])
    return ok


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
            fd = shr_dial_unix(p, n, us, NULL)
        if fd != -EINTR:
            return fd
        PyErr_CheckSignals()


def stream_connect(bytes path not None, timeout, int user_fd, int family, bytes ip not None,
                   bytes pre not None, bytes head not None, bytes tail not None, int seg_fd,
                   int space_fd, bint bind_first=False):
    """A client's connect to a listener's registry entry ``path``, in one call:
    dial (as :func:`dial_unix`), check that the listener is this user
    (``SO_PEERCRED``), and, if ``seg_fd >= 0``, bind ``user_fd`` to (``ip``,
    0) and send the hello ``pre`` + length + ``head`` + port + ``tail``
    with ``seg_fd`` and ``space_fd`` (see ``shr_send_hello``).
    ``bind_first``: bind before the dial, so that the hello follows the
    listener's wake-up (its connect) by one system call, not four (the
    listener would park a client whose hello is late, and wait again);
    for destinations known to be served, as the socket stays bound if the
    dial fails.

    Returns ``(ctl, port, bound, claimed)``: ``ctl < 0`` is ``-errno`` of
    the dial (nothing else done but the bind, if ``bound``); ``port == 0``
    means no hello went (no kit, or the socket was bound already): the
    caller sends it its own way over ``ctl``, now its fd.  ``bound``:
    ``user_fd`` was bound here.  ``claimed``: the hello's ``port`` is
    claimed for the connection (see :func:`claim_port`; the caller gives it
    back with :func:`give_port`); a port claimed for a hello that did not go
    is given back here.  A listener of another user raises ``PermissionError``;
    other failures ``OSError``; either way ``ctl`` is closed."""
    cdef int ctl, rc = 0, port = 0, err
    cdef int bound = 0, claimed = 0
    cdef long long uid, me
    cdef int fds[2]
    if len(pre) != 8:
        raise ValueError("pre must be the 8 bytes of the header before its length")
    cdef const char *ipp = ip
    cdef const char *prep = pre
    cdef const char *hp = head
    cdef const char *tp = tail
    cdef size_t ipn = len(ip), hn = len(head), tn = len(tail)
    cdef long long us = _timeout_us(timeout)
    cdef const char *pathp = path
    cdef size_t pathn = len(path)
    cdef int nonblock = 0, off = 0
    me = geteuid()                  # (asked once per call: a process may change it)
    if seg_fd >= 0 and bind_first:
        with nogil:
            bound = shr_bind_local(user_fd, family, ipp, ipn, &port, &claimed)
            err = errno
        if bound < 0:
            raise OSError(err, _os.strerror(err))
    while True:
        with nogil:
            ctl = shr_dial_unix(pathp, pathn, us, &nonblock)
        if ctl != -EINTR:
            break
        PyErr_CheckSignals()
    if ctl < 0:
        if claimed:
            shr_port_give(port)
        return ctl, 0, bound == 1, False
    fds[0] = seg_fd
    fds[1] = space_fd
    with nogil:
        # Between the dial (which wakes the listener) and the hello, as
        # little as can be: the listener then finds it there.
        uid = shr_peer_uid(ctl)
        err = errno
        if uid == me and seg_fd >= 0:
            if not bind_first:
                bound = shr_bind_local(user_fd, family, ipp, ipn, &port, &claimed)
                err = errno
            rc = bound
            if bound == 1:
                rc = shr_send_hello(ctl, prep, hp, hn, tp, tn, port, fds)
                err = errno
        if nonblock and rc >= 0 and uid >= 0 and ioctl(ctl, FIONBIO, &off) != 0:
            rc = -1                 # (blocking from here on, as dial_unix leaves it)
            err = errno
    if claimed and rc != 1:
        shr_port_give(port)
        claimed = 0
    if uid < 0 or rc < 0:
        close(ctl)
        raise OSError(err, _os.strerror(err))
    if uid != me:
        close(ctl)
        raise PermissionError(_errno.EACCES, "shrimpio endpoint is served by uid %d, not by "
                              "this user (uid %d)" % (uid, me))
    return ctl, (port if rc == 1 else 0), bound == 1, claimed == 1


def claim_port(int family, bytes ip not None, int port, bint other=True):
    """Claim ``port``, which a socket of ours has bound at ``ip`` (packed,
    of ``family``), for a shared-memory connection; if another live
    connection of this user has it and ``other``, bind spare sockets until
    the kernel offers one that nobody claimed.  Returns ``(port, claimed)``: the port
    to use, and whether it is ours (then give it back with
    :func:`give_port` when the connection closes).  See
    ``_fastpath_ctl.h``, "Local ports"."""
    cdef int out = port
    cdef int got = shr_claim_ip(family, ip, len(ip), port, &out, other)
    if got == -2:
        raise ValueError("ip must be a packed address of family")
    return out, got == 1


def give_port(int port):
    """Give back a port :func:`claim_port` or :func:`stream_connect` claimed."""
    shr_port_give(port)


def use_ports_file(int fd):
    """Claim ports by locks on ``fd`` (the registry's ports file, opened
    for writing; -1: this process's own connections only).  Returns the fd
    used before, which the caller closes once no claim made on it is
    live (its locks go with it)."""
    return shr_ports_use(fd)


cdef object _take_hello(int fd, Py_ssize_t bufsize, int maxfds):
    """One non-blocking ``recvmsg`` of a client's hello on ``fd``:
    ``(data, fds, msg_flags, space_ok)``, ``None`` if it has not come yet,
    ``b""`` for data when the client is gone (end of file or an error)."""
    cdef ssize_t got
    cdef int nfds = 0, mflags = 0, space_ok = 0, i, err
    cdef int fdv[16]
    cdef bint alone = False, borrowed = False
    cdef pollfd p
    cdef rlimit saved, lim
    if bufsize < 0 or maxfds < 0 or maxfds > SHR_CTL_MAX_FDS:
        raise ValueError("bad buffer size or fd count")
    out = PyBytes_FromStringAndSize(NULL, bufsize)
    cdef char *buf = PyBytes_AS_STRING(out)
    # (None of these calls can wait: the GIL stays with us, see stream_accept.)
    if not _room_for_fds(fd, _HELLO_FDS):
        # A client that has closed already needs no space doorbell: with
        # room for its segment alone, it is taken alone (the kernel drops
        # the fds past the room we give it) and the listener reads what it
        # wrote, then end of file, as TCP's would (see _accept.accept_hello).
        p.fd = fd
        p.events = POLLIN
        p.revents = 0
        alone = poll(&p, 1, 0) == 1 and (p.revents & POLLHUP) != 0 and maxfds >= 1
        if alone and not _room_for_fds(fd, 1):
            # Not even that (the control socket took the last fd, where
            # TCP's accept needs no more).  The segment's fd lives only
            # until it is mapped (accept_hello closes it): borrow one fd
            # above the soft limit for that moment, if the hard limit lets
            # us, as the client cannot follow a refusal; else EMFILE.
            borrowed = (getrlimit(RLIMIT_NOFILE, &saved) == 0 and saved.rlim_cur < saved.rlim_max)
            if borrowed:
                lim = saved
                lim.rlim_cur += 1
                borrowed = setrlimit(RLIMIT_NOFILE, &lim) == 0
            if borrowed and not _room_for_fds(fd, 1):
                # (fds numbered above the soft limit, opened before it was
                # lowered: the lowest free number is past the one lent)
                setrlimit(RLIMIT_NOFILE, &saved)
                borrowed = False
            alone = borrowed
        if not alone:
            # Out of fds, as a kernel listener's accept() would be: the
            # hello stays queued on the client's socket for when there is
            # room (or a refusal: see _accept.refuse).
            raise OSError(EMFILE, "Too many open files")
    while True:
        got = shr_recvmsg_fds(fd, buf, bufsize, fdv, 1 if alone else maxfds, &nfds, &mflags,
                              MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        if got >= 0 or errno != EINTR:
            break
    err = errno
    if borrowed:
        setrlimit(RLIMIT_NOFILE, &saved)    # (an fd above a soft limit stays valid)
    if got > 0 and nfds >= 2:
        space_ok = shr_is_unix_seqpacket(fdv[1])
    if got < 0 and (err == EAGAIN or err == EWOULDBLOCK):
        return None
    fds = [fdv[i] for i in range(nfds)]
    if got <= 0:
        return b"", fds, mflags, False
    if alone:
        # (The truncation was ours; space_ok None says: segment alone.)
        return (out if got == bufsize else out[:got]), fds, mflags & ~MSG_CTRUNC, None
    return (out if got == bufsize else out[:got]), fds, mflags, bool(space_ok)


def stream_hello(int fd, Py_ssize_t bufsize, int maxfds):
    """The hello of a client that :func:`stream_accept` left waiting, if it
    has come: ``(data, fds, msg_flags, space_ok)`` as there (``data`` empty:
    the client is gone), or None.  Never waits."""
    return _take_hello(fd, bufsize, maxfds)


def stream_accept(int listener, double spin, Py_ssize_t bufsize, int maxfds):
    """The next client of a (non-blocking) registry listener that is this
    user, in one call: ``accept4``, ``SO_PEERCRED`` (another user's client
    is dropped), a busy-poll of up to ``spin`` seconds for its message,
    and ``recvmsg`` (at most ``bufsize`` bytes and ``maxfds`` fds).

    Returns ``(ctl, data, fds, msg_flags, space_ok)``, everything the
    caller's to check and close (``space_ok``: ``fds[1]`` is a Unix
    seqpacket socket; None: the client has closed, and there was room
    for its segment alone, ``fds[0]``), or None when no client is waiting.  ``data`` is
    False when this process has no room for the fds a hello brings (its
    message is left unread); None
    when the client has not sent its message within the spin: the caller
    keeps it aside and asks :func:`stream_hello` later (never waiting for
    it here: one silent client must not hold up the others).  A client
    that fails first (dies, is refused) is closed (it reads EOF) and the
    next one taken.

    The GIL is released only for the spin: the other calls cannot wait (the
    listener is non-blocking, the receive too), and each release would let
    another thread (a thread-per-client server's) take the GIL, and keep
    it until its own next release or the switch interval."""
    cdef int fd
    cdef bint mine
    cdef long long uid
    cdef pollfd p
    if spin != spin:
        raise ValueError("bad spin time")
    while True:
        fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC)
        if fd < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR or errno == ECONNABORTED:
                return None           # (a signal: the caller's loop comes back)
            PyErr_SetFromErrno(OSError)
        uid = shr_peer_uid(fd)
        mine = uid == geteuid()
        if mine:
            # The client sends its hello right after its connect: spin
            # for it as a ring reader would (one look first: it is
            # usually there).
            p.fd = fd
            p.events = POLLIN
            p.revents = 0
            if poll(&p, 1, 0) == 0 and spin > 0:
                with nogil:
                    _spin_poll(&p, 1, shr_now_ns() + <int64_t>(min(spin, 1.0) * 1e9))
        if mine:
            try:
                got = _take_hello(fd, bufsize, maxfds)
            except OSError as exc:
                if exc.errno == EMFILE:
                    return fd, False, [], 0, False    # no room for its fds (see _accept.refuse)
                close(fd)
                raise
            except BaseException:
                close(fd)
                raise
            if got is None:
                return fd, None, [], 0, False
            if got[0] or got[1]:
                return (fd,) + got
        close(fd)                    # refused or dead: it reads EOF
        PyErr_CheckSignals()


def close_fd(int fd):
    """Close ``fd``, an fd that cannot make ``close`` wait (a Unix socket, a
    memfd: never a TCP socket with a linger), keeping the GIL: ``os.close``
    hands it over, and in a process whose other threads want it (a
    thread-per-client server) the closer gets it back only at their next
    release.  An error other than EINTR (the fd is gone then) raises
    OSError, as ``os.close``."""
    if close(fd) != 0 and errno != EINTR:
        PyErr_SetFromErrno(OSError)


# -- a listener's refusal, for its client (see shr_refusal_note) ---------------

cdef extern from "_fastpath_core.h" nogil:
    int shr_refusal_take(int fd, char *out)
    int SHR_REFUSAL_MAX

def take_refusal(int fd):
    """The refusal a listener sent on the data doorbell ``fd`` before it
    closed it (the whole control message, as sent), or None.  If the peer
    has closed its end, whatever is still queued on ``fd`` is drained first
    (a peer found gone by a poll, not a read, left it there); a live
    peer's doorbell is not touched.  Taken once: asked again, None."""
    cdef char out[64]
    cdef int n
    cdef pollfd p
    if SHR_REFUSAL_MAX > 64:
        raise SystemError("refusal buffer too small")
    with nogil:
        n = shr_refusal_take(fd, out)
        if n == 0:
            p.fd = fd
            p.events = POLLIN
            p.revents = 0
            if poll(&p, 1, 0) == 1 and (p.revents & POLLHUP):
                # A peer that closed with our messages unread (the hello,
                # a doorbell byte) leaves ECONNRESET, which the first
                # receive returns before what is queued: drain twice.
                if shr_bell_drain(fd, SHR_BELL_SOCKET) == -2:
                    shr_bell_drain(fd, SHR_BELL_SOCKET)
                n = shr_refusal_take(fd, out)
    if n <= 0:
        return None
    return PyBytes_FromStringAndSize(out, n)


def forget_refusal(int fd):
    """Forget a refusal kept for ``fd`` (its connection closes: the fd
    number will be another's).  No system call."""
    shr_refusal_take(fd, NULL)
