# Included by _fastpath.pyx: a Ring's two-area memory (header version 2).
# The producer chooses the area (small: request-response traffic in a few
# bytes that stay hot; large: streams), says so in the header, and gives the
# large area's pages back when idle; the consumer follows it (validating
# what the peer announced).  docs/data-plane.md, "Two areas".


cdef int _area_set(Ring r, uint32_t area, uint64_t base) except -1:
    """Address ``area`` (version 2) from stream position ``base`` on
    (this side's state only), mapping the large area if need be."""
    if area:
        if r.seg.full == NULL:
            try:
                r.seg._map_full()
            except OSError as exc:
                r.broken = True
                raise ConnectionResetError(exc.errno or _errno.ENOMEM,
                                           "cannot map the ring's large area: %s" % exc)
        r.data = r.seg.full + r.big_off
        r.cap = r.big_cap
    else:
        r.data = r.seg.base + r.small_off
        r.cap = r.small_cap
    r.area = area
    r.base = base
    return 0


cdef int _area_adopt(Ring r, uint64_t head) except -1:
    """Consumer, version 2, after loading a new producer index ``head``:
    follow the producer to the area it named.  It changes areas only
    (a) where we are now (the ring was empty: ``base`` is our position,
    any area), or (b) going on from the small area to the large one
    from a position ``base`` ahead of us, within the small area's
    capacity: the bytes before it are in the small area, addressed
    from ``sbase`` (``pending``: we read those first; a change at an
    empty ring we did not see may have come before, hence ``sbase``);
    and not again until we have caught up.  ``base`` may be past
    ``head`` (the producer's header stores are not ordered with its
    later index stores), and ``area`` still 0 (it is stored last)."""
    cdef uint32_t area = shr_load_area(r.h)
    cdef uint64_t base = shr_load_base(r.h)
    cdef uint64_t sbase
    if area > 1:
        r._corrupt("area %d" % area)
    if r.pending:
        if base == r.pend_base:
            return 0
    elif area == r.area and base == r.base:
        return 0
    elif base == r.tail:
        _area_set(r, area, base)
        return 0
    elif base - r.tail <= r.small_cap:
        sbase = shr_load_sbase(r.h)
        if r.tail - sbase > (<uint64_t>1) << 62:
            r._corrupt("small area from position %d with the consumer at %d" % (sbase, r.tail))
        _area_set(r, 0, sbase)
        r.pending = True
        r.pend_base = base
        return 0
    r._corrupt("area %d from position %d with the consumer at %d%s" % (
        area, base, r.tail, " (moving to %d)" % r.pend_base if r.pending else ""))


cdef int _area_chain(Ring r) except -1:
    """Producer, in the small area with bytes unread there that leave
    too little room: the next bytes go to the large area, from the
    current position on (the consumer reads the small one up to here
    first).  0 if the large area cannot be mapped."""
    if r.seg.full == NULL:
        try:
            r.seg._map_full()
        except OSError:
            return 0
    r.large_dirty = True
    r.pressed_ns = shr_coarse_ns() or 1
    shr_store_chain(r.h, r.head, r.base)
    _area_set(r, 1, r.head)
    return 1


cdef uint64_t _area_wcap(Ring r) noexcept:
    """The capacity a writable condition counts room against: a
    producer in the small area can always go on in the large one
    (by _area_chain, or _area_pick if the ring is empty)."""
    return r.big_cap if r.small_cap and not r.area else r.cap


cdef uint64_t _area_pick(Ring r, uint64_t want) except? 0xffffffffffffffff:
    """Producer, version 2, the ring being empty: put the next bytes
    (``want`` of them) at the start of the small area if they fit and
    the small area has not been too small for the traffic lately
    (``pressed_ns``: a stream of small writes), else of the large one.
    Returns the room."""
    cdef uint32_t area = 1 if want > r.small_cap else 0
    cdef int64_t now
    if not area and r.pressed_ns:
        if shr_coarse_ns() - r.pressed_ns < TRIM_INTERVAL_NS:
            area = 1
        else:
            r.pressed_ns = 0
    if area and r.seg.full == NULL:
        try:
            r.seg._map_full()
        except OSError:
            area = 0                # no address space for it: go on in the small one
    if area != r.area or r.head != r.base:
        if area:
            r.large_dirty = True
        elif r.area and r.large_dirty and r.trimmed_ns >= 0:
            # Back to small messages: the large area's pages go back
            # to the system, at most every TRIM_INTERVAL_NS.
            now = shr_coarse_ns()
            if now - r.trimmed_ns >= TRIM_INTERVAL_NS:
                _area_punch(r, now)
        shr_store_area(r.h, area, r.head)
        _area_set(r, area, r.head)
    r.room_cache = r.cap
    return r.cap


cdef bint _area_room_for(Ring r, Py_ssize_t nbytes) except -1:
    """Producer: is there room for ``nbytes`` (going on in the large
    area if the small one has too little)?"""
    cdef uint64_t room = _ring_room(r)
    if room < <uint64_t>nbytes and r.small_cap and not r.area:
        if r.head == r.seen_tail:
            room = _area_pick(r, nbytes)
        elif _area_chain(r):
            room = _ring_room(r)
    return room >= <uint64_t>nbytes


cdef void _area_punch(Ring r, int64_t now) noexcept:
    """Producer, the ring empty: give the large area's pages back (a
    hole in the segment's file: freed in both processes; the next
    write there faults in zeroed pages).  The consumer reads nothing
    there: every byte was consumed."""
    if madvise(r.seg.full + r.big_off, r.big_cap, MADV_REMOVE) != 0:
        r.trimmed_ns = -1          # not supported here: never again
    else:
        r.trimmed_ns = now
        r.large_dirty = False


cdef int _area_trim_idle(Ring r) except -1:
    """Producer, idle: if every byte written was consumed and the
    large area holds pages, go back to the small area and give them
    back.  Nothing if a writer is busy with the ring.  1 if trimmed."""
    if (not r.small_cap or not r.large_dirty or r.trimmed_ns < 0 or not r.attached
            or r.closing or r.broken or r.wshut or r.wgate.busy):
        return 0
    r.wgate.busy = 1
    try:
        if shr_load_tail(r.h) != r.head:
            return 0
        r.seen_tail = r.head
        if r.area:
            shr_store_area(r.h, 0, r.head)
            _area_set(r, 0, r.head)
            r.room_cache = r.cap
        r.pressed_ns = 0
        _area_punch(r, shr_coarse_ns())
        return 0 if r.large_dirty else 1
    finally:
        _gate_leave(&r.wgate)
