# Included by _fastpath.pyx: a Ring's data path: the validated indices
# (avail, room), publish/release with their doorbell rings, the copies in
# and out, and the write (gather) and read loops the stream socket, the
# asyncio transport and shrimpio.msg call.


cdef uint64_t _ring_avail(Ring r) except? 0xffffffffffffffff:
    """Bytes readable (consumer side), validating the producer's index."""
    cdef uint64_t head = shr_load_head(r.h)
    cdef uint64_t limit
    if r.small_cap:
        if r.pending and r.tail == r.pend_base:
            r.pending = False            # caught up: on in the large area
            _area_set(r, 1, r.pend_base)
        if head != r.seen_head:
            _area_adopt(r, head)
    limit = r.big_cap if r.pending else r.cap
    if head - r.tail > limit or head - r.seen_head > limit:
        r._corrupt("producer index %d with consumer at %d" % (head, r.tail))
    r.seen_head = head
    if r.pending:                           # the rest of the small area first
        return min(head, r.pend_base) - r.tail
    return head - r.tail


cdef uint64_t _ring_room(Ring r) except? 0xffffffffffffffff:
    """Bytes writable (producer side), validating the consumer's index."""
    cdef uint64_t tail = shr_load_tail(r.h)
    if r.head - tail > r.cap or tail - r.seen_tail > r.cap:
        r._corrupt("consumer index %d with producer at %d" % (tail, r.head))
    r.seen_tail = tail
    r.room_cache = r.cap - (r.head - tail)
    return r.room_cache


cdef int _ring_publish(Ring r, uint64_t new_head) except -1:
    r.room_cache -= new_head - r.head
    r.head = new_head
    shr_publish_head(r.h, new_head)
    r.stat_idx[0] = new_head
    shr_wake_reader(r.h, r.data_bell, r.bell_kind)
    return 0


cdef int _ring_release(Ring r, uint64_t new_tail) except -1:
    r.tail = new_tail
    shr_publish_tail(r.h, new_tail)
    r.stat_idx[0] = new_tail
    shr_wake_writer(r.h, r.space_bell, r.bell_kind)
    return 0


cdef Py_ssize_t _ring_copy_in(Ring r, uint64_t at, const char *src, Py_ssize_t n) noexcept nogil:
    """Copy n bytes (n <= room) to stream position ``at``; does not publish."""
    cdef uint64_t mask = r.cap - 1
    cdef uint64_t pos = (at - r.base) & mask
    cdef uint64_t first = r.cap - pos
    if <uint64_t>n <= first:
        memcpy(r.data + pos, src, n)
    else:
        memcpy(r.data + pos, src, first)
        memcpy(r.data, src + first, n - first)
    return n


cdef Py_ssize_t _ring_copy_out(Ring r, char *dst, Py_ssize_t n) noexcept nogil:
    """Copy n bytes (n <= avail) from the consumer position; does not release."""
    cdef uint64_t mask = r.cap - 1
    cdef uint64_t pos = (r.tail - r.base) & mask
    cdef uint64_t first = r.cap - pos
    if <uint64_t>n <= first:
        memcpy(dst, r.data + pos, n)
    else:
        memcpy(dst, r.data + pos, first)
        memcpy(dst + first, r.data, n - first)
    return n


cdef int _ring_writable_check(Ring r) except -1:
    r._check_open()
    if r.wshut:
        raise BrokenPipeError(_errno.EPIPE, "ring write side is shut")
    if shr_load_rshut(r.h):
        raise BrokenPipeError(_errno.EPIPE, "the reading side is closed")
    return 0


cdef int _ring_probe_reader(Ring r) except -1:
    """A reader that was killed leaves its ring mapped here and says
    nothing: its bytes would go on into the ring until it is full (4 MiB)
    before a write heard of it.  TCP hears at once (the dead peer's kernel
    answers the first segment with a reset).  So every PROBE_BYTES written,
    if the reader took nothing since the last look and bytes wait, one
    poll(0) asks the doorbell; a live reader that keeps up costs nothing
    (its index moved), a slow one a poll per PROBE_BYTES."""
    cdef uint64_t t = shr_load_tail(r.h)      # compared only: not trusted
    r.probe_head = r.head
    if t == r.probe_tail and t != r.head and _ring_peer_gone(r, r.space_bell):
        raise BrokenPipeError(_errno.EPIPE, "the reading side is gone")
    r.probe_tail = t
    return 0


cdef Py_ssize_t _ring_write_bufs(Ring r, Py_buffer *bufs, Py_ssize_t nbufs, Py_ssize_t total,
                            double timeout, bint all_) except -1:
    """Gather-write; returns bytes written (all of them if all_)."""
    cdef Py_ssize_t done = 0, i = 0, off = 0, chunk, room, n, m
    cdef uint64_t at
    cdef int64_t limit = 0      # computed on the first wait only
    cdef double left
    cdef int rc
    _gate_enter(&r.wgate, timeout)
    try:
        _ring_writable_check(r)
        if r.head - r.probe_head >= PROBE_BYTES:
            _ring_probe_reader(r)
        while True:
            # Re-read the consumer's index only when the room we already
            # know of is not enough: saves a cache-line transfer per write.
            # With two areas, also in the large one when the bytes would
            # fit the small one (unless the small one is pressed: a
            # stream), or go past the large one's first HOT_WINDOW
            # bytes: if the ring is empty, they go to the start of the
            # small one, or of the large one (fewer pages in use).
            room = r.room_cache
            if <Py_ssize_t>room < total - done or r.area and (
                    <uint64_t>(total - done) <= r.small_cap and not r.pressed_ns
                    or r.head - r.base + <uint64_t>(total - done) > HOT_WINDOW):
                room = _ring_room(r)
                if r.small_cap and r.head == r.seen_tail:
                    room = _area_pick(r, total - done)
                elif (r.small_cap and not r.area and <Py_ssize_t>room < total - done
                        and _area_chain(r)):
                    # Bytes come faster than the small area takes them:
                    # on in the large one (and from the start of the
                    # large one while they keep coming).
                    room = _ring_room(r)
            if room > 0 and done < total:
                n = min(room, total - done, PIPE_CHUNK)
                chunk = n
                at = r.head
                while chunk > 0:
                    m = min(chunk, bufs[i].len - off)
                    if m >= NOGIL_COPY:
                        _gate_hold(&r.wgate)
                        with nogil:
                            _ring_copy_in(r, at, <char *>bufs[i].buf + off, m)
                    else:
                        _ring_copy_in(r, at, <char *>bufs[i].buf + off, m)
                    at += m
                    chunk -= m
                    off += m
                    if off == bufs[i].len:
                        i += 1
                        off = 0
                _ring_publish(r, at)
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
                if _ring_peer_gone(r, r.space_bell):
                    raise BrokenPipeError(_errno.EPIPE, "the reading side is gone")
                # all_: a silent short write would lose data; say how much went in.
                raise BlockingIOError(_errno.EAGAIN, "ring is full", done)
            if limit == 0:
                limit = -1 if timeout < 0 else shr_now_ns() + <int64_t>(timeout * 1e9)
            left = -1.0 if limit < 0 else max(0.0, (limit - shr_now_ns()) / 1e9)
            rc = _ring_wait(r, 1, 1, left)
            if rc == 0:
                raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for ring space")
            if rc == 2:
                raise BrokenPipeError(_errno.EPIPE, "the reading side is gone")
            _ring_writable_check(r)
    finally:
        _gate_leave(&r.wgate)


cdef int _ring_write_raw(Ring r, const char *src, Py_ssize_t n, double timeout) except -1:
    """Write all of a C buffer (used for notification records)."""
    cdef Py_buffer b
    b.buf = <void *>src
    b.len = n
    _ring_write_bufs(r, &b, 1, n, timeout, True)
    return 0


cdef uint64_t _ring_read_big(Ring r, char *dst, uint64_t n, uint64_t avail) except? 0xffffffffffffffff:
    """Copy out up to n bytes, ``avail`` (<= n) of them readable now,
    releasing them piece by piece: the writer refills the ring while we
    copy (one copy's time, not two).  Bytes that come meanwhile are taken
    too, up to n, without waiting (as a TCP recv takes what its queue got
    while it copied): a big posted buffer fills in one call, where each
    return would cost the caller a Python round of recv_into.  Returns the
    count."""
    cdef uint64_t piece, done = 0
    _gate_hold(&r.rgate)
    while True:
        piece = min(avail, <uint64_t>PIPE_CHUNK)
        with nogil:
            _ring_copy_out(r, dst + done, piece)
        _ring_release(r, r.tail + piece)
        done += piece
        avail -= piece
        if done == n:
            return done
        if not avail:
            try:
                avail = _ring_avail(r)
            except ConnectionResetError:
                # The peer broke the ring (marked broken: the next call
                # raises); the bytes copied are the caller's.
                return done
            if not avail:
                return done
            avail = min(avail, n - done)


cdef Py_ssize_t _ring_read(Ring r, char *dst, Py_ssize_t n, double timeout) except -1:
    cdef uint64_t avail
    cdef int64_t limit = 0      # computed on the first wait only
    cdef double left
    cdef int rc
    _gate_enter(&r.rgate, timeout)
    try:
        r._check_open()
        while True:
            avail = _ring_avail(r)
            if avail:
                if avail > <uint64_t>n:
                    avail = n
                if <Py_ssize_t>avail >= NOGIL_COPY:
                    return _ring_read_big(r, dst, n, avail)
                else:
                    _ring_copy_out(r, dst, avail)
                    _ring_release(r, r.tail + avail)
                return avail
            if n == 0 or r.eof:
                return 0
            if shr_load_wshut(r.h):
                if _ring_avail(r) == 0:
                    r.eof = True
                    return 0
                continue
            if timeout == 0:
                # Empty, and no waiting: armed for a poller of the
                # program's own (see _ring_arm_reader); as TCP, a writer that
                # died is the end (else a non-blocking reader would see
                # EAGAIN for ever).  Data or a shut that came before its
                # death first.
                rc = _ring_arm_reader(r)
                if rc == 1:
                    continue
                if rc == 2:
                    if _ring_avail(r) or shr_load_wshut(r.h):
                        continue
                    raise ConnectionResetError(_errno.ECONNRESET, "the writing side is gone")
                raise BlockingIOError(_errno.EAGAIN, "ring is empty")
            if limit == 0:
                limit = -1 if timeout < 0 else shr_now_ns() + <int64_t>(timeout * 1e9)
            left = -1.0 if limit < 0 else max(0.0, (limit - shr_now_ns()) / 1e9)
            rc = _ring_wait(r, 0, 1, left)
            if rc == 0:
                raise TimeoutError(_errno.ETIMEDOUT, "timed out waiting for data")
            if rc == 2:
                if _ring_avail(r):
                    continue
                if shr_load_wshut(r.h):
                    continue
                raise ConnectionResetError(_errno.ECONNRESET, "the writing side is gone")
            r._check_open()
    finally:
        _gate_leave(&r.rgate)
