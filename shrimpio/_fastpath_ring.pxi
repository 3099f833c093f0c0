# Included by _fastpath.pyx: the Ring class, one end of a shared-memory
# SPSC byte ring.  Its parts live beside it, as functions on a Ring:
# _fastpath_ring_layout.pxi (header, validation, attaching),
# _fastpath_ring_areas.pxi (the two-area memory), _fastpath_ring_io.pxi
# (indices, copies in and out, the write and read loops) and
# _fastpath_ring_wait.pxi (role gates, spinning, doorbells, sleeping).

# ---------------------------------------------------------------------------
# Ring


@cython.no_gc               # (nothing it holds leads back to it: see _fastpath.pxd)
cdef class Ring:
    """One end of a single-producer/single-consumer byte ring in a Segment.

    Layout at ``offset`` (64-byte aligned): a 256-byte header (magic and
    capacity; producer index and flags on one cache line, consumer index and
    flags on another), then ``capacity`` bytes of data, a power of two.

    ``create=True`` initialises the header; otherwise the header must already
    hold a ring of that capacity.  Doorbells are fds of this process:
    ``data_bell`` is rung by the producer when the consumer sleeps and slept on
    by the consumer; ``space_bell`` the other way round.  With socket bells,
    the two ends of a socketpair (one end per process) are the same doorbell.
    In one process, an fd may be slept on by one role only (say, this ring's
    reader): two waiters sleeping on one doorbell would drain each other's
    wake-ups, and the loser would sleep until its 1 s slice ends.

    The producer methods (``write``, ``writev``, ``write_all``,
    ``shutdown_write``) and the consumer methods (``read_into``, ``read``,
    ``peek``, ``consume``, ``close_read``) may each be called from one thread
    at a time; a per-role lock makes concurrent callers take turns.

    Timeouts: ``0`` never blocks (``BlockingIOError`` if nothing can be done),
    ``None`` waits for ever, a number waits that many seconds
    (``TimeoutError``).  Waiting spins ``busy_poll_us`` then sleeps.

    Two areas (``small=s``, ``big_offset=o``; header version 2): a small
    area of ``s`` bytes right after the header and a large one of
    ``capacity`` bytes at offset ``o`` (in a segment mapped ``hot``, the
    header and the small area must be in the hot part).  The producer
    picks, whenever it finds the ring empty, where the next bytes go: the
    small area if they fit there, the large one if not (mapping it then),
    each from its first byte on (so a request-response exchange keeps
    using the same few bytes); bytes that do not fit the small area's room
    beside unread ones go on in the large one at once.  It says so in the
    header (``area``, ``base``: the stream position of the area's first
    byte, ``sbase``: the small area's) before the bytes; the consumer
    checks that the change came at its own position (an empty ring) or,
    going on from the small area to the large one, within the small area
    ahead of it, before it reads from there (docs/data-plane.md).
    The large area's pages are given back to the system (``MADV_REMOVE``,
    by the producer, which alone writes them) when the producer goes back
    to the small area and has not done so for :data:`TRIM_INTERVAL_NS`.
    ``capacity`` is the large area's.
    """

    def __cinit__(self, Segment segment not None, Py_ssize_t offset=0, capacity=None, *,
                  bint create=False, int data_bell=-1, int space_bell=-1, str bell="socket",
                  busy_poll_us=None, Py_ssize_t small=0, Py_ssize_t big_offset=-1):
        self.attached = False
        _gate_init(&self.rgate)
        _gate_init(&self.wgate)
        self.stat_idx = &self.stat_idx_none
        self.stat_blocked = &self.stat_blocked_none
        self.bell_kind = _bell_kind(bell)
        self.data_bell = data_bell
        self.space_bell = space_bell
        if busy_poll_us is None:
            self.spin_max_ns = _default_spin_ns
        else:
            self.spin_max_ns = _spin_ns_arg(busy_poll_us, "busy_poll_us")
        self.spin_ns = self.spin_max_ns
        _ring_attach(self, segment, offset, capacity, create, small, big_offset)

    def __dealloc__(self):
        if self.attached and self.seg is not None:
            self.seg.exports -= 1
        _gate_free(&self.rgate)
        _gate_free(&self.wgate)

    @staticmethod
    def footprint(capacity):
        """Bytes a ring of this capacity takes in a segment (header included)."""
        return SHR_RING_HEADER + capacity

    # -- checks, trimming, stat mirror, doorbells ---------------------------

    cdef int _check_open(self) except -1:
        if not self.attached or self.closing:
            raise ValueError("ring is closed")
        if self.broken:
            raise RingCorruptedError("ring is broken: the peer wrote impossible values")
        return 0

    cdef int _corrupt(self, str what) except -1:
        self.broken = True
        raise RingCorruptedError("peer corrupted the ring: " + what)

    def trim(self):
        """Producer, idle: if every byte written was consumed, give the
        large area's pages back to the system (and write to the small area
        next).  Nothing when a writer is busy, the ring is not empty or the
        pages were given back already.  True if they were given back now."""
        return _area_trim_idle(self) == 1

    def trim_with(self, Ring ring):
        """Consumer: while a read waits here and sleeps a whole slice (idle),
        call ``ring.trim()`` (the connection's other ring, of which this
        process is the producer).  ``None`` stops it.  ``ring`` may not
        be this ring nor have a sibling of its own: rings are not tracked
        by the garbage collector, so they must never form a cycle."""
        if ring is not None and (ring is self or ring.tx_sibling is not None):
            raise ValueError("a ring's sibling must be another ring without one")
        self.tx_sibling = ring

    def set_stat(self, table, Py_ssize_t idx_at, Py_ssize_t blocked_at, bint writer):
        """Mirror this end's index (bytes written, for the ``writer``; read,
        for the reader) and whether a thread is blocked in its wait into a
        ``shrimpio stat`` table slot: a u64 at ``idx_at`` and a u32 at
        ``blocked_at`` of the writable buffer ``table`` (shrimpio/_stat.py),
        which is kept alive (a memoryview must not be released meanwhile).
        ``table=None`` goes back to mirroring nowhere.  One plain store per
        publish: the stat reader tolerates torn or stale values."""
        cdef Py_buffer buf
        cdef char *p
        if table is None:
            self.stat_idx = &self.stat_idx_none
            self.stat_blocked = &self.stat_blocked_none
            self.stat_owner = None
            return
        # (A memoryview is kept as it is: the stat table's own, shared by
        # every slot, costs a connection no object of its own.)
        view = table if type(table) is memoryview else memoryview(table)
        PyObject_GetBuffer(view, &buf, PyBUF_WRITABLE)
        try:
            if (idx_at < 0 or blocked_at < 0 or idx_at % 8 or blocked_at % 4
                    or idx_at + 8 > buf.len or blocked_at + 4 > buf.len):
                raise ValueError("stat slot fields outside the table")
            p = <char *>buf.buf
        finally:
            PyBuffer_Release(&buf)
        # The memoryview pins the mapping (an mmap with exports cannot be
        # closed or resized), so the pointers stay valid.
        self.stat_owner = view
        self.stat_idx = <uint64_t *>(p + idx_at)
        self.stat_blocked = <uint32_t *>(p + blocked_at)
        self.stat_idx[0] = self.head if writer else self.tail

    def set_bells(self, int data_bell, int space_bell):
        """Ring (and sleep on) other fds from now on (the same doorbells,
        reached through other fd numbers)."""
        self.data_bell = data_bell
        self.space_bell = space_bell

    # For modules that cimport Ring (shrimpio.msg): the module's functions.
    cdef uint64_t _avail(self) except? 0xffffffffffffffff:
        return _ring_avail(self)

    cdef int _release(self, uint64_t new_tail) except -1:
        return _ring_release(self, new_tail)

    cdef Py_ssize_t _write_bufs(self, Py_buffer *bufs, Py_ssize_t nbufs, Py_ssize_t total,
                                double timeout, bint all_) except -1:
        return _ring_write_bufs(self, bufs, nbufs, total, timeout, all_)

    # -- properties --------------------------------------------------------

    @property
    def capacity(self):
        """Bytes the ring holds when full (with two areas: the large one)."""
        return self.big_cap

    @property
    def large(self):
        """Do the bytes go to (or come from) the large area now?  (Always
        for a ring of one area.)"""
        return self.area == 1 or not self.small_cap

    @property
    def small(self):
        """The small area's capacity (0: a ring of one area)."""
        return self.small_cap

    @property
    def closed(self):
        return not self.attached

    @property
    def busy_poll_us(self):
        """Spin budget before sleeping, in microseconds (settable)."""
        return self.spin_max_ns / 1000.0

    @busy_poll_us.setter
    def busy_poll_us(self, value):
        self.spin_max_ns = _spin_ns_arg(value, "busy_poll_us")
        self.spin_ns = self.spin_max_ns

    @property
    def spin_us(self):
        """The spin of the next wait, in microseconds: the budget as it has
        adapted to this ring's traffic (between 1/16 of ``busy_poll_us`` and
        ADAPT_CEILING times it); for tests and diagnostics."""
        return self.spin_ns / 1000.0

    def readable(self):
        """Bytes that can be read now (consumer side)."""
        self._check_open()
        return _ring_avail(self)

    def free(self):
        """Bytes that can be written now (producer side; with two areas,
        counting the large one, which a write goes on in when the small
        one has too little room)."""
        self._check_open()
        cdef uint64_t room = _ring_room(self)
        if self.small_cap and not self.area:
            return self.big_cap - (self.head - self.seen_tail)
        return room

    def at_eof(self):
        """True once the producer shut its side and every byte was consumed."""
        self._check_open()
        if self.eof:
            return True
        if shr_load_wshut(self.h) and _ring_avail(self) == 0:
            self.eof = True
        return self.eof

    @property
    def write_shut(self):
        """True once this end shut the writing side (``shutdown_write``)."""
        return self.wshut

    @property
    def read_shut(self):
        """True once the consumer announced it reads no more (``close_read``)."""
        self._check_open()
        return shr_load_rshut(self.h) != 0

    # -- producer ----------------------------------------------------------

    def write(self, data, timeout=0.0):
        """Write as much of ``data`` as fits, waiting until something fits.

        Returns the number of bytes written (like ``socket.send``)."""
        cdef Py_buffer buf
        cdef double t = _timeout_arg(timeout)
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if buf.len == 0:
                _ring_writable_check(self)
                return 0
            return _ring_write_bufs(self, &buf, 1, buf.len, t, False)
        finally:
            PyBuffer_Release(&buf)

    def write_all(self, data, timeout=None):
        """Write all of ``data``, waiting for space as needed (like ``sendall``).

        With ``timeout=0``, ``BlockingIOError`` if it does not all fit: its
        ``characters_written`` says how many bytes went in."""
        cdef Py_buffer buf
        cdef double t = _timeout_arg(timeout)
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if buf.len == 0:
                _ring_writable_check(self)
                return None
            _ring_write_bufs(self, &buf, 1, buf.len, t, True)
        finally:
            PyBuffer_Release(&buf)

    def writev(self, buffers, timeout=0.0, bint all=False):
        """Gather-write a sequence of buffers as one stream of bytes.

        Returns bytes written; with ``all=True`` writes everything."""
        cdef double t = _timeout_arg(timeout)
        cdef list items = list(buffers)
        cdef Py_ssize_t n = len(items), k, got = 0, total = 0
        cdef Py_buffer *bufs
        cdef bytes holder = PyBytes_FromStringAndSize(NULL, max(1, n) * sizeof(Py_buffer))
        bufs = <Py_buffer *>PyBytes_AS_STRING(holder)
        try:
            for k in range(n):
                PyObject_GetBuffer(items[k], &bufs[k], PyBUF_SIMPLE)
                got += 1
                total += bufs[k].len
            if total == 0:
                _ring_writable_check(self)
                return 0
            return _ring_write_bufs(self, bufs, n, total, t, all)
        finally:
            for k in range(got):
                PyBuffer_Release(&bufs[k])

    def shutdown_write(self):
        """Announce that no more bytes follow; the reader sees EOF after the last."""
        self._check_open()
        _gate_enter(&self.wgate, -1)
        try:
            if not self.wshut:
                self.wshut = True
                shr_set_wshut(self.h)
                shr_wake_reader(self.h, self.data_bell, self.bell_kind)
        finally:
            _gate_leave(&self.wgate)

    # -- consumer ----------------------------------------------------------

    def read_into(self, buffer, Py_ssize_t nbytes=-1, timeout=0.0):
        """Read up to ``nbytes`` (default: len(buffer)) into a writable buffer.

        Returns the count; 0 means end of stream.  Empty ring: ``timeout``
        decides (``BlockingIOError`` for 0).  The writer vanishing without
        shutting down gives ``ConnectionResetError``."""
        cdef Py_buffer buf
        cdef double t = _timeout_arg(timeout)
        PyObject_GetBuffer(buffer, &buf, PyBUF_WRITABLE)
        try:
            if nbytes < 0 or nbytes > buf.len:
                nbytes = buf.len
            return _ring_read(self, <char *>buf.buf, nbytes, t)
        finally:
            PyBuffer_Release(&buf)

    def read(self, Py_ssize_t nbytes, timeout=0.0):
        """Read up to ``nbytes`` and return them as bytes (b'' at end of stream)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        cdef double t = _timeout_arg(timeout)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, nbytes)
        cdef Py_ssize_t n = _ring_read(self, PyBytes_AS_STRING(out), nbytes, t)
        if n == nbytes:
            return out
        return out[:n]

    def peek(self, Py_ssize_t nbytes=-1):
        """Zero-copy view of readable bytes, up to ``nbytes``, without consuming.

        The view stops at the wrap-around point, so it may be shorter than
        what is readable: ``consume()`` it, then peek again.  It is valid until
        ``consume()``: after that the producer may overwrite those bytes."""
        self._check_open()
        cdef uint64_t avail = _ring_avail(self)
        cdef uint64_t pos = (self.tail - self.base) & (self.cap - 1)
        cdef uint64_t n = min(avail, self.cap - pos)
        if 0 <= nbytes < <Py_ssize_t>n:
            n = nbytes
        cdef Py_ssize_t start = (self.big_off if self.area or not self.small_cap else self.small_off) + pos
        return memoryview(self.seg)[start:start + <Py_ssize_t>n].toreadonly()

    def consume(self, Py_ssize_t nbytes):
        """Drop ``nbytes`` readable bytes (after ``peek``)."""
        self._check_open()
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        _gate_enter(&self.rgate, -1)
        try:
            if <uint64_t>nbytes > _ring_avail(self):
                raise ValueError("cannot consume %d bytes, only %d readable" % (nbytes, _ring_avail(self)))
            if nbytes:
                _ring_release(self, self.tail + nbytes)
        finally:
            _gate_leave(&self.rgate)

    def close_read(self):
        """Announce that this consumer reads no more; the writer gets EPIPE."""
        self._check_open()
        shr_set_rshut(self.h)
        shr_wake_writer(self.h, self.space_bell, self.bell_kind)

    # -- waiting -----------------------------------------------------------

    def wait_readable(self, timeout=None):
        """Wait until data, end of stream or a dead writer; False on timeout."""
        cdef double t = _timeout_arg(timeout)
        cdef int rc
        _gate_enter(&self.rgate, t)
        try:
            self._check_open()
            if _ring_avail(self) or shr_load_wshut(self.h) or t == 0:
                return bool(_ring_avail(self) or shr_load_wshut(self.h))
            rc = _ring_wait(self, 0, 1, t)
            return rc != 0
        finally:
            _gate_leave(&self.rgate)

    def wait_writable(self, Py_ssize_t nbytes=1, timeout=None):
        """Wait until ``nbytes`` of room (or a closed reader); False on timeout."""
        cdef double t = _timeout_arg(timeout)
        cdef int rc
        if nbytes < 1 or <uint64_t>nbytes > self.big_cap:
            raise ValueError("nbytes must be in [1, capacity]")
        _gate_enter(&self.wgate, t)
        try:
            self._check_open()
            if _area_room_for(self, nbytes) or shr_load_rshut(self.h) or t == 0:
                return bool(_area_room_for(self, nbytes) or shr_load_rshut(self.h))
            while True:
                # Beyond the small area: wait until it is empty (then the
                # large one takes the bytes).
                rc = _ring_wait(self, 1, min(<uint64_t>nbytes, self.cap), t)
                if rc != 1 or _area_room_for(self, nbytes) or shr_load_rshut(self.h):
                    return rc != 0
        finally:
            _gate_leave(&self.wgate)

    def close(self):
        """Detach from the segment.  Threads blocked in this ring must have been
        woken first (shut the doorbell); close waits for them to leave."""
        if not self.attached:
            return
        self.closing = True
        _gate_enter(&self.rgate, -1)
        _gate_enter(&self.wgate, -1)
        if self.attached:
            self.attached = False
            self.h = NULL
            self.data = NULL
            self.seg.exports -= 1
        _gate_leave(&self.wgate)
        _gate_leave(&self.rgate)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if not self.attached:
            return "<Ring closed>"
        return "<Ring capacity=%d%s head=%d tail=%d%s>" % (
            self.big_cap, (" small=%d %s" % (self.small_cap, "large" if self.area else "small"))
            if self.small_cap else "", self.head, self.tail, " broken" if self.broken else "")
