# cython: language_level=3
"""The eager frames of shrimpio.msg in C: one call writes a whole small
message into the peer's ring, one call reads a whole small message out of
ours (header checked, its buffer and body copied into new objects).
Anything else (large, several buffers, not all there yet) is left to the
Python path in _channel.py, which reads the same frames (see _frame.py)."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from shrimpio._fastpath cimport Ring

cdef extern from *:
    """
    #pragma pack(push, 1)
    typedef struct { uint8_t kind; uint8_t ptype; uint16_t nbufs; uint32_t body_len;
                     int64_t tag; uint64_t mid; uint64_t total; uint32_t pid; uint32_t pad; } msg_hdr;
    typedef struct { uint64_t len; uint64_t addr; } msg_desc;
    #pragma pack(pop)
    """
    ctypedef struct msg_hdr:
        uint8_t kind
        uint8_t ptype
        uint16_t nbufs
        uint32_t body_len
        int64_t tag
        uint64_t mid
        uint64_t total
        uint32_t pid
        uint32_t pad
    ctypedef struct msg_desc:
        uint64_t len
        uint64_t addr

DEF HLEN = 40
DEF DLEN = 16
DEF K_MSG = 2
DEF K_RTR = 8
DEF RTR_BLEN = 16
DEF RNDV_MIN = 64 * 1024       # (_frame.RNDV_MIN)
DEF P_PICKLE = 0
DEF P_BYTES = 1
DEF P_MPBYTES = 4


# Bytes this process copied as a receiver / sender on the C path (see _cma.stats).
cdef unsigned long long fast_received = 0
cdef unsigned long long fast_sent = 0


def counters():
    """(bytes copied as receiver, as sender) by the C path."""
    return fast_received, fast_sent


cdef inline void _copy_at(Ring rx, uint64_t off, char *dst, uint64_t n) noexcept:
    """Copy n readable bytes starting ``off`` bytes after the consumer
    position, in the ring's current area (stream position p is at
    ``(p - base) & (cap - 1)`` of it; _avail() has adopted the area)."""
    cdef uint64_t mask = rx.cap - 1
    cdef uint64_t pos = (rx.tail - rx.base + off) & mask
    cdef uint64_t first = rx.cap - pos
    if n <= first:
        memcpy(dst, rx.data + pos, n)
    else:
        memcpy(dst, rx.data + pos, first)
        memcpy(dst + first, rx.data, n - first)


def write_msg(Ring tx, int ptype, int64_t tag, uint32_t pid, body, buf, double timeout=-1.0):
    """Write an eager MSG frame with no or one buffer; returns its size."""
    cdef char head[HLEN + DLEN]
    cdef msg_hdr *h = <msg_hdr *>head
    cdef msg_desc *d = <msg_desc *>(head + HLEN)
    cdef Py_buffer parts[3]
    cdef Py_buffer bb, bd
    cdef int k = 1, got_b = 0, got_d = 0
    cdef Py_ssize_t total
    memset(head, 0, HLEN + DLEN)
    try:
        PyObject_GetBuffer(body, &bb, PyBUF_SIMPLE)
        got_b = 1
        h.kind = K_MSG
        h.ptype = ptype
        h.body_len = <uint32_t>bb.len
        h.tag = tag
        h.pid = pid
        if buf is not None:
            PyObject_GetBuffer(buf, &bd, PyBUF_SIMPLE)
            got_d = 1
            h.nbufs = 1
            h.total = bd.len
            d.len = bd.len
        parts[0].buf = head
        parts[0].len = HLEN + (DLEN if got_d else 0)
        if got_d:
            parts[1] = bd
            k = 2
        parts[k] = bb
        k += 1
        total = parts[0].len + bb.len + (bd.len if got_d else 0)
        n = tx._write_bufs(parts, k, total, timeout, True)
        global fast_sent
        fast_sent += h.total
        return n
    finally:
        if got_b:
            PyBuffer_Release(&bb)
        if got_d:
            PyBuffer_Release(&bd)


def read_msg(Ring rx, Py_ssize_t limit):
    """The next frame if it is an eager MSG (no or one buffer, at most
    ``limit`` bytes) and all of it is in the ring: (ptype, tag, body,
    buffer or None, pid), consumed.  None otherwise (nothing consumed)."""
    cdef char head[HLEN + DLEN]
    cdef msg_hdr *h = <msg_hdr *>head
    cdef msg_desc *d = <msg_desc *>(head + HLEN)
    cdef uint64_t avail = rx._avail()
    cdef uint64_t need, off
    cdef object body, obj = None
    if avail < HLEN:
        return None
    _copy_at(rx, 0, head, HLEN)
    if h.kind != K_MSG or h.nbufs > 1 or h.ptype > P_MPBYTES or h.tag < 0:
        return None
    if h.ptype != P_PICKLE and h.nbufs != 1:
        return None
    if h.total > <uint64_t>limit or <uint64_t>h.body_len > <uint64_t>limit:
        return None
    # (64-bit sums: body_len is 32-bit, and a 32-bit sum would wrap)
    need = <uint64_t>HLEN + <uint64_t>DLEN * <uint64_t>h.nbufs + <uint64_t>h.body_len + h.total
    if need > <uint64_t>limit or need > avail:
        return None
    off = HLEN
    if h.nbufs:
        _copy_at(rx, off, head + HLEN, DLEN)
        if d.len != h.total:
            return None          # the Python path reports it
        off += DLEN
        if h.ptype == P_BYTES or h.ptype == P_MPBYTES:
            obj = PyBytes_FromStringAndSize(NULL, h.total)
            _copy_at(rx, off, PyBytes_AS_STRING(obj), h.total)
        else:
            obj = PyByteArray_FromStringAndSize(NULL, h.total)
            _copy_at(rx, off, PyByteArray_AS_STRING(obj), h.total)
        off += h.total
    body = PyBytes_FromStringAndSize(NULL, h.body_len)
    _copy_at(rx, off, PyBytes_AS_STRING(body), h.body_len)
    rx._release(rx.tail + need)
    global fast_received
    fast_received += h.total
    return (h.ptype, h.tag, body, obj, h.pid, need)


def read_rtr(Ring rx):
    """The next frame if it is a well-formed ready-to-receive (RTR, see
    _offer.py), consumed: (id, tag, any tag, address, length, pid, seen,
    its size); None otherwise (nothing consumed; the Python path reads it,
    and says what is wrong with it)."""
    cdef char head[HLEN + DLEN + RTR_BLEN]
    cdef msg_hdr *h = <msg_hdr *>head
    cdef msg_desc *d = <msg_desc *>(head + HLEN)
    cdef uint64_t *body = <uint64_t *>(head + HLEN + DLEN)
    cdef uint64_t need = HLEN + DLEN + RTR_BLEN
    if rx._avail() < need:
        return None
    _copy_at(rx, 0, head, need)
    if (h.kind != K_RTR or h.nbufs != 1 or h.body_len != RTR_BLEN or h.total < RNDV_MIN
            or h.tag < 0 or d.len != h.total or d.addr == 0 or h.ptype > P_MPBYTES):
        return None
    rx._release(rx.tail + need)
    return (h.mid, h.tag, (<uint8_t *>(head + HLEN + DLEN + 8))[0] != 0, d.addr, d.len, h.pid,
            body[0], need)


def wait_spinning(Ring rx, timeout, double spin):
    """``rx.wait_readable(timeout)``, spinning ``spin`` seconds before it
    sleeps, for a wait whose length the channel knows better than the
    ring's adaptive budget (a rendezvous: the answer to an announce comes
    within microseconds, the end of a large copy at a time it can
    estimate); the ring's budget is left as it was, so that such waits do
    not teach it about the channel's other waits."""
    cdef int64_t saved = rx.spin_ns
    rx.spin_ns = <int64_t>(spin * 1e9) if spin > 0 else 0
    try:
        return rx.wait_readable(timeout)
    finally:
        rx.spin_ns = saved


# -- the short cuts of Channel.send and Channel.recv ----------------------------------------

from pickle import dumps as _dumps, loads as _loads
import os as _os

cdef int _pid = _os.getpid()


def _after_fork():
    global _pid
    _pid = _os.getpid()


_os.register_at_fork(after_in_child=_after_fork)

cdef object _tuple_new = tuple.__new__
DEF OOB_MIN = 1024
DEF MAX_BUFS = 1024


cdef object _oob_raws(list bufs):
    """The flat views of the PickleBuffers a pickle put out of band, if
    all of them go out of band by encode()'s rules (contiguous, 1 KiB or
    more, at most MAX_BUFS): then that pickle is the message's body."""
    cdef list raws = []
    if len(bufs) > MAX_BUFS:
        return None
    for pb in bufs:
        try:
            raw = pb.raw()
        except BufferError:
            return None
        if raw.nbytes < OOB_MIN:
            return None
        raws.append(raw)
    return raws
DEF FAST_MAX = 256 * 1024


cdef class FastPath:
    """A shared-memory channel's short cuts, bound as its ``send`` and
    ``recv`` (see Channel._install_fast).  They handle a small message
    whole in C when nothing else is going on (``ok``: the peer said hello,
    the channel is open and healthy; no receive posted, nothing queued)
    and hand everything else to the channel's general methods."""

    cdef public bint ok          # receiving: the peer said hello, the channel is healthy
    cdef public bint ok_tx       # sending: the channel is open and healthy
    cdef public bint mp          # multiprocessing semantics: recv() gives the object alone
    cdef public bint readable
    cdef public bint writable
    cdef public unsigned long long n_in     # messages read here (the channel adds its own)
    cdef public unsigned long long n_out    # messages written here
    cdef public bint offered                # the peer's offers are held: sends go the general way
    cdef public object send_pickled         # (body, raw buffers, tag): a pickle made here
    cdef public object on_rtr               # (read_rtr's tuple): an offer read here
    cdef Ring tx
    cdef Ring rx
    cdef object stream
    cdef object chan
    cdef object lock
    cdef list pending
    cdef list queue
    cdef object slow_send
    cdef object slow_recv
    cdef object on_fast
    cdef object message
    cdef object any_
    cdef object decode
    cdef object mp_loads

    def __init__(self, chan, Ring tx, Ring rx, stream, hub, slow_send, slow_recv, on_fast,
                 message, any_, decode, mp_loads, bint mp):
        self.chan = chan
        self.tx = tx
        self.rx = rx
        self.stream = stream
        self.lock = hub.lock
        self.pending = hub.pending
        self.queue = hub.queue
        self.slow_send = slow_send
        self.slow_recv = slow_recv
        self.on_fast = on_fast
        self.message = message
        self.any_ = any_
        self.decode = decode
        self.mp_loads = mp_loads
        self.mp = mp
        self.readable = True
        self.writable = True
        self.ok = False
        self.ok_tx = True
        self.n_in = self.n_out = 0
        self.offered = False
        self.send_pickled = None
        self.on_rtr = None

    def send(self, obj, tag=0):
        """Channel.send (see there)."""
        cdef list bufs
        cdef Py_ssize_t n
        if self.ok_tx and self.writable and type(tag) is int and 0 <= tag <= 0x7fffffffffffffff:
            if type(obj) is bytes:
                if len(<bytes>obj) < RNDV_MIN and not self.offered:
                    self.n_out += 1          # (counted first: see _offer.py)
                    n = write_msg(self.tx, P_BYTES, tag, _pid, b"", obj)
                    self.stream.bytes_sent += n
                    return None
            elif type(obj) is not bytearray and type(obj) is not memoryview:
                bufs = []
                body = _dumps(obj, 5, buffer_callback=bufs.append)
                if not bufs and len(<bytes>body) < RNDV_MIN and not self.offered:
                    self.n_out += 1
                    n = write_msg(self.tx, P_PICKLE, tag, _pid, body, None)
                    self.stream.bytes_sent += n
                    return None
                if self.send_pickled is not None:
                    raws = _oob_raws(bufs) if bufs else []
                    if raws is not None:         # (else pickled again, some in-band)
                        return self.send_pickled(body, raws, tag)
        return self.slow_send(obj, tag)

    cdef bint _offer_read(self) except -1:
        """An offer (RTR) read, if one is next in the ring (the lock is held)."""
        if self.on_rtr is None:
            return False
        o = read_rtr(self.rx)
        if o is None:
            return False
        self.stream.bytes_received += o[7]
        self.on_rtr(o)
        return True

    def try_recv(self, tag):
        """A small message matching ``tag`` (any if ANY) as a Message, read
        without waiting (the awaited receive's short cut): 0 if the ring
        holds nothing and the short cut still applies, None if the general
        path must say (a frame it handles, something posted or queued, the
        end of the channel)."""
        cdef object r, obj
        cdef int ptype
        if not (self.ok and self.readable) or self.pending or self.queue:
            return None
        self.lock.acquire()
        try:
            if not self.ok or self.pending or self.queue:
                return None
            r = read_msg(self.rx, FAST_MAX)
            while r is None and self._offer_read():
                r = read_msg(self.rx, FAST_MAX)
            if r is None:
                return None if self.rx._avail() else 0
            self.n_in += 1
            self.stream.bytes_received += r[5]
            if tag is not self.any_ and r[1] != tag:
                self.on_fast(r)        # queued: another tag
                return None
            ptype = r[0]
            if ptype == P_PICKLE and r[3] is None:
                obj = _loads(r[2])
            elif ptype == P_BYTES:
                obj = r[3]
            else:
                obj = self.decode(ptype, r[2], [] if r[3] is None else [r[3]])
            return _tuple_new(self.message, (obj, r[1], self.chan))
        finally:
            self.lock.release()

    def recv(self, tag=None, source=None, timeout=None):
        """Channel.recv, or Connection.recv (``mp``); see there."""
        cdef object r, obj
        cdef int ptype
        if tag is None:
            tag = self.any_
        if source is None:
            source = self.any_
        if self.mp:
            if timeout is not None or tag is not self.any_:
                return self.slow_recv()
        elif timeout is not None or (source is not self.any_ and source is not self.chan):
            return self.slow_recv(tag, source, timeout=timeout)
        while self.ok and self.readable and not self.pending and not self.queue:
            self.lock.acquire()
            try:
                if not self.ok or self.pending or self.queue:
                    break
                r = read_msg(self.rx, FAST_MAX)
                if r is not None:
                    self.n_in += 1
                    self.stream.bytes_received += r[5]
                    if tag is not self.any_ and r[1] != tag:
                        self.on_fast(r)        # queued: another tag
                        break
                    ptype = r[0]
                    if ptype == P_PICKLE and r[3] is None:
                        obj = _loads(r[2])
                    elif ptype == P_BYTES:
                        obj = r[3]
                    elif self.mp:
                        obj = self.mp_loads(ptype, r[2], [] if r[3] is None else [r[3]])
                    else:
                        obj = self.decode(ptype, r[2], [] if r[3] is None else [r[3]])
                    if self.mp:
                        return obj
                    return _tuple_new(self.message, (obj, r[1], self.chan))
                if self.rx._avail():
                    if self._offer_read():
                        continue
                    break                  # a frame for the general path
            finally:
                self.lock.release()
            self.rx.wait_readable(None)
            if not self.rx._avail():
                break                      # the end of the channel: the general path says it
        if self.mp:
            return self.slow_recv()
        return self.slow_recv(tag, source, timeout=timeout)


# -- buffer addresses and cross-memory copies (used by _cma.py) ----------------------------

from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t process_vm_readv(int pid, const iovec *local, unsigned long liovcnt,
                             const iovec *remote, unsigned long riovcnt, unsigned long flags)
    ssize_t process_vm_writev(int pid, const iovec *local, unsigned long liovcnt,
                              const iovec *remote, unsigned long riovcnt, unsigned long flags)

DEF IOV_MAX = 1024


cdef class BufferRef:
    """A held buffer export of ``obj`` (contiguous; writable if asked):
    its address and length stay valid until ``release()``."""

    cdef Py_buffer view
    cdef bint held
    cdef readonly size_t addr
    cdef readonly Py_ssize_t nbytes

    def __cinit__(self, obj, bint writable=False):
        # PyBUF_SIMPLE and PyBUF_WRITABLE both refuse non-contiguous buffers.
        PyObject_GetBuffer(obj, &self.view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        self.held = True
        self.addr = <size_t>self.view.buf
        self.nbytes = self.view.len

    def release(self):
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)

    def __dealloc__(self):
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)


cdef iovec *_iovs(list ranges, Py_ssize_t *count, uint64_t *total) except NULL:
    cdef Py_ssize_t n = len(ranges), i, k = 0
    cdef iovec *v = <iovec *>malloc(max(n, 1) * sizeof(iovec))
    cdef uint64_t length
    if v == NULL:
        raise MemoryError()
    total[0] = 0
    try:
        for i in range(n):
            addr, length = ranges[i]
            if length:
                v[k].iov_base = <void *><size_t>addr
                v[k].iov_len = length
                total[0] += length
                k += 1
    except BaseException:
        free(v)
        raise
    count[0] = k
    return v


cdef void _advance(iovec **v, Py_ssize_t *n, size_t done) noexcept nogil:
    while done and n[0]:
        if v[0][0].iov_len <= done:
            done -= v[0][0].iov_len
            v[0] += 1
            n[0] -= 1
        else:
            v[0][0].iov_base = <char *>v[0][0].iov_base + done
            v[0][0].iov_len -= done
            done = 0


def vm_copy(bint write, int pid, list local, list remote):
    """Copy the byte ranges ``local`` <-> ``remote`` (lists of (address,
    length), the same total) into (``write``) or out of process ``pid``
    with process_vm_writev/readv, resuming after partial transfers; the
    GIL is released.  The bytes moved; ``OSError`` as the call fails."""
    cdef Py_ssize_t nl, nr, cl, cr
    cdef uint64_t tl, tr, done = 0
    cdef iovec *lv = _iovs(local, &nl, &tl)
    cdef iovec *rv
    cdef iovec *lp
    cdef iovec *rp
    cdef ssize_t got
    cdef int err = 0
    try:
        rv = _iovs(remote, &nr, &tr)
    except BaseException:
        free(lv)
        raise
    try:
        if tl != tr:
            raise ValueError("local and remote ranges differ in size")
        lp, rp = lv, rv
        with nogil:
            while nl and nr:
                cl = min(nl, IOV_MAX)
                cr = min(nr, IOV_MAX)
                if write:
                    got = process_vm_writev(pid, lp, cl, rp, cr, 0)
                else:
                    got = process_vm_readv(pid, lp, cl, rp, cr, 0)
                if got < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                if got == 0:
                    err = -1
                    break
                done += got
                _advance(&lp, &nl, got)
                _advance(&rp, &nr, got)
        if err == -1:
            raise OSError(14, f"cross-memory copy with pid {pid} moved nothing")    # EFAULT
        if err:
            raise OSError(err, f"cross-memory copy with pid {pid}: {_os.strerror(err)}")
        return done
    finally:
        free(lv)
        free(rv)
