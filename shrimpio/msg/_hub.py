"""Matching messages to receives, and requests.

A :class:`Hub` holds, for a set of channels (one channel's own, or all the
channels of a :class:`~shrimpio.msg.MsgListener`), the receives posted and
not yet matched (in posting order) and the messages arrived and not yet
received (in arrival order).  An arriving message goes to the first posted
receive that matches its tag and source; a new receive takes the first
queued message that matches: order is kept per (source, tag), as MPI keeps
it.  Waiting is done here too: on one channel's ring, or with shrimpio's
poller over several channels and a listener.
"""

from __future__ import annotations

import time
import threading
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Optional

from . import _offer
from ._base import ANY, Status, check_tag

if TYPE_CHECKING:
    from ._channel import Channel
    from ._frame import Header

__all__ = ["Hub", "Request", "RecvRequest", "SendRequest", "CancelledError"]

#: Seconds a wait over several channels looks at their rings before sleeping.
SPIN = 30e-6


class _Arrived:
    """A message read (MSG) or announced (RTS) and not yet received."""

    __slots__ = ("chan", "kind", "ptype", "tag", "mid", "pid", "descs", "body", "bufs", "nbytes")

    def __init__(self, chan: "Channel", h: Header, descs: list, body: Any, bufs: Optional[list]) -> None:
        self.chan = chan
        self.kind = h.kind
        self.ptype = h.ptype
        self.tag = h.tag
        self.mid = h.mid
        self.pid = h.pid
        self.descs = descs
        self.body = body
        self.bufs = bufs
        self.nbytes = h.total + h.body_len


class Request:
    """A non-blocking operation: ``test()``, ``wait(timeout=None)``,
    ``cancel()``.  A receive's result is a :class:`Message`, a send's None."""

    __slots__ = ("_hub", "_chan", "_done", "_result", "_error", "_cancelled", "tag", "source",
                 "into", "_refs", "_early", "_raw", "_offer", "__weakref__")

    def __init__(self, hub: "Hub", chan: Optional["Channel"]) -> None:
        self._hub = hub
        self._chan = chan
        self._done = False
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._cancelled = False
        self._refs: list = []
        self._early = False
        self._raw: Any = None
        self._offer: Any = None            # (channel, id) of a receive offered to its sender

    @property
    def done(self) -> bool:
        """Completed, failed or cancelled (no progress is made to find out)."""
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _finish(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        self._result, self._error, self._done = result, error, True
        for r in self._refs:
            r.release()
        self._refs = []

    def test(self) -> bool:
        """Make progress without waiting; True once complete."""
        if not self._done:
            self._hub.progress(0.0)
        return self._done

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Wait for completion; the received :class:`Message` (None for a
        send).  ``TimeoutError`` when ``timeout`` passes (the request stays
        pending); the operation's error if it failed."""
        if timeout is not None:
            if timeout != timeout or timeout < 0:
                raise ValueError("timeout must be a non-negative number or None")
            deadline: Optional[float] = time.monotonic() + timeout
        else:
            deadline = None
        hub = self._hub
        if not self._done and self._chan is not None and getattr(self, "mid", None):
            self._chan._local_progress(self)       # a large send to this process
        while not self._done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                hub.progress(0.0)
                if not self._done:
                    raise TimeoutError("timed out")
                break
            hub.progress(left, self)
        if self._cancelled:
            raise _Cancelled("the request was cancelled")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> bool:
        """Cancel a receive not yet matched to a message: True if cancelled.
        A matched receive, and a send, cannot be cancelled (False)."""
        return self._hub.cancel(self)

    def __await__(self) -> Any:
        """``await req``: as ``wait()``, the hub progressing on the running
        loop meanwhile."""
        from ._aio import wait_request
        return wait_request(self).__await__()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("done" if self._done else "pending")
        return f"<{type(self).__name__} {state}>"


_Cancelled = CancelledError


class RecvRequest(Request):
    __slots__ = ()


class SendRequest(Request):
    __slots__ = ("mid", "bufs")

    def __init__(self, hub: "Hub", chan: Optional["Channel"]) -> None:
        super().__init__(hub, chan)
        self.mid = 0                       # a large message's id (0: eager)
        self.bufs: list = []

class Hub:
    """Posted receives and arrived messages of a set of channels."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pending: list[RecvRequest] = []
        self.queue: list[_Arrived] = []
        self.channels: list[Channel] = []
        self.listener: Any = None           # a msg Listener: accepts while waiting

    # -- matching -------------------------------------------------------------

    def match_arrival(self, chan: "Channel", tag: int) -> Optional[RecvRequest]:
        for i, req in enumerate(self.pending):
            if (req.tag is ANY or req.tag == tag) and (req.source is ANY or req.source is chan):
                del self.pending[i]
                return req
        return None

    def match_queued(self, tag: Any, source: Any, remove: bool) -> Optional[_Arrived]:
        for i, a in enumerate(self.queue):
            if (tag is ANY or a.tag == tag) and (source is ANY or a.chan is source):
                if remove:
                    del self.queue[i]
                return a
        return None

    def post(self, req: RecvRequest) -> None:
        with self.lock:
            self.pump()          # what has arrived is queued first: a late receive
            a = self.match_queued(req.tag, req.source, True)
            if a is None:
                self._check_live(req)
                if not req._done:
                    self.pending.append(req)
                    if req.into is not None:
                        _offer.offer(self, req)
                return
            a.chan._take_queued(a, req)

    def cancel(self, req: Request) -> bool:
        with self.lock:
            if req._done:
                return False
            if isinstance(req, RecvRequest) and req in self.pending:
                if req._offer is not None and not _offer.revoke(self, req):
                    return False             # its message is being written into it
                self.pending.remove(req)
                req._cancelled = True
                req._finish()
                return True
            return False

    def _check_live(self, req: RecvRequest) -> None:
        """Fail a receive that no live channel can satisfy."""
        if req.source is not ANY:
            err = req.source._dead_error()
            if err is not None:
                req._finish(error=err)
            return
        if self.listener is not None and not self.listener.closed:
            return
        live = [c for c in self.channels if c._dead_error() is None]
        if not live:
            errs = [c._dead_error() for c in self.channels]
            req._finish(error=next((e for e in errs if not isinstance(e, EOFError)), None)
                        or (errs[0] if errs else EOFError("no channel to receive from")))

    def fail_channel(self, chan: "Channel") -> None:
        """The channel ended: fail the receives only it could satisfy."""
        for req in list(self.pending):
            if req.source is chan or (req.source is ANY and len(self.channels) <= 1
                                      and self.listener is None):
                self.pending.remove(req)
                req._finish(error=chan._dead_error())
            elif req.source is ANY:
                self._check_live_pending(req)

    def _check_live_pending(self, req: RecvRequest) -> None:
        self._check_live(req)
        if req._done and req in self.pending:
            self.pending.remove(req)

    # -- progress -------------------------------------------------------------

    def pump(self, deep: bool = False) -> bool:
        """Handle every frame that has arrived; True if any was.  ``deep``
        also looks for the end of a channel whose rings are empty (one
        system call each: after a wake-up only)."""
        did = False
        with self.lock:
            lst = self.listener
            if lst is not None:
                # New clients: after a wake-up (the listener's fd is among
                # those watched), else at most every half millisecond (an
                # accept attempt is a few system calls).
                now = time.monotonic()
                if deep or now - lst._tried >= 0.0005:
                    lst._tried = now
                    did = lst._accept_ready()
            for chan in list(self.channels):
                did = chan._pump(deep) or did
        return did

    def progress(self, timeout: Optional[float], req: Optional[Request] = None) -> None:
        """Handle arrived frames; if none and ``timeout`` is not 0, wait up
        to ``timeout`` for one (None: for ever) and handle it."""
        if self.pump() or timeout == 0 or (req is not None and req._done):
            return
        self.wait(timeout, self.channels)
        self.pump(True)

    def wait(self, timeout: Optional[float], chans: list) -> None:
        """Wait until one of ``chans`` (or the listener) may have input."""
        chans = [c for c in chans if c._dead_error() is None]
        if self.listener is None and len(chans) == 1:
            chans[0]._wait_input(timeout)
        elif self.listener is None and not chans:
            return
        else:
            # Several channels: look at their rings for a moment first (a
            # busy server's next message usually comes within microseconds,
            # and a poller's sleep and wake-up cost tens), then sleep in
            # shrimpio's poller.
            rxs = [c._rx for c in chans if c._rx is not None]
            if rxs:
                spin = SPIN if timeout is None else min(SPIN, timeout)
                end = time.perf_counter() + spin
                while time.perf_counter() < end:
                    for rx in rxs:
                        if rx.readable():
                            return
            from .. import _poll
            p = _poll.poll()
            for c in chans:
                p.register(c._wire.fileno(), _poll.POLLIN)
            if self.listener is not None and not self.listener.closed:
                p.register(self.listener._sock.fileno(), _poll.POLLIN)
            p.poll(None if timeout is None else timeout * 1000.0)

# -- helpers shared by Channel and Listener ------------------------------------------------

def _check_source(hub: Hub, source: Any) -> Any:
    if source is ANY:
        return source
    from ._channel import Channel
    if not isinstance(source, Channel):
        raise TypeError(f"source must be a Channel or ANY, not {type(source).__name__}")
    if source._hub is not hub:
        raise ValueError("source is not a channel of this receiver")
    return source


def _post(hub: Hub, owner: Any, tag: Any, source: Any, into: Any, own: Any = None) -> RecvRequest:
    tag = check_tag(tag, True)
    source = _check_source(hub, source)
    if own is not None:
        own._check_open()
    req = RecvRequest(hub, None)
    req.tag, req.source = tag, source
    req.into = None
    if into is not None:
        try:
            view = memoryview(into)
        except TypeError:
            raise TypeError(f"into must be a writable buffer, not {type(into).__name__}") from None
        if view.readonly:
            raise TypeError("into must be a writable buffer (this one is read-only)")
        if not view.c_contiguous:
            raise BufferError("into must be a contiguous buffer")
        req.into = view.cast("B") if (view.ndim != 1 or view.format != "B") else view
    hub.post(req)
    return req


def _iprobe(hub: Hub, owner: Any, tag: Any, source: Any) -> Optional[Status]:
    tag = check_tag(tag, True)
    source = _check_source(hub, source)
    hub.pump()
    with hub.lock:
        a = hub.match_queued(tag, source, False)
        if a is not None:
            return Status(a.tag, a.chan, a.nbytes)
    return None


def _check_probe_live(hub: Hub, tag: Any, source: Any) -> None:
    """Raise what a receive of (tag, source) would, if no live channel can
    give it a message."""
    dummy = RecvRequest(hub, None)
    dummy.tag, dummy.source, dummy.into = tag, source, None
    with hub.lock:
        hub._check_live(dummy)
    if dummy._done:
        raise dummy._error or EOFError("the peer closed the channel")


def _probe(hub: Hub, owner: Any, tag: Any, source: Any, timeout: Optional[float]) -> Status:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = _iprobe(hub, owner, tag, source)
        if st is not None:
            return st
        _check_probe_live(hub, tag, source)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        hub.progress(left)


def _poll_any(hub: Hub, chans: Optional[list], timeout: Optional[float]) -> bool:
    """Is a message (or the end of a channel) there for ``chans`` (None:
    every channel of the hub)?  Nothing is consumed from the rings, so a
    poller that watches their fds afterwards sees the same."""
    if timeout is not None and (timeout != timeout or timeout < 0):
        timeout = 0.0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with hub.lock:
            if hub.listener is not None:
                hub.listener._accept_ready()
            cs = list(hub.channels) if chans is None else chans
            for c in cs:
                if c._input_ready():
                    return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        hub.wait(left, cs)
        with hub.lock:
            for c in cs:
                if not c._has_bytes():
                    c._pump(True)        # the end of a channel shows here

