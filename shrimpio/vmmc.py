"""The VMMC API: endpoints, exported and imported buffers, notifications.

Theory of operation
-------------------
An ``Endpoint`` is a named listening Unix socket in the user's registry plus
a thread that answers import requests (SHRIMP's "trusted party": it checks
who asks, once, and hands out exactly one buffer).  Exporting creates a sealed
memfd segment; importing connects to the endpoint, sends a versioned
``import`` request, and receives two fds over ``SCM_RIGHTS``: the buffer
itself and a small per-import segment holding the notification ring.

After that the control connection carries no messages.  It is the doorbell
of the notification ring (rung only when the exporter sleeps) and the
liveness signal: when either side exits, however it exits, the kernel closes
its end and the other side sees EOF.  The data path (``send``) is a
bounds-checked ``memcpy`` into the mapping plus, with ``notify=True``, a
16-byte record in the notification ring: no system call unless the exporter
is asleep.

The exporter validates every notification record (a hostile importer can
break its own link, nothing else).  The importer checks that the buffer fd is
a memfd sealed against shrinking, so the exporter cannot make it fault.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Optional, Tuple

from . import _control
from ._control import Registry, check_name
from ._fastpath import Export, Proxy, Ring, Segment

#: The kernel's poll, whatever shrimpio.patch does to select.poll (these
#: waits watch kernel fds only).
_real_poll = select.poll

__all__ = ["Endpoint", "ExportedBuffer", "ImportedBuffer", "NOTIFY_CAPACITY"]

log = logging.getLogger("shrimpio.vmmc")

#: Bytes of each importer's notification ring: 256 queued notifications.
NOTIFY_CAPACITY = 4096
#: How long an import request may take before the endpoint gives up on it.
REQUEST_TIMEOUT = 5.0

NotifyHandler = Callable[[int, int], object]


class ExportedBuffer(Export):
    """A receive buffer of this process that other processes may import.

    ``memoryview(buf)`` is the local view of the bytes.  ``wait()`` returns
    the next notification ``(offset, nbytes)`` (for buffers exported without
    a handler); ``block_notifications()`` / ``unblock_notifications()`` defer
    delivery, nesting.  ``close()`` unexports: importers then get
    ``ConnectionResetError``.
    """

    name: str
    readable: bool

    @classmethod
    def _create(cls, endpoint: "Endpoint", name: str, size: int, notify: Optional[NotifyHandler],
                readable: bool) -> "ExportedBuffer":
        seg = Segment(size)
        self = cls.__new__(cls, seg, has_handler=notify is not None)
        self.name = name
        self.readable = readable
        self._endpoint = endpoint
        self._notify = notify
        self._thread: Optional[threading.Thread] = None
        if notify is not None:
            self._thread = threading.Thread(target=self._run_handlers, daemon=True,
                                            name=f"shrimpio-notify-{endpoint.name}/{name}")
            self._thread.start()
        return self

    def _run_handlers(self) -> None:
        # Handlers run one at a time in this thread, with notifications
        # blocked (as in SHRIMP): a handler may unblock/block explicitly.
        while True:
            try:
                rec = self._wait_for_handler(None)
            except ValueError:          # closed
                return
            if rec is None:
                continue
            self.block_notifications()
            try:
                self._notify(*rec)
            except Exception:
                log.exception("notification handler of %s/%s failed", self._endpoint.name, self.name)
            finally:
                if self.blocked:        # unless the handler unblocked itself: the
                    self.unblock_notifications()   # thread must live on either way

    def _serve_import(self, conn: socket.socket) -> None:
        """Give one importer the buffer and a fresh notification ring."""
        nseg = Segment(Ring.footprint(NOTIFY_CAPACITY))
        try:
            ring = Ring(nseg, 0, NOTIFY_CAPACITY, create=True,
                        data_bell=conn.fileno(), space_bell=conn.fileno())
        except BaseException:
            nseg.close()
            raise

        def release() -> None:   # runs after the ring let go of the segment
            nseg.close()
            conn.close()

        # Our own copies of the fds to pass: a concurrent unexport may close
        # the originals (and the numbers be reused) before the reply goes.
        fds: list[int] = []
        try:
            fds.append(os.dup(self.segment.fileno()))     # ValueError if unexported meanwhile
            fds.append(os.dup(nseg.fileno()))
        except BaseException:
            for fd in fds:
                os.close(fd)
            ring.close()
            release()
            raise
        try:
            # Link first, reply second: once import_buffer() returns, this
            # exporter counts the importer and its waiters watch its ring.
            self._add_link(ring, release)   # on failure it has released both
            try:
                _control.send_message(conn, "ok", {"size": self.size, "readable": self.readable,
                                                   "notify_capacity": NOTIFY_CAPACITY}, fds=fds)
            except OSError as e:
                # The asker is gone.  The link owns conn now (it must not be
                # closed under a waiter): hang it up, and the link is dropped
                # like any gone importer's.
                log.debug("endpoint %s: import reply for %s failed: %s", self._endpoint.name,
                          self.name, e)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Unexport: importers are released and see the exporter gone."""
        if self.closed:
            return
        Export.close(self)
        self._endpoint._forget_export(self)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.segment.close()

    def __enter__(self) -> "ExportedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.importers} importers"
        return f"<ExportedBuffer {self._endpoint.name}/{self.name} size={self.size} {state}>"


class ImportedBuffer(Proxy):
    """A proxy for a buffer exported by another process.

    ``send(data, offset=0, *, notify=False)`` is a deliberate update;
    ``fetch(offset, nbytes)`` a remote read, allowed only if the exporter said
    ``readable=True``.  Both raise ``ValueError`` out of bounds and
    ``ConnectionResetError`` once the exporter is gone.
    """

    endpoint_name: str
    name: str

    def close(self) -> None:
        """Unimport: unmap the buffer and drop the link to the exporter."""
        if self._sock is None:
            return
        self._detach()
        self._notify_ring.close()
        self._notify_segment.close()
        seg, self._segment = self._segment, None
        try:
            seg.close()
        except BufferError:
            # A send() in another thread is still copying into the mapping
            # (it pins it): the mapping goes with that thread's reference.
            pass
        self._sock.close()
        self._sock = None
        self._owner._forget_import(self)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> "ImportedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<ImportedBuffer {self.endpoint_name}/{self.name} size={self.size}{state}>"


def _field(body: dict, key: str, kind: type) -> object:
    value = body.get(key)
    if type(value) is not kind:
        raise _control.ProtocolError(f"import reply: {key!r} is {value!r}, expected {kind.__name__}")
    return value


class Endpoint:
    """A named VMMC endpoint of this process (SHRIMP: a process's id for
    import).  Other processes of the same user import its buffers by
    ``(endpoint name, buffer name)``.  Use as a context manager or ``close()``.
    """

    def __init__(self, name: str, *, registry: Optional[str] = None) -> None:
        self.name = check_name(name)
        self._registry = Registry.open(registry)
        self._listener = self._registry.listen(self.name)
        self._exports: dict[str, ExportedBuffer] = {}
        self._imports: set[ImportedBuffer] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"shrimpio-endpoint-{self.name}")
        self._thread.start()

    # -- exporting ---------------------------------------------------------

    def export(self, name: str, size: int, *, notify: Optional[NotifyHandler] = None,
               readable: bool = False) -> ExportedBuffer:
        """Export a new ``size``-byte receive buffer under ``name``.

        ``notify(offset, nbytes)`` runs (in a thread of this endpoint) for
        every notifying send; ``readable=True`` lets importers ``fetch``."""
        check_name(name)
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if notify is not None and not callable(notify):
            raise TypeError("notify must be a callable (offset, nbytes) or None")
        with self._lock:
            self._check_open()
            if name in self._exports:
                raise FileExistsError(errno.EEXIST, f"buffer {name!r} is already exported by {self.name!r}")
            buf = ExportedBuffer._create(self, name, size, notify, bool(readable))
            self._exports[name] = buf
        return buf

    def _forget_export(self, buf: ExportedBuffer) -> None:
        with self._lock:
            if self._exports.get(buf.name) is buf:
                del self._exports[buf.name]

    # -- importing ---------------------------------------------------------

    def import_buffer(self, endpoint_name: str, buffer_name: str, *,
                      timeout: Optional[float] = REQUEST_TIMEOUT) -> ImportedBuffer:
        """Import ``buffer_name`` exported by the endpoint ``endpoint_name``.

        ``FileNotFoundError`` if there is no such endpoint or buffer,
        ``PermissionError`` if it belongs to another user."""
        check_name(endpoint_name)
        check_name(buffer_name)
        self._check_open()
        sock = self._registry.connect(endpoint_name, timeout=timeout)
        fds: list[int] = []
        try:
            _control.send_message(sock, "import", {"buffer": buffer_name, "pid": os.getpid()})
            reply = _control.expect(_control.recv_message(sock, timeout=timeout), "ok")
            fds = reply.fds
            size = _field(reply.body, "size", int)
            readable = _field(reply.body, "readable", bool)
            cap = _field(reply.body, "notify_capacity", int)
            if len(fds) != 2:
                raise _control.ProtocolError(f"import reply carried {len(fds)} fds, expected 2")
            if size <= 0:
                raise _control.ProtocolError(f"import reply: bad size {size}")
            if not 64 <= cap <= 1 << 20 or cap & (cap - 1):
                raise _control.ProtocolError(f"import reply: bad notification capacity {cap}")
            bfd, nfd = fds
            fds = []
            try:
                seg = Segment.from_fd(bfd, size, keep_fd=False)
            except BaseException:
                os.close(nfd)
                raise
            try:
                nseg = Segment.from_fd(nfd, Ring.footprint(cap), keep_fd=False)
            except BaseException:
                seg.close()
                raise
            try:
                ring = Ring(nseg, 0, cap, data_bell=sock.fileno(), space_bell=sock.fileno())
            except BaseException:
                nseg.close()
                seg.close()
                raise
            imp = ImportedBuffer.__new__(ImportedBuffer, seg, ring, sock.fileno(),
                                         readable=readable, size=size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise
        imp.endpoint_name = endpoint_name
        imp.name = buffer_name
        imp._sock = sock
        imp._segment = seg
        imp._notify_segment = nseg
        imp._notify_ring = ring
        imp._owner = self
        with self._lock:
            self._imports.add(imp)
        return imp

    def _forget_import(self, imp: ImportedBuffer) -> None:
        with self._lock:
            self._imports.discard(imp)

    # -- serving import requests --------------------------------------------

    def _serve(self) -> None:
        # One thread answers every asker.  A request is one datagram sent
        # right after connecting, but an asker may connect and send nothing
        # (slow, stopped, or hostile): it must not hold up the others.  So
        # the thread polls the listener and every connection still owing its
        # request, answers each once its datagram is there (no wait then),
        # and hangs up on those that stay silent for REQUEST_TIMEOUT.
        lfd = self._listener.fileno()
        self._listener.setblocking(False)
        poller = _real_poll()
        poller.register(lfd, select.POLLIN)
        waiting: dict[int, Tuple[socket.socket, float]] = {}      # fd -> (conn, deadline)
        try:
            while True:
                timeout = None
                if waiting:
                    first = min(deadline for _, deadline in waiting.values())
                    timeout = max(0.0, first - time.monotonic()) * 1000.0
                for fd, _events in poller.poll(timeout):
                    if fd == lfd:
                        if not self._accept_askers(poller, waiting):
                            return
                        continue
                    conn, _ = waiting.pop(fd)
                    poller.unregister(fd)
                    try:
                        self._answer(conn)
                    except Exception as e:  # a bad request only affects its asker
                        log.debug("endpoint %s: import request refused: %s", self.name, e)
                        conn.close()
                now = time.monotonic()
                for fd, (conn, deadline) in list(waiting.items()):
                    if deadline <= now:
                        log.debug("endpoint %s: no request within %ss", self.name, REQUEST_TIMEOUT)
                        del waiting[fd]
                        poller.unregister(fd)
                        conn.close()
        finally:
            for conn, _ in waiting.values():
                conn.close()

    def _accept_askers(self, poller: "select.poll", waiting: dict) -> bool:
        """Accept every pending asker into ``waiting``; False when the
        endpoint is closing (or its listener failed)."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                # A listener shut down by close() polls readable, yet a
                # non-blocking accept() on it only says EAGAIN.
                return not self._closed
            except OSError:
                if not self._closed:
                    log.exception("endpoint %s: accept failed", self.name)
                return False
            if self._closed:
                conn.close()
                return False
            conn.setblocking(True)
            waiting[conn.fileno()] = (conn, time.monotonic() + REQUEST_TIMEOUT)
            poller.register(conn.fileno(), select.POLLIN)

    def _answer(self, conn: socket.socket) -> None:
        pid, uid, _gid = _control.peer_credentials(conn)
        try:
            msg = _control.recv_message(conn, timeout=REQUEST_TIMEOUT)
        except ConnectionResetError:     # a probe (e.g. Registry.listen's liveness check)
            conn.close()
            return
        for fd in msg.fds:
            os.close(fd)
        if msg.kind != "import":
            _control.error_reply(conn, errno.EPROTO, f"unexpected request {msg.kind!r}")
            conn.close()
            return
        if uid != os.geteuid():
            _control.error_reply(conn, errno.EPERM, f"endpoint {self.name!r} belongs to another user")
            conn.close()
            return
        name = msg.body.get("buffer")
        with self._lock:
            buf = self._exports.get(name) if isinstance(name, str) else None
        if buf is None or buf.closed:
            _control.error_reply(conn, errno.ENOENT, f"endpoint {self.name!r} exports no buffer {name!r}")
            conn.close()
            return
        buf._serve_import(conn)

    # -- lifetime ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"endpoint {self.name!r} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the endpoint from the registry, unexport and unimport all."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            exports = list(self._exports.values())
            imports = list(self._imports)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() above
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._registry.remove(self.name, self._listener)
        first_error: Optional[BaseException] = None
        for buf in exports:
            try:
                buf.close()
            except BufferError as e:   # memoryviews still alive: keep the mapping
                first_error = first_error or e
        for imp in imports:
            imp.close()
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Endpoint {self.name!r}{' closed' if self._closed else ''}>"


Notification = Tuple[int, int]
