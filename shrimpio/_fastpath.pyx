# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""shrimpio data plane: shared segments, SPSC byte rings, doorbells, waits.

Nothing here knows about sockets, asyncio or the registry.  The C core (ring
header, atomics, the spin-then-sleep wait) is in ``_fastpath_core.h``; this
module wraps it in three kinds of object:

* ``Segment`` - anonymous shared memory (memfd, or ``shm_open`` + immediate
  unlink), mapped, with the buffer protocol, passable as an fd.
* ``Ring`` - one single-producer/single-consumer byte ring inside a segment.
* ``Proxy`` / ``Export`` - the two ends of a VMMC buffer: bounds-checked
  deliberate update and fetch on the importing side, notification delivery
  on the exporting side.  ``shrimpio.vmmc`` builds the public API on them.

Everything read from shared memory is validated before use: the peer is not
trusted.  A bad value raises ``RingCorruptedError`` and marks the ring broken.
"""

import errno as _errno
import os as _os
import secrets as _secrets

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.pythread cimport (PyThread_acquire_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef extern from "_fastpath_core.h" nogil:
    int SHR_RING_HEADER
    int SHR_BELL_SOCKET
    int SHR_BELL_EVENTFD
    int SHR_READY, SHR_TIMEOUT, SHR_ERROR, SHR_GONE, SHR_EINTR, SHR_LOCAL
    int SHR_MAX_WAIT
    ctypedef struct shr_cond:
        shr_ring_hdr *h
        uint64_t pos
        uint64_t need
        uint64_t cap
        int writable
    uint64_t shr_load_head(shr_ring_hdr *h)
    uint64_t shr_load_tail(shr_ring_hdr *h)
    uint32_t shr_load_wshut(shr_ring_hdr *h)
    uint32_t shr_load_rshut(shr_ring_hdr *h)
    void shr_init(shr_ring_hdr *h, uint64_t cap)
    void shr_reader_asleep(shr_ring_hdr *h)
    int shr_header_ok(shr_ring_hdr *h)
    uint64_t shr_header_cap(shr_ring_hdr *h)
    void shr_set_wshut(shr_ring_hdr *h)
    void shr_set_rshut(shr_ring_hdr *h)
    void shr_release_fence()
    int64_t shr_now_ns()
    void shr_cpu_relax()
    int64_t shr_coarse_ns()
    int shr_bell_ring(int fd, int kind)
    int shr_bell_drain(int fd, int kind)
    int shr_bell_peer_gone(int fd)
    int shr_wake_reader(shr_ring_hdr *h, int fd, int kind)
    int shr_wake_writer(shr_ring_hdr *h, int fd, int kind)
    void shr_publish_head(shr_ring_hdr *h, uint64_t v)
    void shr_publish_tail(shr_ring_hdr *h, uint64_t v)
    int shr_wait_any(const shr_cond *conds, int n, const int *bells, const int *kinds, int local_fd,
                     int64_t spin_ns, int64_t timeout_ns, int *which, int *spun)

cdef extern from "Python.h" nogil:
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE, PY_LOCK_ACQUIRED, PY_LOCK_INTR
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FIXED
    void *MAP_FAILED
    int shm_open(const char *name, int oflag, int mode)
    int shm_unlink(const char *name)
    int memfd_create(const char *name, unsigned int flags)
    unsigned int MFD_CLOEXEC, MFD_ALLOW_SEALING

cdef extern from "<fcntl.h>" nogil:
    int O_RDWR, O_CREAT, O_EXCL
    int fcntl(int fd, int cmd, ...)
    int F_GET_SEALS, F_ADD_SEALS, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL

cdef extern from "<sys/stat.h>" nogil:
    ctypedef struct struct_stat "struct stat":
        unsigned int st_mode
        long st_size
        long st_blksize
    int fstat(int fd, struct_stat *st)
    bint S_ISREG(unsigned int mode)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINVAL
    int EINTR

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int ftruncate(int fd, long length)


# ---------------------------------------------------------------------------
# configuration

#: Largest busy-poll budget (microseconds): spinning longer than a sleep slice
#: is never useful, and the bound keeps the nanosecond arithmetic in range.
MAX_BUSY_POLL_US = 1000000


cdef int64_t _spin_ns_arg(object us, str what) except -1:
    """Validate a busy-poll budget in microseconds; return it in nanoseconds."""
    cdef double v
    if isinstance(us, (str, bytes)) or us is None:
        raise TypeError("%s must be a number of microseconds, not %s" % (what, type(us).__name__))
    v = us
    if not (0 <= v <= MAX_BUSY_POLL_US):     # also rejects NaN
        raise ValueError("%s must be a number of microseconds in [0, %d], got %r"
                         % (what, MAX_BUSY_POLL_US, us))
    return <int64_t>(v * 1000)


cdef int64_t _default_spin_ns = 50000
_env_busy_poll = _os.environ.get("SHRIMPIO_BUSY_POLL_US")
if _env_busy_poll is not None:
    try:
        _env_busy_poll_value = float(_env_busy_poll)
    except ValueError:
        raise ValueError("SHRIMPIO_BUSY_POLL_US must be a number of microseconds, got %r"
                         % _env_busy_poll) from None
    _default_spin_ns = _spin_ns_arg(_env_busy_poll_value, "SHRIMPIO_BUSY_POLL_US")

#: Large copies are published (writer) and released (reader) in pieces of
#: this size, so that the peer copies one piece while we copy the next: a
#: transfer larger than this costs about one copy's time, not two (1 MiB
#: socket transfers: 4.7 -> 8.2 GB/s; 16-64 KiB measured alike, 128 KiB and
#: up as the whole ring).
cdef Py_ssize_t PIPE_CHUNK = 32 * 1024
#: Copies at least this large run with the GIL released.
cdef Py_ssize_t NOGIL_COPY = PIPE_CHUNK
#: Longest uninterrupted sleep, so that signals get a look-in (seconds).
cdef double SLEEP_SLICE = 1.0
cdef int64_t ADAPT_CEILING = 8    # most an adapted spin grows to, in budgets
cdef uint64_t MIN_CAPACITY = 64
cdef uint64_t MAX_CAPACITY = (<uint64_t>1) << 40
cdef Py_ssize_t PAGE = _os.sysconf("SC_PAGE_SIZE")

RING_HEADER = SHR_RING_HEADER
NOTIFY_RECORD = 16


def get_busy_poll_us():
    """The default spin budget of new rings, in microseconds."""
    return _default_spin_ns / 1000.0


def set_busy_poll_us(us):
    """Set the default spin budget of rings created from now on (microseconds, >= 0)."""
    global _default_spin_ns
    _default_spin_ns = _spin_ns_arg(us, "busy-poll budget")


class RingCorruptedError(ConnectionResetError):
    """The peer wrote an impossible value into shared memory; the ring is broken.

    A ``ConnectionResetError`` (errno ``ECONNRESET``): to code written for
    sockets, a peer that broke the connection is one that reset it, and
    that is how such code already handles it."""

    def __init__(self, *args):
        if len(args) == 1:
            args = (_errno.ECONNRESET, args[0])
        super().__init__(*args)


# ---------------------------------------------------------------------------
# Segment


cdef inline Py_ssize_t _page_round(Py_ssize_t n):
    return (n + PAGE - 1) // PAGE * PAGE


cdef int _default_kind_is_shm() except -1:
    kind = _os.environ.get("SHRIMPIO_SEGMENT", "memfd")
    if kind not in ("memfd", "shm"):
        raise ValueError("SHRIMPIO_SEGMENT must be 'memfd' or 'shm', got %r" % (kind,))
    return kind == "shm" or not hasattr(_os, "memfd_create")


cdef class Segment:
    """Anonymous shared memory, mapped read-write into this process.

    ``Segment(size)`` creates one: a sealed memfd (it cannot shrink, so a peer
    can never make our accesses fault), or, with ``SHRIMPIO_SEGMENT=shm`` or
    where memfd is missing, a POSIX shared memory object that is unlinked at
    once.  Either way nothing is left named anywhere: the memory lives as long
    as an fd or a mapping of it does.

    ``Segment.from_fd(fd)`` maps one received from another process.
    ``memoryview(segment)`` gives the bytes; ``fileno()`` the fd to pass on.

    ``Segment(size, replace=old)`` maps the new segment where ``old`` (a
    segment of the same page-rounded size that nothing uses any more) is
    mapped, in one system call; ``old`` is closed either way unless views
    still use it.
    """

    def __cinit__(self, size=None, *, kind=None, Segment replace=None):
        self.base = NULL
        self.fd = -1
        self.exports = 0
        if size is None:          # from_fd() fills the object in
            return
        if not isinstance(size, int):
            raise TypeError("segment size must be an int, not %s" % type(size).__name__)
        if size <= 0:
            raise ValueError("segment size must be positive, got %d" % size)
        if kind is None:
            use_shm = _default_kind_is_shm()
        elif kind in ("memfd", "shm"):
            use_shm = kind == "shm"
        else:
            raise ValueError("kind must be 'memfd' or 'shm', got %r" % (kind,))
        cdef Py_ssize_t mapped = _page_round(size)
        cdef int fd
        cdef bytes name
        if use_shm:
            name = ("/shrimpio-%d-%s" % (_os.getpid(), _secrets.token_hex(8))).encode()
            fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0o600)
            if fd < 0:
                PyErr_SetFromErrno(OSError)
            shm_unlink(name)
            self.kind = "shm"
        else:
            fd = memfd_create(b"shrimpio", MFD_CLOEXEC | MFD_ALLOW_SEALING)
            if fd < 0:
                PyErr_SetFromErrno(OSError)
            self.kind = "memfd"
        self.fd = fd
        try:
            if ftruncate(fd, mapped) != 0:
                PyErr_SetFromErrno(OSError)
            if not use_shm and fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0:
                PyErr_SetFromErrno(OSError)
            if replace is not None and replace.base != NULL and replace.mapped == mapped \
                    and replace.exports == 0:
                self._map_over(replace, size)
            else:
                if replace is not None and replace.exports == 0:
                    replace.close()
                self._map(size, mapped)
        except BaseException:
            close(fd)
            self.fd = -1
            raise

    cdef _map_over(self, Segment old, Py_ssize_t size):
        """Map our fd where ``old`` is mapped (same size, no users): the
        kernel drops the old mapping in the same call, cheaper than an
        munmap and an mmap.  ``old`` ends up closed."""
        cdef void *p = mmap(old.base, old.mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                            self.fd, 0)
        cdef int err = errno
        if p == MAP_FAILED:
            munmap(old.base, old.mapped)      # whatever is left of it
        old.base = NULL
        if old.fd >= 0:
            close(old.fd)
            old.fd = -1
        if p == MAP_FAILED:
            raise OSError(err, _os.strerror(err))
        self.base = <char *>p
        self.size = size
        self.mapped = old.mapped

    cdef _map(self, Py_ssize_t size, Py_ssize_t mapped):
        cdef void *p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            PyErr_SetFromErrno(OSError)
        self.base = <char *>p
        self.size = size
        self.mapped = mapped

    @staticmethod
    def from_fd(int fd, size=None, *, bint keep_fd=True, bint allow_unsealed=False):
        """Map a segment received from a peer; takes ownership of ``fd``.

        ``size`` is what the peer announced; the file must be at least that
        large (page-rounded).  It must be a memfd sealed against shrinking,
        or a peer could truncate it under us and crash us with SIGBUS
        (``PermissionError`` otherwise).  Objects that cannot carry seals
        (``shm_open``'s, made with ``SHRIMPIO_SEGMENT=shm``) are mapped only
        with ``allow_unsealed=True``: for a peer trusted not to truncate
        them (a child of ours, a test), never for one met through the
        registry.  ``keep_fd=False`` closes the fd once mapped (the mapping
        stays).
        """
        cdef Segment seg = Segment.__new__(Segment)
        cdef struct_stat st
        cdef int r
        try:
            if fstat(fd, &st) != 0:
                PyErr_SetFromErrno(OSError)
            if not S_ISREG(st.st_mode):
                raise ValueError("fd %d is not a shared memory object" % fd)
            if st.st_blksize != PAGE:
                # Huge pages (hugetlbfs memfd): a fault when the pool runs
                # dry is a SIGBUS, seals or not.
                raise ValueError("fd %d is not backed by ordinary pages" % fd)
            if size is None:
                size = st.st_size
            if not isinstance(size, int) or size <= 0:
                raise ValueError("bad segment size %r" % (size,))
            # Compare before rounding: a huge announced size would overflow it.
            if size > st.st_size:
                raise ValueError("segment fd holds %d bytes, %d announced" % (st.st_size, size))
            mapped = _page_round(size)
            if st.st_size < mapped:
                raise ValueError("segment fd holds %d bytes, %d announced" % (st.st_size, size))
            r = fcntl(fd, F_GET_SEALS)
            if r < 0 and errno != EINVAL:
                PyErr_SetFromErrno(OSError)
            seals = None if r < 0 else r        # None: cannot carry seals (not a memfd)
            if seals is not None and seals & F_SEAL_SHRINK:
                seg.kind = "memfd"
            elif seals is not None and not seals & F_SEAL_SEAL:
                # Sealable, yet the sender did not seal it: refuse whatever the settings.
                raise PermissionError(_errno.EPERM, "memfd segment is not sealed against shrinking")
            else:
                # Cannot carry seals: the shm fallback.  (Linux tmpfs files answer
                # F_GET_SEALS with F_SEAL_SEAL alone, other systems with EINVAL.)
                if not allow_unsealed:
                    raise PermissionError(_errno.EPERM, "segment is not a sealed memfd (a peer "
                                          "could truncate it under us)")
                seg.kind = "shm"
            seg.fd = fd
            seg._map(size, mapped)
        except BaseException:
            seg.fd = -1
            _os.close(fd)
            raise
        if not keep_fd:
            close(fd)
            seg.fd = -1
        return seg

    @property
    def closed(self):
        return self.base == NULL

    def fileno(self):
        """The fd of the shared memory object, for passing to another process."""
        if self.base == NULL:
            raise ValueError("segment is closed")
        if self.fd < 0:
            raise ValueError("segment was mapped without keeping its fd")
        return self.fd

    def close_fd(self):
        """Close the fd, keep the mapping (once the fd has been passed on)."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.base == NULL:
            raise ValueError("segment is closed")
        PyBuffer_FillInfo(buffer, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def close(self):
        """Unmap and close the fd.  BufferError while views or rings use it."""
        if self.base == NULL:
            return
        if self.exports:
            raise BufferError("segment still has %d buffer users (memoryviews or rings)" % self.exports)
        munmap(self.base, self.mapped)
        self.base = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.mapped)
        if self.fd >= 0:
            close(self.fd)

    def __repr__(self):
        if self.base == NULL:
            return "<Segment closed>"
        return "<Segment %s size=%d fd=%d>" % (self.kind, self.size, self.fd)


def _ref_store(Segment seg, Py_ssize_t offset, uint64_t value):
    """Reference for benchmarks: one release store of a word (the minimal 'send')."""
    if offset < 0 or offset + 8 > seg.size or offset % 8:
        raise ValueError("bad offset")
    shr_release_fence()
    (<uint64_t *>(seg.base + offset))[0] = value


def _ref_wait(Segment seg, Py_ssize_t offset, uint64_t value):
    """Reference for benchmarks: spin (GIL released) until the word equals value."""
    if offset < 0 or offset + 8 > seg.size or offset % 8:
        raise ValueError("bad offset")
    cdef volatile uint64_t *p = <volatile uint64_t *>(seg.base + offset)
    if p[0] == value:
        return
    with nogil:
        while p[0] != value:
            pass


# ---------------------------------------------------------------------------
# locks held per role (reader / writer) of a ring end


cdef int _gate_init(gate_t *g) except -1:
    g.lock = PyThread_allocate_lock()
    if g.lock == NULL:
        raise MemoryError()
    g.busy = 0
    g.held = 0
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
        with nogil:
            r = PyThread_acquire_lock_timed(g.lock, us, 0)
        if r != PY_LOCK_ACQUIRED:
            raise TimeoutError(_errno.ETIMEDOUT, "timed out")
        PyThread_release_lock(g.lock)
    g.busy = 1
    return 0


cdef inline void _gate_hold(gate_t *g) noexcept:
    """Called inside, before releasing the GIL: make later arrivals queue."""
    if not g.held:
        with nogil:
            PyThread_acquire_lock(g.lock, 1)
        g.held = 1


cdef inline void _gate_leave(gate_t *g) noexcept:
    g.busy = 0
    if g.held:
        g.held = 0
        PyThread_release_lock(g.lock)


cdef inline double _timeout_arg(object timeout) except? -2.0:
    if timeout is None:
        return -1.0
    cdef double t = timeout
    if not t >= 0:      # negative or NaN
        raise ValueError("timeout must be None or >= 0, got %r" % (timeout,))
    if t > 1e9:         # ~31 years, or inf: for ever (keeps the ns arithmetic in range)
        return -1.0
    return t


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


def adapt_spin(double cur, double top, double ceiling, bint spun, double waited):
    """The rule of :func:`_adapt_spin_to` in seconds, for waits made in
    Python (a listener's accept): the next spin after one of ``cur``
    seconds that caught the event (``spun``) or slept ``waited`` seconds."""
    return _adapt_spin_to(<int64_t>(cur * 1e9), <int64_t>(top * 1e9), <int64_t>(ceiling * 1e9),
                          spun, <int64_t>(waited * 1e9)) / 1e9


cdef inline int _bell_kind(str bell) except -1:
    if bell == "socket":
        return SHR_BELL_SOCKET
    if bell == "eventfd":
        return SHR_BELL_EVENTFD
    raise ValueError("bell must be 'socket' or 'eventfd', got %r" % (bell,))


# ---------------------------------------------------------------------------
# Ring


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
    """

    def __cinit__(self, Segment segment not None, Py_ssize_t offset=0, capacity=None, *,
                  bint create=False, int data_bell=-1, int space_bell=-1, str bell="socket",
                  busy_poll_us=None):
        cdef uint64_t cap
        cdef shr_ring_hdr *hdr
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
        if segment.base == NULL:
            raise ValueError("segment is closed")
        if offset < 0 or offset % 64:
            raise ValueError("ring offset must be a non-negative multiple of 64, got %d" % offset)
        if offset + SHR_RING_HEADER > segment.size:
            raise ValueError("no room for a ring header at offset %d" % offset)
        hdr = <shr_ring_hdr *>(segment.base + offset)
        if capacity is None:
            if create:
                raise ValueError("capacity is required to create a ring")
            if not shr_header_ok(hdr):
                raise RingCorruptedError("no shrimpio ring at offset %d" % offset)
            cap = shr_header_cap(hdr)
            # The header is the peer's word: an impossible capacity is corruption.
            if (cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1))
                    or <uint64_t>(segment.size - offset - SHR_RING_HEADER) < cap):
                raise RingCorruptedError("ring header at offset %d announces an impossible "
                                         "capacity %d" % (offset, cap))
        else:
            if not isinstance(capacity, int):
                raise TypeError("ring capacity must be an int, not %s" % type(capacity).__name__)
            if capacity < <object>MIN_CAPACITY or capacity > <object>MAX_CAPACITY:
                raise ValueError("ring capacity must be a power of two in [%d, 2**40], got %d"
                                 % (MIN_CAPACITY, capacity))
            cap = capacity
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1)):
            raise ValueError("ring capacity must be a power of two in [%d, 2**40], got %d"
                             % (MIN_CAPACITY, cap))
        if <uint64_t>(segment.size - offset - SHR_RING_HEADER) < cap:
            raise ValueError("a ring of capacity %d does not fit in the segment at offset %d"
                             % (cap, offset))
        if create:
            shr_init(hdr, cap)
        elif not shr_header_ok(hdr) or shr_header_cap(hdr) != cap:
            raise RingCorruptedError("no shrimpio ring of capacity %d at offset %d" % (cap, offset))
        PyObject_GetBuffer(segment, &self.view, PyBUF_WRITABLE)
        self.attached = True
        self.h = hdr
        self.data = segment.base + offset + SHR_RING_HEADER
        self.cap = cap
        self.head = shr_load_head(hdr)
        self.tail = shr_load_tail(hdr)
        if self.head - self.tail > cap:
            self.broken = True
            raise RingCorruptedError("ring indices are inconsistent (head %d, tail %d)"
                                     % (self.head, self.tail))
        self.seen_head = self.head
        self.seen_tail = self.tail

    def __dealloc__(self):
        if self.attached:
            PyBuffer_Release(&self.view)
        _gate_free(&self.rgate)
        _gate_free(&self.wgate)

    @staticmethod
    def footprint(capacity):
        """Bytes a ring of this capacity takes in a segment (header included)."""
        return SHR_RING_HEADER + capacity

    # -- internals ---------------------------------------------------------

    cdef int _check_open(self) except -1:
        if not self.attached or self.closing:
            raise ValueError("ring is closed")
        if self.broken:
            raise RingCorruptedError("ring is broken: the peer wrote impossible values")
        return 0

    cdef int _corrupt(self, str what) except -1:
        self.broken = True
        raise RingCorruptedError("peer corrupted the ring: " + what)

    cdef uint64_t _avail(self) except? 0xffffffffffffffff:
        """Bytes readable (consumer side), validating the producer's index."""
        cdef uint64_t head = shr_load_head(self.h)
        if head - self.tail > self.cap or head - self.seen_head > self.cap:
            self._corrupt("producer index %d with consumer at %d" % (head, self.tail))
        self.seen_head = head
        return head - self.tail

    cdef uint64_t _room(self) except? 0xffffffffffffffff:
        """Bytes writable (producer side), validating the consumer's index."""
        cdef uint64_t tail = shr_load_tail(self.h)
        if self.head - tail > self.cap or tail - self.seen_tail > self.cap:
            self._corrupt("consumer index %d with producer at %d" % (tail, self.head))
        self.seen_tail = tail
        self.room_cache = self.cap - (self.head - tail)
        return self.room_cache

    cdef int _publish(self, uint64_t new_head) except -1:
        self.room_cache -= new_head - self.head
        self.head = new_head
        shr_publish_head(self.h, new_head)
        self.stat_idx[0] = new_head
        shr_wake_reader(self.h, self.data_bell, self.bell_kind)
        return 0

    cdef int _release(self, uint64_t new_tail) except -1:
        self.tail = new_tail
        shr_publish_tail(self.h, new_tail)
        self.stat_idx[0] = new_tail
        shr_wake_writer(self.h, self.space_bell, self.bell_kind)
        return 0

    cdef Py_ssize_t _copy_in(self, uint64_t at, const char *src, Py_ssize_t n) noexcept nogil:
        """Copy n bytes (n <= room) to stream position ``at``; does not publish."""
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t pos = at & mask
        cdef uint64_t first = self.cap - pos
        if <uint64_t>n <= first:
            memcpy(self.data + pos, src, n)
        else:
            memcpy(self.data + pos, src, first)
            memcpy(self.data, src + first, n - first)
        return n

    cdef Py_ssize_t _copy_out(self, char *dst, Py_ssize_t n) noexcept nogil:
        """Copy n bytes (n <= avail) from the consumer position; does not release."""
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t pos = self.tail & mask
        cdef uint64_t first = self.cap - pos
        if <uint64_t>n <= first:
            memcpy(dst, self.data + pos, n)
        else:
            memcpy(dst, self.data + pos, first)
            memcpy(dst + first, self.data, n - first)
        return n

    cdef int _arm_reader(self) except -1:
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
        cdef int r = 0
        if self.data_bell >= 0 and self.bell_kind == SHR_BELL_SOCKET:
            r = shr_bell_drain(self.data_bell, SHR_BELL_SOCKET)
        c.h = self.h
        c.pos = self.tail
        c.need = 1
        c.cap = self.cap
        c.writable = 0
        shr_cond_arm(&c, 1)
        if shr_cond_ready(&c):
            return 1
        if r == -2 or r == -1:
            return 2
        return 0

    cdef bint _peer_gone_now(self, int bell) noexcept:
        """Is the peer behind socket doorbell ``bell`` gone?  One poll(0):
        only for the paths that would otherwise say "try again" (the data
        path never pays it)."""
        return bell >= 0 and self.bell_kind == SHR_BELL_SOCKET and shr_bell_peer_gone(bell) != 0

    cdef int _wait(self, int writable, uint64_t need, double timeout) except -2:
        """Spin, then sleep on the doorbell.  1 ready, 0 timed out, 2 peer gone.

        The caller holds the role lock and re-validates after a return of 1.
        """
        cdef shr_cond c
        cdef int bell = self.space_bell if writable else self.data_bell
        cdef int rc
        cdef int64_t spin = self.spin_ns, t0, limit
        if bell < 0:
            raise ValueError("this ring has no doorbell for blocking waits; use timeout=0")
        _gate_hold(&self.wgate if writable else &self.rgate)
        c.h = self.h
        c.pos = self.head if writable else self.tail
        c.need = need
        c.cap = self.cap
        c.writable = writable
        t0 = shr_now_ns()
        limit = -1 if timeout < 0 else t0 + <int64_t>(timeout * 1e9)
        self.stat_blocked[0] = 1
        try:
            rc = self._wait_until(&c, writable, spin, limit)
        finally:
            self.stat_blocked[0] = 0
        if rc == 1:
            self.spin_ns = _adapt_spin(self.spin_ns, self.spin_max_ns, self._wait_spun,
                                       shr_now_ns() - t0)
        return rc

    cdef int _wait_until(self, void *cond, int writable, int64_t spin, int64_t limit) except -2:
        """_wait's spin and sleeps (``cond``: its shr_cond): 1 ready
        (``_wait_spun``: caught spinning), 0 timed out, 2 peer gone."""
        cdef shr_cond *c = <shr_cond *>cond
        cdef int bell
        cdef int kind = self.bell_kind
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
            bell = self.space_bell if writable else self.data_bell
            with nogil:
                rc = shr_wait_any(c, 1, &bell, &kind, -1, spin, slice_ns, &which, &spun)
            spin = 0
            if rc == SHR_READY:
                self._wait_spun = spun
                return 1
            if rc == SHR_GONE:
                return 2
            if rc == SHR_ERROR:
                PyErr_SetFromErrno(OSError)
            PyErr_CheckSignals()
            if self.closing:
                raise ValueError("ring was closed while waiting")
            if rc == SHR_TIMEOUT and limit >= 0 and shr_now_ns() >= limit:
                return 0

    def set_stat(self, table, Py_ssize_t idx_at, Py_ssize_t blocked_at, bint writer):
        """Mirror this end's index (bytes written, for the ``writer``; read,
        for the reader) and whether a thread is blocked in its wait into a
        ``shrimpio stat`` table slot: a u64 at ``idx_at`` and a u32 at
        ``blocked_at`` of the writable buffer ``table`` (shrimpio/_stat.py),
        which is kept alive.  ``table=None`` goes back to mirroring nowhere.
        One plain store per publish: the stat reader tolerates torn or
        stale values."""
        cdef Py_buffer buf
        cdef char *p
        if table is None:
            self.stat_idx = &self.stat_idx_none
            self.stat_blocked = &self.stat_blocked_none
            self.stat_owner = None
            return
        view = memoryview(table)
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

    # -- properties --------------------------------------------------------

    @property
    def capacity(self):
        """Bytes the ring holds when full."""
        return self.cap

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
        return self._avail()

    def free(self):
        """Bytes that can be written now (producer side)."""
        self._check_open()
        return self._room()

    def at_eof(self):
        """True once the producer shut its side and every byte was consumed."""
        self._check_open()
        if self.eof:
            return True
        if shr_load_wshut(self.h) and self._avail() == 0:
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

    cdef int _writable_check(self) except -1:
        self._check_open()
        if self.wshut:
            raise BrokenPipeError(_errno.EPIPE, "ring write side is shut")
        if shr_load_rshut(self.h):
            raise BrokenPipeError(_errno.EPIPE, "the reading side is closed")
        return 0

    cdef Py_ssize_t _write_bufs(self, Py_buffer *bufs, Py_ssize_t nbufs, Py_ssize_t total,
                                double timeout, bint all_) except -1:
        """Gather-write; returns bytes written (all of them if all_)."""
        cdef Py_ssize_t done = 0, i = 0, off = 0, chunk, room, n, m
        cdef uint64_t at
        cdef int64_t limit = 0      # computed on the first wait only
        cdef double left
        cdef int rc
        _gate_enter(&self.wgate, timeout)
        try:
            self._writable_check()
            while True:
                # Re-read the consumer's index only when the room we already
                # know of is not enough: saves a cache-line transfer per write.
                room = self.room_cache
                if <Py_ssize_t>room < total - done:
                    room = self._room()
                if room > 0 and done < total:
                    n = min(room, total - done, PIPE_CHUNK)
                    chunk = n
                    at = self.head
                    while chunk > 0:
                        m = min(chunk, bufs[i].len - off)
                        if m >= NOGIL_COPY:
                            _gate_hold(&self.wgate)
                            with nogil:
                                self._copy_in(at, <char *>bufs[i].buf + off, m)
                        else:
                            self._copy_in(at, <char *>bufs[i].buf + off, m)
                        at += m
                        chunk -= m
                        off += m
                        if off == bufs[i].len:
                            i += 1
                            off = 0
                    self._publish(at)
                    done += n
                    if done == total:
                        return done
                    continue        # the next piece, or wait for room
                if done == total:
                    return done
                if done and not all_:
                    return done     # as much as fitted
                if timeout == 0:
                    # Full, and no waiting: as TCP, a reader that died is EPIPE
                    # (else a non-blocking writer would see EAGAIN for ever).
                    if self._peer_gone_now(self.space_bell):
                        raise BrokenPipeError(_errno.EPIPE, "the reading side is gone")
                    # all_: a silent short write would lose data; say how much went in.
                    raise BlockingIOError(_errno.EAGAIN, "ring is full", done)
                if limit == 0:
                    limit = -1 if timeout < 0 else shr_now_ns() + <int64_t>(timeout * 1e9)
                left = -1.0 if limit < 0 else max(0.0, (limit - shr_now_ns()) / 1e9)
                rc = self._wait(1, 1, left)
                if rc == 0:
                    raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for ring space")
                if rc == 2:
                    raise BrokenPipeError(_errno.EPIPE, "the reading side is gone")
                self._writable_check()
        finally:
            _gate_leave(&self.wgate)

    cdef int _write_raw(self, const char *src, Py_ssize_t n, double timeout) except -1:
        """Write all of a C buffer (used for notification records)."""
        cdef Py_buffer b
        b.buf = <void *>src
        b.len = n
        self._write_bufs(&b, 1, n, timeout, True)
        return 0

    def write(self, data, timeout=0.0):
        """Write as much of ``data`` as fits, waiting until something fits.

        Returns the number of bytes written (like ``socket.send``)."""
        cdef Py_buffer buf
        cdef double t = _timeout_arg(timeout)
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if buf.len == 0:
                self._writable_check()
                return 0
            return self._write_bufs(&buf, 1, buf.len, t, False)
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
                self._writable_check()
                return None
            self._write_bufs(&buf, 1, buf.len, t, True)
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
                self._writable_check()
                return 0
            return self._write_bufs(bufs, n, total, t, all)
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

    cdef int _read_big(self, char *dst, uint64_t n) except -1:
        """Copy out n readable bytes, releasing them piece by piece: the
        writer refills the ring while we copy (one copy's time, not two)."""
        cdef uint64_t piece
        _gate_hold(&self.rgate)
        while n:
            piece = min(n, <uint64_t>PIPE_CHUNK)
            with nogil:
                self._copy_out(dst, piece)
            self._release(self.tail + piece)
            dst += piece
            n -= piece
        return 0

    cdef Py_ssize_t _read(self, char *dst, Py_ssize_t n, double timeout) except -1:
        cdef uint64_t avail
        cdef int64_t limit = 0      # computed on the first wait only
        cdef double left
        cdef int rc
        _gate_enter(&self.rgate, timeout)
        try:
            self._check_open()
            while True:
                avail = self._avail()
                if avail:
                    if avail > <uint64_t>n:
                        avail = n
                    if <Py_ssize_t>avail >= NOGIL_COPY:
                        self._read_big(dst, avail)
                    else:
                        self._copy_out(dst, avail)
                        self._release(self.tail + avail)
                    return avail
                if n == 0 or self.eof:
                    return 0
                if shr_load_wshut(self.h):
                    if self._avail() == 0:
                        self.eof = True
                        return 0
                    continue
                if timeout == 0:
                    # Empty, and no waiting: armed for a poller of the
                    # program's own (see _arm_reader); as TCP, a writer that
                    # died is the end (else a non-blocking reader would see
                    # EAGAIN for ever).  Data or a shut that came before its
                    # death first.
                    rc = self._arm_reader()
                    if rc == 1:
                        continue
                    if rc == 2:
                        if self._avail() or shr_load_wshut(self.h):
                            continue
                        raise ConnectionResetError(_errno.ECONNRESET, "the writing side is gone")
                    raise BlockingIOError(_errno.EAGAIN, "ring is empty")
                if limit == 0:
                    limit = -1 if timeout < 0 else shr_now_ns() + <int64_t>(timeout * 1e9)
                left = -1.0 if limit < 0 else max(0.0, (limit - shr_now_ns()) / 1e9)
                rc = self._wait(0, 1, left)
                if rc == 0:
                    raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for data")
                if rc == 2:
                    if self._avail():
                        continue
                    if shr_load_wshut(self.h):
                        continue
                    raise ConnectionResetError(_errno.ECONNRESET, "the writing side is gone")
                self._check_open()
        finally:
            _gate_leave(&self.rgate)

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
            return self._read(<char *>buf.buf, nbytes, t)
        finally:
            PyBuffer_Release(&buf)

    def read(self, Py_ssize_t nbytes, timeout=0.0):
        """Read up to ``nbytes`` and return them as bytes (b'' at end of stream)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        cdef double t = _timeout_arg(timeout)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, nbytes)
        cdef Py_ssize_t n = self._read(PyBytes_AS_STRING(out), nbytes, t)
        if n == nbytes:
            return out
        return out[:n]

    def peek(self, Py_ssize_t nbytes=-1):
        """Zero-copy view of readable bytes, up to ``nbytes``, without consuming.

        The view stops at the wrap-around point, so it may be shorter than
        what is readable: ``consume()`` it, then peek again.  It is valid until
        ``consume()``: after that the producer may overwrite those bytes."""
        self._check_open()
        cdef uint64_t avail = self._avail()
        cdef uint64_t pos = self.tail & (self.cap - 1)
        cdef uint64_t n = min(avail, self.cap - pos)
        if 0 <= nbytes < <Py_ssize_t>n:
            n = nbytes
        cdef Py_ssize_t start = (self.data - <char *>self.view.buf) + pos
        return memoryview(self.view.obj)[start:start + <Py_ssize_t>n].toreadonly()

    def consume(self, Py_ssize_t nbytes):
        """Drop ``nbytes`` readable bytes (after ``peek``)."""
        self._check_open()
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        _gate_enter(&self.rgate, -1)
        try:
            if <uint64_t>nbytes > self._avail():
                raise ValueError("cannot consume %d bytes, only %d readable" % (nbytes, self._avail()))
            if nbytes:
                self._release(self.tail + nbytes)
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
            if self._avail() or shr_load_wshut(self.h) or t == 0:
                return bool(self._avail() or shr_load_wshut(self.h))
            rc = self._wait(0, 1, t)
            return rc != 0
        finally:
            _gate_leave(&self.rgate)

    def wait_writable(self, Py_ssize_t nbytes=1, timeout=None):
        """Wait until ``nbytes`` of room (or a closed reader); False on timeout."""
        cdef double t = _timeout_arg(timeout)
        cdef int rc
        if nbytes < 1 or <uint64_t>nbytes > self.cap:
            raise ValueError("nbytes must be in [1, capacity]")
        _gate_enter(&self.wgate, t)
        try:
            self._check_open()
            if self._room() >= <uint64_t>nbytes or shr_load_rshut(self.h) or t == 0:
                return bool(self._room() >= <uint64_t>nbytes or shr_load_rshut(self.h))
            rc = self._wait(1, nbytes, t)
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
            PyBuffer_Release(&self.view)
        _gate_leave(&self.wgate)
        _gate_leave(&self.rgate)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if not self.attached:
            return "<Ring closed>"
        return "<Ring capacity=%d head=%d tail=%d%s>" % (
            self.cap, self.head, self.tail, " broken" if self.broken else "")


# ---------------------------------------------------------------------------
# VMMC buffer ends

cdef inline int _liveness(int fd, int64_t *last, bint *gone) noexcept:
    """Is the peer behind a socket still there?  At most one poll(0) per
    clock tick of CLOCK_MONOTONIC_COARSE, so the data path stays free of
    system calls in the steady state."""
    cdef int64_t now
    if gone[0]:
        return 1
    now = shr_coarse_ns()
    if now != last[0]:
        last[0] = now
        if shr_bell_peer_gone(fd):
            gone[0] = True
    return gone[0]


cdef extern from "Python.h":
    # PyNumber_AsSsize_t(o, NULL): an integer argument (``__index__``) as
    # Py_ssize_t, TypeError for other types; values beyond Py_ssize_t clamp to
    # its limits (they are out of bounds either way, and the caller's bounds
    # check says so with a ValueError instead of an OverflowError).
    Py_ssize_t _index_clamped_c "PyNumber_AsSsize_t"(object o, void *exc) except? -1


cdef inline Py_ssize_t _index_clamped(object value) except? -1:
    return _index_clamped_c(value, NULL)


cdef class Proxy:
    """The importing side of a VMMC buffer (the SHRIMP 'proxy').

    ``send`` is a deliberate update: it copies into the remote buffer, checks
    bounds, and optionally queues a notification ``(offset, nbytes)``;
    ``fetch`` reads the buffer where the exporter allowed it.
    """

    def __cinit__(self, Segment segment not None, Ring notes not None, int ctrl_fd, *,
                  bint readable=False, size=None):
        self._seg = segment
        self._notes = notes
        self._ctrl_fd = ctrl_fd
        self.readable = readable
        self.size = segment.size if size is None else size
        if self.size < 0 or self.size > segment.size:
            raise ValueError("buffer size %d does not fit the segment" % self.size)

    cdef inline int _usable(self) except -1:
        if self._seg is None:
            raise ValueError("imported buffer is closed")
        if _liveness(self._ctrl_fd, &self._last_check, &self._gone):
            raise ConnectionResetError(_errno.ECONNRESET, "the exporter of this buffer is gone")
        return 0

    def send(self, data, offset=0, *, bint notify=False):
        """Copy ``data`` (any bytes-like object) into the remote buffer at
        ``offset``; with ``notify=True`` the exporter's handler (or ``wait()``)
        gets ``(offset, len(data))`` once the data is in place."""
        cdef Py_buffer buf
        cdef uint64_t rec[2]
        cdef Py_ssize_t off = _index_clamped(offset)
        self._usable()
        # Own references: close() in another thread may reset the attributes
        # while this thread copies with the GIL released.
        cdef Segment seg = self._seg
        cdef Ring notes = self._notes
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if off < 0 or off > self.size or buf.len > self.size - off:
                raise ValueError("send of %d bytes at offset %d is outside the %d-byte buffer"
                                 % (buf.len, offset, self.size))
            if buf.len >= NOGIL_COPY:
                # Pin the mapping: Segment.close() refuses (BufferError) while
                # the copy runs, instead of unmapping it under our feet.
                seg.exports += 1
                try:
                    with nogil:
                        memcpy(seg.base + off, buf.buf, buf.len)
                finally:
                    seg.exports -= 1
            else:
                memcpy(seg.base + off, buf.buf, buf.len)
            shr_release_fence()
            if notify:
                rec[0] = off
                rec[1] = buf.len
                try:
                    notes._write_raw(<char *>rec, 16, -1.0)
                except BrokenPipeError:
                    self._gone = True
                    raise ConnectionResetError(_errno.ECONNRESET, "the exporter of this buffer is gone")
        finally:
            PyBuffer_Release(&buf)

    def fetch(self, offset, nbytes):
        """Remote fetch: read ``nbytes`` at ``offset`` of the remote buffer."""
        cdef Py_ssize_t off = _index_clamped(offset)
        cdef Py_ssize_t n = _index_clamped(nbytes)
        if not self.readable:
            raise PermissionError(_errno.EACCES, "the exporter did not allow fetching this buffer")
        self._usable()
        if off < 0 or n < 0 or off > self.size or n > self.size - off:
            raise ValueError("fetch of %d bytes at offset %d is outside the %d-byte buffer"
                             % (nbytes, offset, self.size))
        shr_release_fence()
        return PyBytes_FromStringAndSize(self._seg.base + off, n)

    def _detach(self):
        """Forget the mappings (the owner closes them)."""
        self._seg = None
        self._notes = None


cdef class Export:
    """The exporting side of a VMMC buffer: the memory, plus the notification
    rings of its importers (one ring and one control socket per importer).

    ``wait()`` is the polling-then-blocking receive of notifications.
    Notifications can be blocked (nesting); while blocked they stay queued in
    the importers' rings and are delivered after the last unblock.
    """

    def __cinit__(self, Segment segment not None, *, bint has_handler=False):
        self.segment = segment
        self.size = segment.size
        self._links = []
        self._has_handler = has_handler
        self._local_bell = -1       # __dealloc__ must not close fd 0 if eventfd() fails
        self._spin_ns = -1
        _gate_init(&self._gate)
        self._local_bell = _os.eventfd(0, _os.EFD_NONBLOCK | _os.EFD_CLOEXEC)

    def __dealloc__(self):
        _gate_free(&self._gate)
        if self._local_bell >= 0:
            close(self._local_bell)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self._closed or self.segment.base == NULL:
            raise ValueError("exported buffer is closed")
        PyBuffer_FillInfo(buffer, self, self.segment.base, self.segment.size, 0, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    cdef _poke(self):
        shr_bell_ring(self._local_bell, SHR_BELL_EVENTFD)

    def _add_link(self, Ring ring not None, closer):
        """A new importer: its notification ring (consumer end) and a callable
        that releases it (closes its socket and segment)."""
        if self._closed:
            try:
                ring.close()        # the closer releases the segment the ring uses
            finally:
                closer()
            raise ValueError("exported buffer is closed")
        self._prune()
        self._links.append([ring, closer])
        self._poke()

    def _prune(self):
        """Release importers that are gone and left nothing queued.  A waiter
        does this itself (its doorbells report the hang-up); this is for
        buffers nobody waits on, which would otherwise keep every importer
        that ever came (a socket and a segment each) until unexported."""
        cdef Ring ring
        cdef Py_ssize_t i
        cdef list dead = []
        if self._gate.busy:
            return                  # a waiter is inside and handles them itself
        _gate_enter(&self._gate, 0)
        try:
            i = len(self._links) - 1
            while i >= 0:
                ring = <Ring>(<list>self._links[i])[0]
                if shr_bell_peer_gone(ring.data_bell):
                    try:
                        if ring._avail() == 0:
                            dead.append(self._links.pop(i))
                    except RingCorruptedError:
                        dead.append(self._links.pop(i))
                i -= 1
        finally:
            _gate_leave(&self._gate)
        # Outside the gate: closing sockets releases the GIL, and a wait(0)
        # meanwhile must not find the gate busy.
        for ring, closer in dead:
            try:
                ring.close()
            finally:
                closer()

    cdef _drop(self, Py_ssize_t i):
        ring, closer = self._links.pop(i)
        try:
            ring.close()
        finally:
            closer()

    @property
    def importers(self):
        """Number of live importers."""
        return len(self._links)

    @property
    def blocked(self):
        """Nesting depth of block_notifications()."""
        return self._blocked

    def block_notifications(self):
        """Defer notification delivery until the matching unblock (nests)."""
        self._blocked += 1

    def unblock_notifications(self):
        """Undo one block_notifications(); at zero, queued ones are delivered."""
        if self._blocked == 0:
            raise RuntimeError("notifications are not blocked")
        self._blocked -= 1
        if self._blocked == 0 and self._waiting:
            self._poke()

    cdef object _take(self):
        """Next valid record from any importer, round robin; None if none."""
        cdef Py_ssize_t n = len(self._links), k, i
        cdef Ring ring
        cdef uint64_t avail
        cdef uint64_t rec[2]
        k = 0
        while k < n:
            i = (self._rr + k) % n
            ring = <Ring>(<list>self._links[i])[0]
            try:
                avail = ring._avail()
                if avail == 0:
                    k += 1
                    continue
                if avail < 16:
                    ring._corrupt("partial notification record")
                ring._copy_out(<char *>rec, 16)
                ring._release(ring.tail + 16)
                if rec[1] > <uint64_t>self.size or rec[0] > <uint64_t>self.size - rec[1]:
                    ring._corrupt("notification (%d, %d) outside the %d-byte buffer"
                                  % (rec[0], rec[1], self.size))
            except RingCorruptedError:
                self._drop(i)       # a misbehaving importer loses its own link only
                n -= 1
                continue
            self._rr = i + 1
            return (<Py_ssize_t>rec[0], <Py_ssize_t>rec[1])
        return None

    cdef object _next(self, double timeout):
        # Up to 64 importers' rings live on the stack; more in buffers that
        # grow with the count: every importer's doorbell is watched.
        cdef shr_cond cstack[64]
        cdef int bstack[64]
        cdef int kstack[64]
        cdef shr_cond *conds = cstack
        cdef int *bells = bstack
        cdef int *kinds = kstack
        cdef Py_ssize_t room = 64
        cdef bytes held = None
        cdef int n, k, rc, which = 0, spun = 0
        cdef int64_t limit = 0      # computed on the first wait only
        cdef int64_t slice_ns, spin = -1, top = 0, t0 = 0
        cdef Ring ring
        try:
            _gate_enter(&self._gate, timeout)
        except (BlockingIOError, TimeoutError):
            return None             # another thread waited (and took) for that long
        try:
            while True:
                if self._closed:
                    raise ValueError("exported buffer is closed")
                n = 0
                if self._blocked == 0:
                    rec = self._take()
                    if rec is not None:
                        if t0 != 0:
                            self._spin_ns = _adapt_spin(self._spin_ns if self._spin_ns >= 0 else top,
                                                        top, spun, shr_now_ns() - t0)
                        return rec
                    n = len(self._links)
                    if n > room:
                        room = n + n // 2
                        held = PyBytes_FromStringAndSize(
                            NULL, room * (sizeof(shr_cond) + 2 * sizeof(int)))
                        conds = <shr_cond *>PyBytes_AS_STRING(held)
                        bells = <int *>(conds + room)
                        kinds = bells + room
                    for k in range(n):
                        ring = <Ring>(<list>self._links[k])[0]
                        conds[k].h = ring.h
                        conds[k].pos = ring.tail
                        conds[k].need = 16
                        conds[k].cap = ring.cap
                        conds[k].writable = 0
                        bells[k] = ring.data_bell
                        kinds[k] = ring.bell_kind
                        if spin < 0 or ring.spin_max_ns < spin:
                            spin = ring.spin_max_ns
                if timeout == 0:
                    return None
                if spin > 0 and t0 == 0:
                    # First wait of this call: the rings' budget, adapted
                    # to how long the importers kept us waiting lately.
                    top = spin
                    if self._spin_ns >= 0:
                        spin = self._spin_ns
                    t0 = shr_now_ns()
                if limit == 0:
                    limit = -1 if timeout < 0 else shr_now_ns() + <int64_t>(timeout * 1e9)
                if limit < 0:
                    slice_ns = <int64_t>(SLEEP_SLICE * 1e9)
                else:
                    slice_ns = min(max(limit - shr_now_ns(), 0), <int64_t>(SLEEP_SLICE * 1e9))
                self._waiting = 1
                _gate_hold(&self._gate)
                with nogil:
                    rc = shr_wait_any(conds, n, bells, kinds, self._local_bell,
                                      max(spin, 0), slice_ns, &which, &spun)
                self._waiting = 0
                spin = 0
                if rc == SHR_GONE:
                    self._drop(which)
                elif rc == SHR_ERROR:
                    PyErr_SetFromErrno(OSError)
                elif rc == SHR_TIMEOUT:
                    PyErr_CheckSignals()
                    if limit >= 0 and shr_now_ns() >= limit:
                        return None
                elif rc == SHR_EINTR:
                    PyErr_CheckSignals()
        finally:
            _gate_leave(&self._gate)

    def wait(self, timeout=None):
        """Next notification as ``(offset, nbytes)``, or None after ``timeout``
        seconds.  Spins for the busy-poll budget, then sleeps."""
        if self._has_handler:
            raise RuntimeError("this buffer delivers notifications to its handler; wait() is "
                               "for buffers exported without notify=")
        return self._next(_timeout_arg(timeout))

    def _wait_for_handler(self, timeout=None):
        return self._next(_timeout_arg(timeout))

    def close(self):
        """Stop delivering, release every importer (they see the exporter gone)."""
        if self._closed:
            return
        if self._exports:
            raise BufferError("exported buffer still has %d memoryviews" % self._exports)
        self._closed = True
        self._poke()
        _gate_enter(&self._gate, -1)
        try:
            while self._links:
                self._drop(len(self._links) - 1)
        finally:
            # No waiter is inside (we hold the gate) and none can enter
            # (closed); a late _poke() on -1 is a no-op.  Releasing the fd
            # here, not at collection, keeps close() from leaking it.
            if self._local_bell >= 0:
                close(self._local_bell)
                self._local_bell = -1
            _gate_leave(&self._gate)

    @property
    def closed(self):
        return self._closed


include "_fastpath_poll.pxi"
include "_fastpath_stream.pxi"
include "_fastpath_transport.pxi"
include "_fastpath_ctl.pxi"
include "_fastpath_handshake.pxi"
include "_fastpath_exit.pxi"
