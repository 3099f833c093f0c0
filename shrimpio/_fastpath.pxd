# Declarations of the data plane, for other Cython modules (the asyncio
# transport cimports these to reach rings without Python-level calls).

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint32_t, uint64_t, int64_t


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
    cdef char *base                 # the first `mapped` bytes (all, or a prefix: `hot`)
    cdef readonly Py_ssize_t size   # usable bytes (the mapping is page-rounded)
    cdef Py_ssize_t mapped
    cdef char *full                 # all of it (base itself when all is mapped; NULL: not yet)
    cdef Py_ssize_t full_len
    cdef int fd
    cdef int exports
    cdef readonly str kind

    cdef _map(self, Py_ssize_t size, Py_ssize_t total, Py_ssize_t hot)
    cdef _map_over(self, Segment old, Py_ssize_t size, Py_ssize_t total)
    cdef int _map_full(self) except -1


# Rings and streams hold no reference that can lead back to them (a ring:
# its segment, its sibling ring, the stat table's memoryview; a stream: its
# two rings), so they cannot be in a reference cycle: the garbage collector
# need not walk them (a connection pair holds four rings and two streams),
# hence @cython.no_gc on their definitions.
cdef class Ring:
    cdef Segment seg            # pinned (its exports count) while attached
    cdef bint attached
    cdef shr_ring_hdr *h
    cdef char *data             # the current area (version 2: small or large)
    cdef uint64_t cap           # its capacity
    cdef uint64_t base          # stream position at its first byte (see _fastpath_core.h)
    cdef uint32_t area          # 0 small, 1 large (version 1: always 0)
    cdef uint64_t small_cap     # version 2: the small area's capacity (0: version 1)
    cdef uint64_t big_cap       # the large area's (version 1: cap)
    cdef Py_ssize_t small_off   # offsets in the segment of the two areas
    cdef Py_ssize_t big_off
    cdef int64_t trimmed_ns     # when the large area's pages were last given back (-1: cannot)
    cdef bint large_dirty       # the large area was written since they were
    cdef int64_t pressed_ns     # when the small area last could not take what came (0: never)
    cdef bint pending           # consumer: the producer went on in the large area from
    cdef uint64_t pend_base     #   pend_base while the small one still held bytes before it
    cdef Ring tx_sibling        # a reader's wait that sleeps a slice offers this ring a trim
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
    cdef uint64_t probe_head    # producer: head, and the consumer's index, at the last look
    cdef uint64_t probe_tail    #   for a reader that died (_ring_probe_reader)
    cdef int _wait_spun
    cdef long _nivcsw           # the waiting thread's involuntary switches after its last long wait
    cdef bint _nivcsw_known

    cdef int _check_open(self) except -1
    cdef int _corrupt(self, str what) except -1
    # The ring's operations are functions of the module (_fastpath_ring_*.pxi);
    # these three are for modules that cimport Ring (shrimpio.msg).
    cdef uint64_t _avail(self) except? 0xffffffffffffffff
    cdef int _release(self, uint64_t new_tail) except -1
    cdef Py_ssize_t _write_bufs(self, Py_buffer *bufs, Py_ssize_t nbufs, Py_ssize_t total,
                                double timeout, bint all_) except -1


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
