# Included at the end of _fastpath.pyx: what select/poll/epoll need from a
# ring.  Kept apart because it is the pollers' interface, not the ring's own.

cdef extern from "_fastpath_core.h" nogil:
    int shr_cond_ready(const shr_cond *c)
    void shr_cond_arm(const shr_cond *c, uint32_t v)
    uint32_t shr_cpu_tag()
    int shr_peer_here(shr_ring_hdr *h, int writable, uint32_t me)
    uint32_t shr_peer_cpu(shr_ring_hdr *h, int writable)
    void shr_note_unarmed()
    uint64_t shr_unarmed_count()


cdef inline void _ring_cond(Ring ring, bint writable, shr_cond *c) noexcept:
    """The condition a poller waits on for one ring end: one byte to read,
    or room for one byte (in the area the producer may write now)."""
    c.h = ring.h
    c.writable = 1 if writable else 0
    c.pos = ring.head if writable else ring.tail
    c.need = 1
    c.cap = _area_wcap(ring) if writable else ring.cap


def ring_arm(Ring ring not None, bint writable, bint always=False):
    """Is the ring ready now (data or end of stream; or room, or a closed
    reader)?  If not (or ``always``: an edge-triggered waiter, which wants
    the peer's *next* change even while ready), set its sleeping flag (a
    full fence, then a re-check) so that the peer rings the doorbell at its
    next change; return whether it is ready.

    A flag left set after the poller moves on costs the peer one spare ring
    and us one spare wake-up; clearing it could steal the wake-up of a thread
    blocked in a read on the same ring, so it is never cleared here."""
    return bool(_ring_arm(ring, writable, always))


cdef int _ring_arm(Ring ring, bint writable, bint always=False) except -1:
    """ring_arm for C callers: 1 ready, 0 armed."""
    cdef shr_cond c
    ring._check_open()
    _ring_cond(ring, writable, &c)
    if not always and shr_cond_ready(&c):
        return 1
    shr_cond_arm(&c, 1)
    return shr_cond_ready(&c) != 0


def ring_progress(Ring ring not None, bint writable):
    """The peer's index as it stands (its producer index for a reader, its
    consumer index for a writer) with its shut flag in the top bit: a value
    that changes whenever the peer made the ring readable or writable
    anew.  Not validated: only compared, by edge-triggered pollers."""
    ring._check_open()
    if writable:
        return (shr_load_tail(ring.h) << 1) | (shr_load_rshut(ring.h) != 0)
    return (shr_load_head(ring.h) << 1) | (shr_load_wshut(ring.h) != 0)


def drain_bell(int fd, bint note=True):
    """Swallow the pending rings of a socket doorbell without blocking.
    True if the peer is gone (end of file, reset, or any other error: a
    doorbell that fails can never ring again).  ``note``: count it as a
    wake-up taken (see :func:`unarmed_count`); a patched epoll draining
    the doorbells it watches itself passes False."""
    if note:
        shr_note_unarmed()
    return shr_bell_drain(fd, SHR_BELL_SOCKET) != 0


def unarmed_count():
    """How many times, so far, a waiter of this process cleared a ring's
    sleeping flag or drained a doorbell (a blocking wait ending, a
    poller's drain): when it moves, a ring armed earlier may no longer
    be, and whoever keeps rings armed across calls arms them again."""
    return shr_unarmed_count()


def ring_peek_into(Ring ring not None, buffer, Py_ssize_t nbytes=-1):
    """Copy up to ``nbytes`` readable bytes into ``buffer`` without consuming
    them, across the wrap-around point (``recv(n, MSG_PEEK)`` needs all of
    them, where ``Ring.peek`` gives a zero-copy view up to the wrap only).
    Returns the count, 0 when nothing is readable."""
    cdef Py_buffer buf
    cdef uint64_t avail
    ring._check_open()
    PyObject_GetBuffer(buffer, &buf, PyBUF_WRITABLE)
    try:
        if nbytes < 0 or nbytes > buf.len:
            nbytes = buf.len
        avail = _ring_avail(ring)
        if avail > <uint64_t>nbytes:
            avail = nbytes
        return _ring_copy_out(ring, <char *>buf.buf, avail)
    finally:
        PyBuffer_Release(&buf)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN


def spin_readable(fds, double seconds):
    """Poll the kernel fds ``fds`` (at most 8) without sleeping, for up to
    ``seconds``: True as soon as one is readable (or hung up, or in error),
    False when the time is up.  The busy-poll phase of waits on kernel
    objects that are about to become ready (a listener's next connection,
    a connection's hello), so that the waiter is not put to sleep and woken
    again, which costs both processes tens of microseconds.  The GIL is
    released for a spin (``seconds > 0``); a single look keeps it (handing
    it to another thread for one system call that cannot wait would cost
    more than the call, and the thread could keep it for a while)."""
    cdef pollfd p[8]
    cdef unsigned long n = 0
    cdef int r = 0
    cdef int64_t limit
    for fd in fds:
        if n == 8:
            raise ValueError("spin_readable takes at most 8 fds")
        p[n].fd = fd
        p[n].events = POLLIN
        p[n].revents = 0
        n += 1
    if seconds != seconds or seconds < 0:
        raise ValueError("seconds must be >= 0")
    if seconds == 0:
        return poll(p, n, 0) != 0
    limit = shr_now_ns() + <int64_t>(min(seconds, 1.0) * 1e9)
    with nogil:
        r = _spin_poll(p, n, limit)
    return r != 0


cdef int _spin_poll(pollfd *p, unsigned long n, int64_t limit) noexcept nogil:
    """poll() the ``n`` fds at ``p`` without sleeping until one is ready or
    the clock (shr_now_ns) passes ``limit``: poll()'s result (0: none)."""
    cdef int r, i
    while True:
        r = poll(p, n, 0)
        if r != 0 or shr_now_ns() >= limit:
            return r
        # About a microsecond between polls: a system call per iteration
        # would only heat the kernel's paths at the cost of the caches the
        # waiter needs next.
        for i in range(16):
            shr_cpu_relax()


# -- the pollers' spin ------------------------------------------------------
#
# A program that waits in select/poll/epoll before each recv would otherwise
# sleep in the kernel at once: every message then costs the peer a doorbell
# write and us a wake-up, which is what loopback TCP costs.  So the patched
# pollers spin on the rings first, as a blocking recv does, under the same
# rules: each ring's adaptive budget (Ring.spin_ns, shared with its blocking
# waits), no spin when every peer was last seen on our own CPU, and the
# adaptation of _adapt_spin after the wait.  The GIL is released for the
# spin; the rings' gates keep them mapped meanwhile.

cdef enum:
    _SPIN_MAX_RINGS = 64
    _SPIN_MAX_KFDS = 8


def spin_rings(list rings not None, list writables not None, list kfds not None,
               double limit_s=-1.0):
    """Spin until one of ``rings`` is ready (data or end of stream when its
    ``writables`` entry is false; room or a closed reader when true), or one
    of the kernel fds ``kfds`` is readable, for up to the largest of the
    rings' adaptive budgets (at most ``limit_s`` seconds when >= 0).

    Returns the index of a ready ring, -2 if a kernel fd is readable, -1 if
    the budget ran out or spinning cannot pay (every peer last seen on our
    CPU, a closed ring, more than 64 rings or 8 kernel fds).  A ring found
    ready while spinning keeps (or grows back) its budget."""
    cdef Py_ssize_t n = len(rings), nk = len(kfds), i, k, entered = 0
    cdef Ring ring
    cdef shr_cond c[_SPIN_MAX_RINGS]
    cdef gate_t *gates[_SPIN_MAX_RINGS]
    cdef pollfd p[_SPIN_MAX_KFDS]
    cdef int64_t budget = 0, end
    cdef uint32_t me = shr_cpu_tag()
    cdef bint away = False
    cdef int r = -1
    if n == 0 or n > _SPIN_MAX_RINGS or nk > _SPIN_MAX_KFDS or len(writables) != n:
        return -1
    for i in range(n):
        ring = <Ring?>rings[i]
        if ring.h == NULL or ring.closing:
            return -1
        _ring_cond(ring, writables[i], &c[i])
        if shr_cond_ready(&c[i]):
            return i
        if ring.spin_ns > budget:
            budget = ring.spin_ns
        if not shr_peer_here(ring.h, c[i].writable, me):
            away = True
    if not away or budget <= 0:
        return -1
    if limit_s >= 0 and budget > <int64_t>(limit_s * 1e9):
        budget = <int64_t>(limit_s * 1e9)
    for k in range(nk):
        p[k].fd = kfds[k]
        p[k].events = POLLIN
        p[k].revents = 0
    # The spin releases the GIL (other threads run, as during a blocking
    # recv's spin).  Each ring's gate for the role we watch is entered and
    # held, so that no thread can close (unmap) it meanwhile; a ring in use
    # by another thread (a recv or send in progress) is not spun for.
    try:
        for i in range(n):
            ring = <Ring>rings[i]
            gates[i] = &ring.wgate if c[i].writable else &ring.rgate
            if gates[i].busy:
                return -1
            gates[i].busy = 1
            entered += 1
        for i in range(n):
            _gate_hold(gates[i])
        end = shr_now_ns() + budget
        with nogil:
            r = _spin_conds(c, n, p, nk, end)
    finally:
        for i in range(entered):
            _gate_leave(gates[i])
    if r >= 0:
        ring = <Ring>rings[r]
        ring.spin_ns = _adapt_spin(ring.spin_ns, ring.spin_max_ns, 1, 0)
    return r


cdef int _spin_conds(shr_cond *c, Py_ssize_t n, pollfd *p, Py_ssize_t nk,
                     int64_t end) noexcept nogil:
    """spin_rings' loop: the index of a ready cond, -2 if a kernel fd is
    readable, -1 when the clock passes ``end``."""
    cdef Py_ssize_t i, k
    while shr_now_ns() < end:
        for k in range(32):
            for i in range(n):
                if shr_cond_ready(&c[i]):
                    return i
            shr_cpu_relax()
        if nk and poll(p, nk, 0) != 0:
            return -2
    return -1


def rings_slept(list rings not None, list writables not None, double waited):
    """After a spin by :func:`spin_rings` found nothing and the poller slept
    ``waited`` seconds: the rings that are ready now adapt their budgets as
    a blocking wait's would (grown if the event came soon enough for a
    longer spin to have caught it, halved if it came late); if none is
    ready (a kernel fd or the timeout ended the wait), a long wait halves
    them all, so that idle connections do not keep the poller spinning."""
    cdef Py_ssize_t n = len(rings), i
    cdef Ring ring
    cdef shr_cond c
    cdef int64_t w = <int64_t>(waited * 1e9)
    cdef bint any_ready = False
    cdef list ready = []
    if len(writables) != n:
        raise ValueError("rings and writables differ in length")
    for i in range(n):
        ring = <Ring?>rings[i]
        if ring.h == NULL:
            ready.append(False)
            continue
        _ring_cond(ring, writables[i], &c)
        ready.append(shr_cond_ready(&c) != 0)
        any_ready = any_ready or ready[i]
    for i in range(n):
        ring = <Ring>rings[i]
        if ready[i]:
            ring.spin_ns = _adapt_spin(ring.spin_ns, ring.spin_max_ns, 0, w)
        elif not any_ready and w > ring.spin_max_ns * ADAPT_CEILING:
            ring.spin_ns = _adapt_spin(ring.spin_ns, ring.spin_max_ns, 0, w)
