# Included by _fastpath.pyx: the per-turn work of the asyncio transport
# (shrimpio/transport/_transport.py), in C.
#
# Theory of operation
# -------------------
# Each event loop has one ``LoopPoller``.  A transport's ``TransportCore``
# joins the poller's *hot* list when it may have data (it just started
# reading, its doorbell rang, or it moved data lately); so does a
# ``RingWatch``, the same for a ring read by fd callbacks (the loop's
# add_reader on a shared-memory fd, shrimpio/transport/_watch.py).  While
# the list is not empty, the poller's ``run`` is a ``call_soon`` callback:
# one turn reads every hot ring (no system call: a look at the producer
# index), hands the bytes on, and schedules itself again.  The loop stays hot
# (uvloop's epoll_wait(0) between turns) for as long as the busy-poll budget
# runs from the last byte any ring of the loop moved: a server that just
# answered one client will hear from the next soon.  When the budget is
# spent, a ring is *armed* (reader-sleeping flag, fence, re-check) and leaves
# the list; the peer then rings the data doorbell, which the loop watches, and
# the ring joins again.
#
# Spinning only pays while it catches data that would otherwise cost a
# sleep and a wake-up, and while the peer can run.  So:
# * the budget counts polling, not work: a gap between two chained turns
#   longer than _BUSY_GAP_NS means the program ran other callbacks (a server
#   computing its answer), and that time moves the loop's last traffic
#   forward instead of using up the budget; our own writes are traffic (a
#   transport's write says so; a RingWatch sees its send ring move);
# * a ring whose peer was last seen on the loop's own CPU (the CPU each
#   publish stores, see shr_peer_here) is armed at once: that peer runs
#   when we stop;
# * the budget adapts as a blocking wait's spin does (``_adapt_spin``): a
#   doorbell that rang soon after the ring was armed means a longer stay
#   would have caught the data (a peer that takes 100-400 us to answer, as
#   an aiohttp or tornado server does), so the budget grows to cover it, up
#   to ADAPT_CEILING times the busy-poll budget; one that rang much later
#   halves it.
#
# * a loop whose core is shared with other busy tasks still polls.  Polling
#   is charged to our share of the core, but sleeping costs more there: each
#   message then needs a doorbell write by the peer and a wake-up whose
#   delay is the scheduler's (measured: arming at once for 20 ms after each
#   involuntary context switch made the aiohttp rows 15-30 % slower with a
#   busy task on the server's core, and far worse on a loaded host).
#
# A turn that found nothing, when nothing else ran since the previous turn
# and that turn handed no data on, spins a few microseconds over the hot
# rings before it gives the loop back, and reads what came in the same turn:
# a peer that answers within that window costs no epoll_wait and no loop
# iteration.  The window is short so that timers and other callbacks wait no
# longer than a busy loop iteration would make them; a loop with other work
# does not spin at all.  The next turn is scheduled at the end of a turn,
# after the callbacks its data scheduled (a StreamReader's task), so a
# spinning turn never holds up work the previous one made.
#
# The slow paths (end of stream, errors, buffering when the ring is full,
# closing) stay in Python on the owning transport: they run once per
# connection, not once per message.

# (shr_cpu_tag, shr_peer_here, shr_peer_cpu: declared in _fastpath_poll.pxi)


def peer_cpu(Ring ring not None, bint writable):
    """The CPU the peer of this ring end last published from: the consumer's
    (its last read) when ``writable`` (we write), else the producer's (its
    last write); None if unknown.  A hint the spin policy uses (see
    shr_peer_here); for tests and diagnostics."""
    cdef uint32_t tag
    ring._check_open()
    tag = shr_peer_cpu(ring.h, writable)
    return None if tag == 0 else tag - 1


cdef inline bint _peer_away(Ring rx, uint32_t me) noexcept:
    """May the ring's producer be running now (it was not last seen on our CPU)?"""
    return rx.h != NULL and not shr_peer_here(rx.h, 0, me)


cdef class _Polled:
    """A ring the loop's poller polls while it is hot: a transport's
    (TransportCore) or one watched for fd callbacks (RingWatch)."""

    cdef Ring _rx
    cdef LoopPoller _poller
    cdef bint _hot
    cdef int64_t _budget_ns         # how long the ring stays hot (adapts)
    cdef int64_t _base_ns           # the busy-poll budget it adapts from
    cdef bint _slept                # we armed the ring when the budget ran out

    cdef int _poll_once(self, LoopPoller poller, bint polled) except -1:
        return 0

    cdef inline int _arm(self) except -1:
        """Arm the ring (the budget ran out): 1 if it was ready after all."""
        if _ring_arm(self._rx, False):
            return 1
        self._slept = True
        return 0

    cdef inline int _woke(self) except -1:
        """The doorbell rang: adapt the budget to how long after the loop's
        last data it came (see _adapt_spin) -- if it rang because we stopped
        polling.  A ring can also be armed without us (a new ring's reader
        counts as asleep; a non-blocking read that found it empty arms it):
        such a ring says nothing of our budget."""
        if self._slept:
            self._slept = False
            self._budget_ns = _adapt_spin(self._budget_ns, self._base_ns, 0,
                                          shr_now_ns() - self._poller.activity_ns)
        return 0

    cdef inline bint _stay_hot(self, LoopPoller poller, int moved) noexcept:
        """Keep polling after a look that moved ``moved`` (0/1)?  Data came
        while polled: staying hot paid off.  Empty: while the loop's last
        data is within budget and the peer may be running."""
        if moved:
            if self._budget_ns < self._base_ns:
                self._budget_ns = _adapt_spin(self._budget_ns, self._base_ns, 1, 0)
            return True
        return (shr_now_ns() - poller.activity_ns < self._budget_ns
                and _peer_away(self._rx, shr_cpu_tag()))

    @property
    def budget_us(self):
        """How long the ring stays polled after the loop's last data, in
        microseconds (adapts between 1/16 and ADAPT_CEILING busy-poll budgets)."""
        return self._budget_ns / 1000.0


cdef Py_ssize_t _READS_PER_TURN = 16
cdef Py_ssize_t _MAX_READ = 256 * 1024
cdef int64_t _TURN_SPIN_NS = 10000
#: A gap longer than this between two of the poller's consecutive turns means
#: the loop ran other callbacks in between (uvloop's own iteration, an
#: epoll_wait(0) and a look at the timers, takes 1-2 us): the program was
#: working, not waiting for a peer.
cdef int64_t _BUSY_GAP_NS = 5000


cdef class LoopPoller:
    """Polls the rings of one event loop's busy shrimpio transports."""

    cdef object _call_soon
    cdef object _run_cb
    cdef list _hot
    cdef bint _scheduled
    cdef public int64_t activity_ns     # last time any transport moved data (see run)
    cdef public int64_t turn_spin_ns    # spin of a turn that found nothing
    cdef int64_t _turn_end              # when the last turn that rescheduled itself ended
    cdef bint _chained                  # ... and this turn is the one it scheduled
    cdef bint _in_turn                  # run() is reading: it schedules the next turn itself
    cdef bint _delivered                # the last turn handed data on

    def __cinit__(self, loop):
        self._call_soon = loop.call_soon
        self._run_cb = self.run
        self._hot = []
        self.turn_spin_ns = _TURN_SPIN_NS

    cdef int _add(self, _Polled core) except -1:
        if not core._hot:
            core._hot = True
            self._hot.append(core)
        if not self._scheduled and not self._in_turn:
            self._scheduled = True
            self._chained = False
            self._call_soon(self._run_cb)
        return 0

    def hot_count(self):
        """Transports polled on the next turn (for tests and diagnostics)."""
        return len(self._hot)

    def run(self):
        """One turn: read every hot ring, keep polling the ones within budget."""
        cdef int got = 0
        cdef int64_t start = shr_now_ns()
        cdef bint idle = False
        if self._chained:
            if start - self._turn_end > _BUSY_GAP_NS:
                # The program worked between our turns: that time does not
                # count against the hot period (it is not a wait for a peer).
                self.activity_ns = min(start, self.activity_ns + (start - self._turn_end))
            elif not self._delivered:
                idle = True         # nothing else ran: the loop only polls
        self._scheduled = False
        self._chained = False
        # The next turn is scheduled at the end of this one, after every
        # callback the protocols schedule now (a StreamReader's task): those
        # run before it, so that a turn that finds the loop idle and spins
        # never holds up work this turn made.
        self._in_turn = True
        try:
            got = self._pass()
            if not got and idle and self._hot and self.turn_spin_ns > 0 and self._spin(self._hot):
                # Data came while we spun: read it in this turn.  The loop had
                # nothing else to do, so nothing waits longer for it, and the
                # read costs no loop iteration (an epoll_wait(0)) of its own.
                got = self._pass()
        finally:
            self._in_turn = False
            self._delivered = got != 0
            if self._hot and not self._scheduled:
                self._scheduled = True
                self._call_soon(self._run_cb)
        if self._scheduled:
            self._chained = True
            self._turn_end = shr_now_ns()

    cdef int _pass(self) except -1:
        """Read every hot ring once; 1 if any moved data."""
        cdef list batch = self._hot
        cdef _Polled core
        cdef int got = 0
        self._hot = []
        for core in batch:
            core._hot = False
        for core in batch:
            got |= core._poll_once(self, True)
        return got

    cdef bint _spin(self, list hot) noexcept:
        """Spin up to turn_spin_ns over the hot rings: True once one of them
        has data (or end of stream), False if none came."""
        cdef _Polled core
        cdef Ring rx
        cdef int64_t end = shr_now_ns() + self.turn_spin_ns
        cdef int i
        cdef uint32_t me = shr_cpu_tag()
        for core in hot:
            if _peer_away(core._rx, me):
                break
        else:
            return False    # every peer is on our CPU: it runs when we stop
        while True:
            # A look at every ring after each pause (some 20-30 ns), the
            # clock once in 64 looks: data is seen within a pause of coming.
            for i in range(64):
                for core in hot:
                    rx = core._rx
                    if rx.h == NULL or shr_load_head(rx.h) != rx.tail or shr_load_wshut(rx.h):
                        return True
                shr_cpu_relax()
            if shr_now_ns() >= end:
                return False


cdef class TransportCore(_Polled):
    """What a shrimpio transport does per message: read its ring into the
    protocol, write into the peer's ring.  The owning transport (Python)
    keeps the rest; the state both need lives here."""

    cdef Stream _stream
    cdef public object owner        # the ShmTransport: slow paths
    cdef public object protocol
    cdef public bint buffered       # protocol is a BufferedProtocol
    cdef public bint paused
    cdef public bint closing
    cdef public bint read_eof
    cdef public bint gone           # EOF on a doorbell: the peer died
    cdef public bint eof_requested
    cdef public Py_ssize_t conn_lost
    cdef public Py_ssize_t buffer_size

    def __cinit__(self, owner, Stream stream not None, LoopPoller poller not None):
        self.owner = owner
        self._stream = stream
        self._rx = stream.rx
        self._poller = poller
        self._base_ns = stream.rx.spin_max_ns
        self._budget_ns = self._base_ns

    def activate(self):
        """Poll this ring on the loop's next turns (data may be there)."""
        if self.paused or self.closing or self.read_eof:
            return
        self._poller._add(self)

    def wake(self):
        """The doorbell rang: read now, then keep polling while in budget."""
        self._woke()
        self._poll_once(self._poller, False)

    cdef int _poll_once(self, LoopPoller poller, bint polled) except -1:
        """Read what is there; rejoin the hot list unless the ring is armed
        or reading stopped.  Returns 1 if data moved."""
        cdef int r = self._read_ready()
        if r < 0:
            return 0
        if r > 0 and not polled:
            poller._add(self)
        elif self._stay_hot(poller, r):
            poller._add(self)
        elif self._arm():
            poller._add(self)
        return r

    cdef int _read_ready(self) except -2:
        """Up to _READS_PER_TURN reads.  1 data moved, 0 empty, -1 stop
        polling (reading paused or over, or an error handed to the owner)."""
        cdef Ring rx = self._rx
        cdef uint64_t avail
        cdef Py_ssize_t i, n
        cdef int moved = 0
        cdef Py_buffer buf
        if self.paused or self.closing or self.read_eof:
            return -1
        for i in range(_READS_PER_TURN):
            try:
                # Ask the ring first: an empty poll must not cost an exception
                # or an allocation; it is what a busy loop does most.
                avail = _ring_avail(rx) if rx.h != NULL else 0
                if not avail and not self.gone and rx.h != NULL and not rx.at_eof():
                    break
                if self.buffered:
                    target = self.protocol.get_buffer(-1)
                    PyObject_GetBuffer(target, &buf, PyBUF_WRITABLE)
                    try:
                        if buf.len == 0:
                            raise RuntimeError("get_buffer() returned an empty buffer")
                        n = self._stream._recv(<char *>buf.buf, buf.len, 0, 0.0)
                    finally:
                        PyBuffer_Release(&buf)
                    if n == 0:
                        self.owner._on_eof()
                        return -1
                    self.protocol.buffer_updated(n)
                else:
                    n = <Py_ssize_t>avail if avail and avail < <uint64_t>_MAX_READ else \
                        (_MAX_READ if avail else 1)
                    data = PyBytes_FromStringAndSize(NULL, n)
                    n = self._stream._recv(PyBytes_AS_STRING(data), n, 0, 0.0)
                    if n == 0:
                        self.owner._on_eof()
                        return -1
                    self.protocol.data_received(data if n == len(data) else data[:n])
            except BlockingIOError:
                break
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.owner._fatal_error(exc, "Fatal read error on shrimpio transport")
                return -1
            moved = 1
            self._poller.activity_ns = shr_now_ns()
            if self.closing or self.paused:
                return -1
        else:
            return 1        # more may be there: let other callbacks run first
        if self.gone:
            self.owner._on_eof()     # the peer died without shutting down
            return -1
        return moved

    def is_closing(self):
        """``transport.is_closing`` (StreamWriter.drain asks it every time)."""
        return self.closing

    def write(self, data):
        """``transport.write``: into the ring at once; what does not fit goes
        to the owner's buffer (and the writer waits for the space doorbell)."""
        cdef Py_buffer buf
        cdef Py_ssize_t n = 0
        if self.buffer_size or self.conn_lost or self.eof_requested or not (
                PyBytes_CheckExact(data) or isinstance(data, (bytearray, memoryview))):
            return self.owner._write_slow(data, 0)
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            if buf.len == 0:
                return
            self._poller.activity_ns = shr_now_ns()
            try:
                n = self._stream._send_now(&buf)
            except BlockingIOError:
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                return self.owner._fatal_error(exc, "Fatal write error on shrimpio transport")
            if n == buf.len:
                return
        finally:
            PyBuffer_Release(&buf)
        return self.owner._write_slow(data, n)


cdef class RingWatch(_Polled):
    """Hot polling of a connection's receive ring for readers that are not
    a transport: callbacks given to the loop's ``add_reader`` on a
    shared-memory fd (tornado, dask) and its ``sock_recv`` waits
    (shrimpio/transport/_watch.py).  ``ready()`` answers "is there data?";
    when not, the ring stays on the loop's hot list while the loop's last
    traffic is within budget (as a transport's does) and ``on_data`` is
    called once data comes; when the budget is spent the ring is armed and
    the doorbell, which the watch's own kernel reader waits on, takes over.
    Our own writes on the connection (its send ring's producer index
    moving) count as the loop's traffic: a server answers, then waits for
    the next request."""

    cdef Ring _tx
    cdef uint64_t _seen_tx
    cdef int64_t _armed_ns          # when the ring was last armed
    cdef object _on_data
    cdef bint _wanted

    def __cinit__(self, Ring rx not None, Ring tx not None, LoopPoller poller not None, on_data):
        self._rx = rx
        self._tx = tx
        self._seen_tx = tx.head
        self._poller = poller
        self._on_data = on_data
        self._base_ns = rx.spin_max_ns
        self._budget_ns = self._base_ns

    cdef inline int _has_data(self) except -1:
        cdef Ring rx = self._rx
        return rx.h == NULL or shr_load_head(rx.h) != rx.tail or shr_load_wshut(rx.h) != 0

    cdef inline void _note_writes(self, LoopPoller poller) noexcept:
        if self._tx.h != NULL and self._tx.head != self._seen_tx:
            self._seen_tx = self._tx.head
            poller.activity_ns = shr_now_ns()

    def ready(self):
        """True if the ring holds data (or end of stream) now.  Else False,
        and the ring is either polled hot (``on_data`` follows data) or
        armed (its doorbell will ring)."""
        cdef LoopPoller poller = self._poller
        self._wanted = True
        self._note_writes(poller)
        if self._has_data():
            poller.activity_ns = shr_now_ns()
            return True
        if self._stay_hot(poller, 0):
            poller._add(self)
            return False
        self._armed_ns = shr_now_ns()
        return bool(self._arm())

    def stop(self):
        """No reader waits any more: leave the hot list at the next turn."""
        self._wanted = False

    def woke(self):
        """The doorbell rang (the ring was armed): adapt the hot period.
        If we wrote since the ring was armed (a server's answer), the wait
        for the peer began then, not at the loop's last traffic before."""
        cdef LoopPoller poller = self._poller
        if self._tx.h != NULL and self._tx.head != self._seen_tx:
            self._seen_tx = self._tx.head
            if self._armed_ns > poller.activity_ns:
                poller.activity_ns = self._armed_ns
        self._woke()

    cdef int _poll_once(self, LoopPoller poller, bint polled) except -1:
        if not self._wanted:
            return 0
        self._note_writes(poller)
        if self._has_data():
            poller.activity_ns = shr_now_ns()
            if self._budget_ns < self._base_ns:
                self._stay_hot(poller, 1)         # polling caught it: grow back
            self._wanted = False                  # the watch asks again after its callbacks
            self._on_data()
            return 1
        if self._stay_hot(poller, 0):
            poller._add(self)
            return 0
        self._armed_ns = shr_now_ns()
        if self._arm():
            self._wanted = False
            self._on_data()                       # came while arming
            return 1
        return 0
