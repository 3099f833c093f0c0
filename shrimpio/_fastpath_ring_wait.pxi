# Included by _fastpath.pyx: waiting on a Ring: the per-role gates that
# make concurrent callers take turns, the adaptive spin budget, arming the
# reader for an outside poller, and the spin-then-sleep on a doorbell.

# ---------------------------------------------------------------------------
# locks held per role (reader / writer) of a ring end


cdef int _gate_init(gate_t *g) except -1:
    # The lock is made when first needed (a thread about to release the GIL
    # inside, or one queueing behind it): most ring ends never need one,
    # and a connection has four.
    g.lock = NULL
    g.busy = 0
    g.held = 0
    return 0


cdef int _gate_lock(gate_t *g) except -1:
    """Make the gate's lock (GIL held)."""
    if g.lock == NULL:
        g.lock = PyThread_allocate_lock()
        if g.lock == NULL:
            raise MemoryError()
    return 0


cdef void _gate_free(gate_t *g) noexcept:
    if g.lock != NULL:
        PyThread_free_lock(g.lock)
        g.lock = NULL


cdef int _gate_enter(gate_t *g, double timeout) except -1:
    """Enter (GIL held).  If another thread is inside, it has released the
    GIL and holds the lock: queue on the lock.  timeout < 0 waits for ever."""
    cdef int r
    cdef long long us
    while g.busy:
        if timeout == 0:
            raise BlockingIOError(_errno.EAGAIN, "another thread is using this ring")
        us = -1 if timeout < 0 else <long long>(timeout * 1e6)
        _gate_lock(g)
        with nogil:
            r = PyThread_acquire_lock_timed(g.lock, us, 0)
        if r != PY_LOCK_ACQUIRED:
            raise TimeoutError(_errno.ETIMEDOUT, "timed out")
        PyThread_release_lock(g.lock)
    g.busy = 1
    return 0


cdef inline int _gate_hold(gate_t *g) except -1:
    """Called inside, before releasing the GIL: make later arrivals queue."""
    if not g.held:
        _gate_lock(g)
        with nogil:
            PyThread_acquire_lock(g.lock, 1)
        g.held = 1
    return 0


cdef inline void _gate_leave(gate_t *g) noexcept:
    g.busy = 0
    if g.held:
        g.held = 0
        PyThread_release_lock(g.lock)


cdef inline int64_t _adapt_spin_to(int64_t cur, int64_t top, int64_t ceiling, int spun,
                                   int64_t waited) noexcept:
    """The next spin budget, after a wait that took ``waited`` ns.

    Spinning paid off: keep (or grow back to ``top``) it.  We slept, but the
    event came within ``ceiling``: a longer spin would have caught it, so
    grow to cover it (without this, a budget once shrunk never
    recovers: short spins always fail; and a peer that needs a little longer
    than the budget every time, as one copying a 1 MiB message on a loaded
    host, would cost a sleep and a wake-up every time).  We slept long:
    halve, down to 1/16, so that a peer that is not running (same core, or
    idle) does not cost us a core."""
    if spun:
        return max(cur, min(top, cur * 2 + 1000))
    if waited <= ceiling:
        return min(ceiling, max(cur * 2, waited + waited // 4))
    return max(top // 16, cur // 2)


cdef inline int64_t _adapt_spin(int64_t cur, int64_t top, int spun, int64_t waited) noexcept:
    """``_adapt_spin_to`` for the rings' waits: grows up to ADAPT_CEILING budgets."""
    return _adapt_spin_to(cur, top, top * ADAPT_CEILING, spun, waited)


cdef inline bint _contended(int64_t now) noexcept:
    """Did a waiter of this process see itself preempted within
    CONTENDED_NS of ``now`` (its CPU is shared with busy tasks)?"""
    return now - shr_preempted_at() < CONTENDED_NS


cdef inline int64_t _adapt_wait_spin(int64_t cur, int64_t top, int spun, int64_t waited) noexcept:
    """``_adapt_spin`` for a thread's blocking waits on a ring, with the
    rule of a contended CPU (``_contended``): there a spin never grows past
    ``top`` to cover a wait, and a wait longer than ``top`` halves it.  A
    spin is paid from our share of a CPU shared with busy tasks, and the
    scheduler makes us wait for that share after, while a task that
    sleeps is woken ahead of the busy ones: a blocking http.client spinning
    through a web server's 150-250 us answers (uvicorn, tornado) with both
    cores loaded ran at 0.3-0.6x TCP's requests/s, and 0.7-1.3x without
    the spin.  A peer that answers within the budget is still caught
    spinning (each catch grows the budget back to ``top``)."""
    if spun:        # caught: the ceiling plays no part (and the clock is not read)
        return _adapt_spin_to(cur, top, top, 1, waited)
    return _adapt_spin_to(cur, top, top if _contended(shr_now_ns()) else top * ADAPT_CEILING,
                          0, waited)


def adapt_wait_spin(double cur, double top, bint spun, double waited):
    """The rule of ``_adapt_wait_spin`` in seconds (for tests)."""
    return _adapt_wait_spin(<int64_t>(cur * 1e9), <int64_t>(top * 1e9), spun,
                            <int64_t>(waited * 1e9)) / 1e9


def preempts():
    """How many times so far a waiter of this process saw itself
    preempted since its previous long wait (see _ring_wait), and whether
    the last was within CONTENDED_NS (the rings' waits then keep their
    spins within their budgets)."""
    return shr_preempt_count(), bool(_contended(shr_now_ns()))


def _set_contended(bint contended):
    """Tests: say that a waiter of this process was preempted just now
    (True), or forget the last time (False)."""
    if contended:
        shr_note_preempted(shr_now_ns())
    else:
        shr_forget_preempted()


def adapt_spin(double cur, double top, double ceiling, bint spun, double waited):
    """The rule of :func:`_adapt_spin_to` in seconds, for waits made in
    Python (a listener's accept): the next spin after one of ``cur``
    seconds that caught the event (``spun``) or slept ``waited`` seconds."""
    return _adapt_spin_to(<int64_t>(cur * 1e9), <int64_t>(top * 1e9), <int64_t>(ceiling * 1e9),
                          spun, <int64_t>(waited * 1e9)) / 1e9


# ---------------------------------------------------------------------------
# a ring end's waits


cdef int _ring_arm_reader(Ring r) except -1:
    """An empty ring, and the caller will not wait (timeout 0): leave
    the doorbell as a poller of the program's own (one that is not
    shrimpio's, watching the fd) must find it.  Doorbell bytes of data
    already read are taken; the reader-sleeping flag is set (a full
    fence, then a look again), so the peer's next byte rings the
    doorbell and makes the fd readable.  1: data or end of stream came
    meanwhile; 0: armed (say EAGAIN); 2: the peer is gone (its end of
    the doorbell read end of file).  Costs what the look for a dead
    peer cost before (one system call), on this path only."""
    cdef shr_cond c
    cdef int drained = 0
    if r.data_bell >= 0 and r.bell_kind == SHR_BELL_SOCKET:
        drained = shr_bell_drain(r.data_bell, SHR_BELL_SOCKET)
    c.h = r.h
    c.pos = r.tail
    c.need = 1
    c.cap = r.cap
    c.writable = 0
    shr_cond_arm(&c, 1)
    if shr_cond_ready(&c):
        return 1
    if drained == -2 or drained == -1:
        return 2
    return 0


cdef bint _ring_peer_gone(Ring r, int bell) noexcept:
    """Is the peer behind socket doorbell ``bell`` gone?  One poll(0):
    only for the paths that would otherwise say "try again" (the data
    path never pays it)."""
    return bell >= 0 and r.bell_kind == SHR_BELL_SOCKET and shr_bell_peer_gone(bell) != 0


cdef int _ring_wait(Ring r, int writable, uint64_t need, double timeout) except -2:
    """Spin, then sleep on the doorbell.  1 ready, 0 timed out, 2 peer gone.

    The caller holds the role lock and re-validates after a return of 1.
    """
    cdef shr_cond c
    cdef int bell = r.space_bell if writable else r.data_bell
    cdef int rc
    cdef int64_t spin = r.spin_ns, t0, limit, now
    cdef long nivcsw
    if bell < 0:
        raise ValueError("this ring has no doorbell for blocking waits; use timeout=0")
    _gate_hold(&r.wgate if writable else &r.rgate)
    c.h = r.h
    c.pos = r.head if writable else r.tail
    c.need = need
    c.cap = r.cap
    c.writable = writable
    t0 = shr_now_ns()
    limit = -1 if timeout < 0 else t0 + <int64_t>(timeout * 1e9)
    r.stat_blocked[0] = 1
    try:
        rc = _ring_wait_until(r, &c, writable, spin, limit)
    finally:
        r.stat_blocked[0] = 0
    if rc == 1:
        now = shr_now_ns()
        if now - t0 > r.spin_max_ns:
            # A wait longer than the budget (it cost a sleep or a long spin
            # already: one system call more is little): was our CPU given
            # to another task since this ring's previous such wait?
            nivcsw = shr_thread_nivcsw()
            if r._nivcsw_known and nivcsw != r._nivcsw:
                shr_note_preempted(now)
            r._nivcsw = nivcsw
            r._nivcsw_known = True
        r.spin_ns = _adapt_wait_spin(r.spin_ns, r.spin_max_ns, r._wait_spun, now - t0)
    return rc


cdef int _ring_wait_until(Ring r, void *cond, int writable, int64_t spin, int64_t limit) except -2:
    """_ring_wait's spin and sleeps (``cond``: its shr_cond): 1 ready
    (``_wait_spun``: caught spinning), 0 timed out, 2 peer gone."""
    cdef shr_cond *c = <shr_cond *>cond
    cdef int bell
    cdef int kind = r.bell_kind
    cdef int which = 0, spun = 0, rc
    cdef int64_t slice_ns
    while True:
        if limit < 0:
            slice_ns = <int64_t>(SLEEP_SLICE * 1e9)
        else:
            slice_ns = limit - shr_now_ns()
            if slice_ns < 0:
                slice_ns = 0
            if slice_ns > <int64_t>(SLEEP_SLICE * 1e9):
                slice_ns = <int64_t>(SLEEP_SLICE * 1e9)
        # The doorbell fd may move between slices (Connection.set_bell):
        # a thread asleep on the old fd keeps its file, and looks again.
        bell = r.space_bell if writable else r.data_bell
        with nogil:
            rc = shr_wait_any(c, 1, &bell, &kind, -1, spin, slice_ns, &which, &spun)
        spin = 0
        if rc == SHR_READY:
            r._wait_spun = spun
            return 1
        if rc == SHR_GONE:
            return 2
        if rc == SHR_ERROR:
            PyErr_SetFromErrno(OSError)
        PyErr_CheckSignals()
        if r.closing:
            raise ValueError("ring was closed while waiting")
        if rc == SHR_TIMEOUT and not writable and r.tx_sibling is not None:
            # Idle for a slice: what we sent may have been read by now.
            _area_trim_idle(r.tx_sibling)
        if rc == SHR_TIMEOUT and limit >= 0 and shr_now_ns() >= limit:
            return 0
