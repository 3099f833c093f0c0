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
    void shr_init(shr_ring_hdr *h, uint64_t cap, uint32_t small)
    void shr_reader_asleep(shr_ring_hdr *h)
    int shr_header_ok(shr_ring_hdr *h, uint32_t small)
    uint64_t shr_header_cap(shr_ring_hdr *h)
    uint64_t shr_load_base(shr_ring_hdr *h)
    uint32_t shr_load_area(shr_ring_hdr *h)
    void shr_store_area(shr_ring_hdr *h, uint32_t area, uint64_t base)
    void shr_store_chain(shr_ring_hdr *h, uint64_t base, uint64_t sbase)
    uint64_t shr_load_sbase(shr_ring_hdr *h)
    void shr_set_wshut(shr_ring_hdr *h)
    void shr_set_rshut(shr_ring_hdr *h)
    void shr_release_fence()
    int64_t shr_now_ns()
    void shr_note_preempted(int64_t now)
    void shr_forget_preempted()
    uint64_t shr_preempt_count()
    int64_t shr_preempted_at()
    long shr_thread_nivcsw()
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
    int madvise(void *addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FIXED

cdef extern from *:
    """
    #include <sys/mman.h>
    #if defined(__linux__) && defined(MREMAP_MAYMOVE)
    #define SHR_HAVE_MREMAP 1
    /* A second mapping of the pages `addr` maps, `len` bytes of the same
     * file from the same offset on: mremap with an old size of 0 (shared
     * mappings only), no fd needed. */
    static void *shr_map_again(void *addr, size_t len) {
        return mremap(addr, 0, len, MREMAP_MAYMOVE);
    }
    #else
    #define SHR_HAVE_MREMAP 0
    static void *shr_map_again(void *addr, size_t len) { errno = ENOSYS; return MAP_FAILED; }
    #endif
    #ifndef MADV_REMOVE
    #define MADV_REMOVE -1
    #endif
    """
    int SHR_HAVE_MREMAP
    int MADV_REMOVE
    void *shr_map_again(void *addr, size_t length) nogil
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
#: transfer larger than this costs about one copy's time, not two.  16 KiB:
#: a 64 KiB message is four pieces, so the reader starts after a quarter of
#: it (64 KiB sendall + ack 7.1 GB/s against 6.5 with 32 KiB pieces; 1 MiB
#: alike; pieces of 128 KiB and up behave as the whole ring).
cdef Py_ssize_t PIPE_CHUNK = 16 * 1024
#: Copies at least this large run with the GIL released.
cdef Py_ssize_t NOGIL_COPY = PIPE_CHUNK
#: Longest uninterrupted sleep, so that signals get a look-in (seconds).
cdef double SLEEP_SLICE = 1.0
cdef int64_t ADAPT_CEILING = 8    # most an adapted spin grows to, in budgets
#: For this long after a waiter of this process saw itself preempted (its
#: CPU is shared with busy tasks), the rings' blocking waits do not grow
#: their spin past the budget (see _adapt_wait_spin).
cdef int64_t CONTENDED_NS = 200000000
cdef uint64_t MIN_CAPACITY = 64
#: Two-area rings: bytes that would go past this many of the large area
#: make the producer look whether the ring is empty, to start again from
#: its first byte (a request-response exchange then keeps using the same
#: pages, whatever it moves over time).
cdef uint64_t HOT_WINDOW = 64 * 1024
#: A writer asks whether a reader that took nothing is still alive every this
#: many bytes (_ring_probe_reader).
cdef uint64_t PROBE_BYTES = 256 * 1024
#: Two-area rings: the large area's pages go back to the system when the
#: producer returns to the small area, at most this often (nanoseconds):
#: a connection alternating large and small messages pays a system call
#: and the page faults that follow at most once in that time.
cdef int64_t TRIM_INTERVAL_NS = 1000000000
cdef uint64_t MAX_CAPACITY = (<uint64_t>1) << 40
cdef Py_ssize_t PAGE = _os.sysconf("SC_PAGE_SIZE")

RING_HEADER = SHR_RING_HEADER
NOTIFY_RECORD = 16


def _set_trim_interval(double seconds):
    """How often at most a two-area ring gives its large area's pages back
    (tests set 0; the default is 1 s).  Returns the previous value."""
    global TRIM_INTERVAL_NS
    old = TRIM_INTERVAL_NS / 1e9
    TRIM_INTERVAL_NS = <int64_t>(seconds * 1e9)
    return old


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


cdef inline Py_ssize_t _hot_len(Py_ssize_t hot, Py_ssize_t total):
    """Bytes to map at first: ``hot`` page-rounded, or all of ``total``."""
    if hot <= 0 or not SHR_HAVE_MREMAP:
        return total
    return min(_page_round(hot), total)


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

    ``hot=n`` (``Segment(size, hot=n)``, ``from_fd(..., hot=n)``) maps only
    the first ``n`` bytes (page-rounded) for now: the part in use from the
    start.  The rest is mapped, with a second mapping of the same pages
    from the start on (no fd needed), when first asked for: by a ring
    whose large area is there, or by the buffer protocol.  An idle
    connection then costs the address space, page tables and page-cache
    nodes of one page.  Where mappings cannot be made again (not Linux),
    ``hot`` is ignored.
    """

    def __cinit__(self, size=None, *, kind=None, Segment replace=None, Py_ssize_t hot=0):
        self.base = NULL
        self.full = NULL
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
            if replace is not None and replace.base != NULL and replace.exports == 0 \
                    and replace.full_len == mapped and replace.mapped == _hot_len(hot, mapped):
                self._map_over(replace, size, mapped)
            else:
                if replace is not None and replace.exports == 0:
                    replace.close()
                self._map(size, mapped, hot)
        except BaseException:
            close(fd)
            self.fd = -1
            raise

    cdef _map_over(self, Segment old, Py_ssize_t size, Py_ssize_t total):
        """Map our fd where ``old`` is mapped (same sizes, no users): the
        kernel drops the old mapping in the same call, cheaper than an
        munmap and an mmap.  ``old`` ends up closed."""
        cdef void *p = mmap(old.base, old.mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                            self.fd, 0)
        cdef int err = errno
        if p == MAP_FAILED:
            munmap(old.base, old.mapped)      # whatever is left of it
        if old.full != NULL and old.full != old.base:
            munmap(old.full, old.full_len)
        old.base = NULL
        old.full = NULL
        if old.fd >= 0:
            close(old.fd)
            old.fd = -1
        if p == MAP_FAILED:
            raise OSError(err, _os.strerror(err))
        self.base = <char *>p
        self.size = size
        self.mapped = old.mapped
        self.full_len = total
        self.full = self.base if self.mapped == total else NULL

    cdef _map(self, Py_ssize_t size, Py_ssize_t total, Py_ssize_t hot):
        cdef Py_ssize_t mapped = _hot_len(hot, total)
        cdef void *p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            PyErr_SetFromErrno(OSError)
        self.base = <char *>p
        self.size = size
        self.mapped = mapped
        self.full_len = total
        self.full = self.base if mapped == total else NULL

    cdef int _map_full(self) except -1:
        """Map all of the segment (once), beside the hot prefix."""
        cdef void *p
        if self.full != NULL:
            return 0
        if self.base == NULL:
            raise ValueError("segment is closed")
        p = shr_map_again(self.base, self.full_len)
        if p == MAP_FAILED:
            PyErr_SetFromErrno(OSError)
        self.full = <char *>p
        return 0

    @property
    def hot(self):
        """Bytes mapped from the start (``size`` page-rounded once all is)."""
        return self.full_len if self.full != NULL else self.mapped

    @staticmethod
    def from_fd(int fd, size=None, *, bint keep_fd=True, bint allow_unsealed=False,
                Py_ssize_t hot=0):
        """Map a segment received from a peer; takes ownership of ``fd``.

        ``size`` is what the peer announced; the file must be at least that
        large (page-rounded).  It must be a memfd sealed against shrinking,
        or a peer could truncate it under us and crash us with SIGBUS
        (``PermissionError`` otherwise).  Objects that cannot carry seals
        (``shm_open``'s, made with ``SHRIMPIO_SEGMENT=shm``) are mapped only
        with ``allow_unsealed=True``: for a peer trusted not to truncate
        them (a child of ours, a test), never for one met through the
        registry.  ``keep_fd=False`` closes the fd once mapped (the mapping
        stays).  ``hot``: as for ``Segment()``.
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
            seg._map(size, mapped, hot)
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
        self._map_full()
        PyBuffer_FillInfo(buffer, self, self.full, self.size, 0, flags)
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
        if self.full != NULL and self.full != self.base:
            munmap(self.full, self.full_len)
        self.full = NULL
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
            if self.full != NULL and self.full != self.base:
                munmap(self.full, self.full_len)
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


cdef inline double _timeout_arg(object timeout) except? -2.0:
    if timeout is None:
        return -1.0
    cdef double t = timeout
    if not t >= 0:      # negative or NaN
        raise ValueError("timeout must be None or >= 0, got %r" % (timeout,))
    if t > 1e9:         # ~31 years, or inf: for ever (keeps the ns arithmetic in range)
        return -1.0
    return t


cdef inline int _bell_kind(str bell) except -1:
    if bell == "socket":
        return SHR_BELL_SOCKET
    if bell == "eventfd":
        return SHR_BELL_EVENTFD
    raise ValueError("bell must be 'socket' or 'eventfd', got %r" % (bell,))


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
                    _ring_write_raw(notes, <char *>rec, 16, -1.0)
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
                        if _ring_avail(ring) == 0:
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
                avail = _ring_avail(ring)
                if avail < 16 and shr_load_wshut(ring.h):
                    # Importers never shut their notification ring: one
                    # that says so (garbage in the flag) is done, and must
                    # not leave the waiter's condition (ready at end of
                    # stream) true for ever: that spun a core.
                    ring._corrupt("notification ring shut by the importer")
                if avail == 0:
                    k += 1
                    continue
                if avail < 16:
                    ring._corrupt("partial notification record")
                _ring_copy_out(ring, <char *>rec, 16)
                _ring_release(ring, ring.tail + 16)
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
                _gate_hold(&self._gate)
                self._waiting = 1
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


include "_fastpath_ring.pxi"
include "_fastpath_ring_layout.pxi"
include "_fastpath_ring_areas.pxi"
include "_fastpath_ring_io.pxi"
include "_fastpath_ring_wait.pxi"
include "_fastpath_poll.pxi"
include "_fastpath_stream.pxi"
include "_fastpath_transport.pxi"
include "_fastpath_ctl.pxi"
include "_fastpath_handshake.pxi"
include "_fastpath_exit.pxi"
