# Included by _fastpath.pyx: a Ring's shared header and where its areas lie
# in the segment: the arguments checked, the header made (``create``) or
# validated (the peer's word: an impossible value is RingCorruptedError),
# and this end's view of the indices taken from it.


cdef int _ring_attach(Ring r, Segment segment, Py_ssize_t offset, object capacity, bint create,
                      Py_ssize_t small, Py_ssize_t big_offset) except -1:
    """Ring.__cinit__'s layout half: attach ``r`` to the ring at ``offset``
    of ``segment`` (with two areas: ``small`` bytes after the header, the
    large one at ``big_offset``)."""
    cdef uint64_t cap
    cdef shr_ring_hdr *hdr
    cdef uint32_t area
    cdef uint64_t base
    if segment.base == NULL:
        raise ValueError("segment is closed")
    if offset < 0 or offset % 64:
        raise ValueError("ring offset must be a non-negative multiple of 64, got %d" % offset)
    if small:
        # The header and the small area are used through the hot mapping.
        if small < <Py_ssize_t>MIN_CAPACITY or small & (small - 1) or small > 1 << 30:
            raise ValueError("small area must be a power of two in [%d, 2**30], got %d"
                             % (MIN_CAPACITY, small))
        if offset + SHR_RING_HEADER + small > min(segment.size, segment.mapped):
            raise ValueError("no room for a ring header and its small area at offset %d"
                             % offset)
        if big_offset < 0 or big_offset % 64:
            raise ValueError("big_offset must be a non-negative multiple of 64, got %d"
                             % big_offset)
    elif offset + SHR_RING_HEADER > min(segment.size, segment.mapped):
        raise ValueError("no room for a ring header at offset %d" % offset)
    if not small:
        big_offset = offset + SHR_RING_HEADER
    hdr = <shr_ring_hdr *>(segment.base + offset)
    if capacity is None:
        if create:
            raise ValueError("capacity is required to create a ring")
        if not shr_header_ok(hdr, small):
            raise RingCorruptedError("no shrimpio ring at offset %d" % offset)
        cap = shr_header_cap(hdr)
        # The header is the peer's word: an impossible capacity is corruption.
        if (cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1))
                or big_offset > segment.size
                or <uint64_t>(segment.size - big_offset) < cap):
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
    if big_offset > segment.size or <uint64_t>(segment.size - big_offset) < cap:
        raise ValueError("a ring of capacity %d does not fit in the segment at offset %d"
                         % (cap, big_offset))
    if small and <uint64_t>small >= cap:
        raise ValueError("the small area (%d) must be smaller than the capacity (%d)"
                         % (small, cap))
    if create:
        shr_init(hdr, cap, small)
    elif not shr_header_ok(hdr, small) or shr_header_cap(hdr) != cap:
        raise RingCorruptedError("no shrimpio ring of capacity %d at offset %d" % (cap, offset))
    r.seg = segment
    segment.exports += 1
    r.attached = True
    r.h = hdr
    r.small_cap = small
    r.big_cap = cap
    r.small_off = offset + SHR_RING_HEADER
    r.big_off = big_offset
    r.head = shr_load_head(hdr)
    r.tail = shr_load_tail(hdr)
    if small:
        area = shr_load_area(hdr)
        if area > 1:
            r.broken = True
            raise RingCorruptedError("ring header at offset %d names area %d" % (offset, area))
        base = shr_load_base(hdr)
        if area == 1 and r.tail - base <= cap:
            _area_set(r, 1, base)          # in the large area, from base on
        else:
            # The small area; a writer that went on in the large one
            # before we attached (a new connection's client writes at
            # once) is followed as a reader follows it (_area_adopt).
            _area_set(r, 0, shr_load_sbase(hdr))
            r.seen_head = r.head
            _area_adopt(r, r.head)
    else:
        segment._map_full()        # the data may go past a hot prefix
        r.data = segment.full + r.big_off
        r.cap = cap
    if r.head - r.tail > (r.big_cap if r.pending else r.cap):
        r.broken = True
        raise RingCorruptedError("ring indices are inconsistent (head %d, tail %d)"
                                 % (r.head, r.tail))
    r.seen_head = r.head
    r.seen_tail = r.tail
    return 0
