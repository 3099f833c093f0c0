# Included by _fastpath.pyx: the per-turn work of the asyncio transport
# (shrimpio/transport/_transport.py), in C.
#
# Theory of operation
# -------------------
# Each event loop has one ``LoopPoller``.  A transport's ``TransportCore``
# joins the poller's *hot* list when it may have data (it just started
# reading, its doorbell rang, or it moved data lately).  While the list is
# not empty, the poller's ``run`` is a ``call_soon`` callback: one turn reads
# every hot ring (no system call: a look at the producer index), hands the
# bytes to the protocols, and schedules itself again.  The loop stays hot
# (uvloop's epoll_wait(0) between turns) for as long as the busy-poll budget
# runs from the last byte any transport of the loop moved: a server that just
# answered one client will hear from the next soon.  When the budget is spent,
# a core *arms* its ring (reader-sleeping flag, fence, re-check) and leaves the
# list; the peer then rings the data doorbell, which the loop watches with
# ``add_reader``, and the core joins again.  The budget adapts as a blocking
# wait's spin does (``_adapt_spin``): a doorbell that rang soon after the loop
# went to sleep means a longer stay would have caught the data without a
# sleep and a wake-up (a peer that takes 100-200 us to answer, as an aiohttp
# server does), so the budget grows to cover it, up to ADAPT_CEILING times
# the busy-poll budget; one that rang much later halves it.
#
# A turn that found nothing spins a few microseconds over the hot rings before
# it gives the loop back: a peer that answers within that window costs no
# epoll_wait and no loop iteration.  The window is short so that timers and
# other callbacks wait no longer than a busy loop iteration would make them.
#
# The slow paths (end of stream, errors, buffering when the ring is full,
# closing) stay in Python on the owning transport: they run once per
# connection, not once per message.

cdef Py_ssize_t _READS_PER_TURN = 16
cdef Py_ssize_t _MAX_READ = 256 * 1024
cdef int64_t _TURN_SPIN_NS = 10000


cdef class LoopPoller:
    """Polls the rings of one event loop's busy shrimpio transports."""

    cdef object _call_soon
    cdef object _run_cb
    cdef list _hot
    cdef bint _scheduled
    cdef public int64_t activity_ns     # last time any transport moved data
    cdef public int64_t turn_spin_ns    # spin of a turn that found nothing

    def __cinit__(self, loop):
        self._call_soon = loop.call_soon
        self._run_cb = self.run
        self._hot = []
        self.turn_spin_ns = _TURN_SPIN_NS

    cdef int _add(self, TransportCore core) except -1:
        if not core._hot:
            core._hot = True
            self._hot.append(core)
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._run_cb)
        return 0

    def hot_count(self):
        """Transports polled on the next turn (for tests and diagnostics)."""
        return len(self._hot)

    def run(self):
        """One turn: read every hot ring, keep polling the ones within budget."""
        cdef list batch = self._hot
        cdef TransportCore core
        cdef int got = 0
        self._scheduled = False
        self._hot = []
        for core in batch:
            core._hot = False
        for core in batch:
            got |= core._poll_once(self, True)
        if not got and self._hot and self.turn_spin_ns > 0:
            self._spin(self._hot)
        if self._hot and not self._scheduled:
            self._scheduled = True
            self._call_soon(self._run_cb)

    cdef void _spin(self, list hot):
        cdef TransportCore core
        cdef Ring rx
        cdef int64_t end = shr_now_ns() + self.turn_spin_ns
        cdef int i
        while True:
            for core in hot:
                rx = core._rx
                if rx.h == NULL or shr_load_head(rx.h) != rx.tail or shr_load_wshut(rx.h):
                    return
            for i in range(64):
                shr_cpu_relax()
            if shr_now_ns() >= end:
                return


cdef class TransportCore:
    """What a shrimpio transport does per message: read its ring into the
    protocol, write into the peer's ring.  The owning transport (Python)
    keeps the rest; the state both need lives here."""

    cdef Stream _stream
    cdef Ring _rx
    cdef LoopPoller _poller
    cdef bint _hot
    cdef int64_t _budget_ns         # how long the ring stays hot (adapts)
    cdef int64_t _base_ns           # the busy-poll budget it adapts from
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

    @property
    def budget_us(self):
        """How long the ring stays polled after the loop's last data, in
        microseconds (adapts between 1/16 and ADAPT_CEILING busy-poll budgets)."""
        return self._budget_ns / 1000.0

    def activate(self):
        """Poll this ring on the loop's next turns (data may be there)."""
        if self.paused or self.closing or self.read_eof:
            return
        self._poller._add(self)

    def wake(self):
        """The doorbell rang: read now, then keep polling while in budget."""
        self._budget_ns = _adapt_spin(self._budget_ns, self._base_ns, 0,
                                      shr_now_ns() - self._poller.activity_ns)
        self._poll_once(self._poller, False)

    cdef int _poll_once(self, LoopPoller poller, bint polled) except -1:
        """Read what is there; rejoin the hot list unless the ring is armed
        or reading stopped.  Returns 1 if data moved."""
        cdef int r = self._read_ready()
        if r < 0:
            return 0
        if r > 0 and polled and self._budget_ns < self._base_ns:
            # Data came while the loop was polling: staying hot paid off.
            self._budget_ns = _adapt_spin(self._budget_ns, self._base_ns, 1, 0)
        if r > 0 or shr_now_ns() - poller.activity_ns < self._budget_ns:
            poller._add(self)
        elif _ring_arm(self._rx, False):
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
                avail = rx._avail() if rx.h != NULL else 0
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
