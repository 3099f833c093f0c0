# Declarations of the data plane, for other Cython modules (the asyncio
# transport cimports these to reach rings without Python-level calls).

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint64_t, int64_t, uint32_t


cdef extern from "_fastpath_core.h":
    ctypedef struct shr_ring_hdr:
        pass


# Exclusion per role of a ring end (and per exported buffer).  The GIL makes
# code that keeps it atomic, so entering costs one flag test; only a thread
# that is about to release the GIL inside an operation (to wait or to copy a
# lot) takes the lock, and later arrivals queue on it.
ctypedef struct gate_t:
    PyThread_type_lock lock
    int busy        # a thread is inside
    int held        # ... and holds `lock`


cdef class Segment:
    cdef char *base
    cdef readonly Py_ssize_t size   # usable bytes (the mapping is page-rounded)
    cdef Py_ssize_t mapped
    cdef int fd
    cdef int exports
    cdef readonly str kind

    cdef _map(self, Py_ssize_t size, Py_ssize_t mapped)
    cdef _map_over(self, Segment old, Py_ssize_t size)


cdef class Ring:
    cdef Py_buffer view
    cdef bint attached
    cdef shr_ring_hdr *h
    cdef char *data
    cdef uint64_t cap
    cdef uint64_t head          # producer index, authoritative on the writing side
    cdef uint64_t tail          # consumer index, authoritative on the reading side
    cdef uint64_t seen_head     # last validated value of the peer's producer index
    cdef uint64_t seen_tail     # last validated value of the peer's consumer index
    cdef uint64_t room_cache    # room known to exist without re-reading the consumer's index
    cdef int data_bell
    cdef int space_bell
    cdef int bell_kind
    cdef int64_t spin_max_ns
    cdef int64_t spin_ns        # adaptive budget, <= spin_max_ns
    cdef readonly bint broken
    cdef bint eof
    cdef bint wshut
    cdef bint closing
    cdef gate_t rgate
    cdef gate_t wgate
    # `shrimpio stat`: this side's index and "blocked in a wait" mirrored
    # into the process's stat table (shrimpio/_stat.py); by default into
    # the two fields below.
    cdef uint64_t *stat_idx
    cdef uint32_t *stat_blocked
    cdef uint64_t stat_idx_none
    cdef uint32_t stat_blocked_none
    cdef object stat_owner
    cdef int _wait_spun

    cdef int _check_open(self) except -1
    cdef int _corrupt(self, str what) except -1
    cdef uint64_t _avail(self) except? 0xffffffffffffffff
    cdef uint64_t _room(self) except? 0xffffffffffffffff
    cdef int _publish(self, uint64_t new_head) except -1
    cdef int _release(self, uint64_t new_tail) except -1
    cdef int _wait(self, int writable, uint64_t need, double timeout) except -2
    cdef int _wait_until(self, void *cond, int writable, int64_t spin, int64_t limit) except -2
    cdef int _arm_reader(self) except -1
    cdef bint _peer_gone_now(self, int bell) noexcept
    cdef Py_ssize_t _copy_in(self, uint64_t at, const char *src, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t _copy_out(self, char *dst, Py_ssize_t n) noexcept nogil
    cdef int _writable_check(self) except -1
    cdef Py_ssize_t _write_bufs(self, Py_buffer *bufs, Py_ssize_t nbufs, Py_ssize_t total,
                                double timeout, bint all_) except -1
    cdef int _write_raw(self, const char *src, Py_ssize_t n, double timeout) except -1
    cdef Py_ssize_t _read(self, char *dst, Py_ssize_t n, double timeout) except -1
    cdef int _read_big(self, char *dst, uint64_t n) except -1


cdef class Proxy:
    cdef Segment _seg
    cdef Ring _notes
    cdef int _ctrl_fd
    cdef int64_t _last_check
    cdef bint _gone
    cdef readonly Py_ssize_t size
    cdef readonly bint readable

    cdef inline int _usable(self) except -1


cdef class Export:
    cdef readonly Segment segment
    cdef list _links            # [ring, closer]: closer() releases that importer
    cdef int _local_bell        # eventfd: wakes a waiter (close, unblock, new importer)
    cdef int _blocked
    cdef int _waiting           # a thread sleeps in _next (unblock must wake it)
    cdef int _exports
    cdef bint _closed
    cdef bint _has_handler
    cdef Py_ssize_t _rr
    cdef int64_t _spin_ns       # adapted spin of the next wait (-1: the rings' budget)
    cdef gate_t _gate
    cdef readonly Py_ssize_t size

    cdef _poke(self)
    cdef _drop(self, Py_ssize_t i)
    cdef object _take(self)
    cdef object _next(self, double timeout)
