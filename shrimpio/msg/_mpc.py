"""A drop-in for multiprocessing.connection: Connection, Listener, Client, Pipe.

A :class:`Connection` is a :class:`~shrimpio.msg.Channel` with the
``multiprocessing.connection.Connection`` API and behaviour (its errors and
their messages included): ``send``/``recv`` objects, ``send_bytes``/
``recv_bytes``/``recv_bytes_into``, ``poll``, ``fileno``, ``close``.  Only
the path differs: objects' buffers (numpy arrays, bytearrays inside them)
travel out of band, and large ones in one copy (see :mod:`._channel`);
``recv_bytes_into`` posted before a large message arrives receives it with
no copy by this process.  The tagged API of the channel is there too
(``recv_message``, ``irecv``, ``isend``, tags).

Listener and Client speak shrimpio.msg, not multiprocessing's wire format:
both ends must use this module (a program swaps one import).  A (host,
port) address is a shrimpio socket (shared memory on this host); a string
is a Unix socket path (kernel socket).  ``authkey`` runs multiprocessing's
own HMAC challenge over the connection.
"""

from __future__ import annotations

import multiprocessing.connection as _mpc
import os
import socket as _std
import tempfile
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

from ._base import ANY, BufferTooShort, ProtocolError
from ._channel import Channel
from ._frame import P_PICKLE, decode, mp_loads
from ._listen import Pipe, _sock_class, listening

__all__ = ["Connection", "Listener", "Client", "Pipe", "wait"]


class Connection(Channel):
    """``multiprocessing.connection.Connection`` over a shrimpio.msg channel."""

    def __init__(self, sock: Any, readable: bool = True, writable: bool = True) -> None:
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        self._readable = readable
        self._writable = writable
        super().__init__(sock)
        if self._fp is not None:
            self._fp.readable = readable
            self._fp.writable = writable

    # -- multiprocessing's checks ------------------------------------------------

    def _check_closed(self) -> None:
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self) -> None:
        if not self._readable:
            raise OSError("connection is write-only")

    def _check_writable(self) -> None:
        if not self._writable:
            raise OSError("connection is read-only")

    def _bad_message_length(self) -> None:
        if self._writable:
            self._readable = False
            if self._fp is not None:
                self._fp.readable = False
        else:
            self.close()
        raise OSError("bad message length")

    @property
    def readable(self) -> bool:
        """True if the connection is readable"""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the connection is writable"""
        return self._writable

    def fileno(self) -> int:
        """File descriptor or handle of the connection"""
        self._check_closed()
        return self._wire.fileno()

    # -- sending ----------------------------------------------------------------------

    def send_bytes(self, buf: Any, offset: int = 0, size: Optional[int] = None) -> None:
        """Send the bytes data from a bytes-like object"""
        self._check_closed()
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._isend(m[offset:offset + size], 0, True, True).wait()

    def send(self, obj: Any, tag: int = 0) -> None:
        """Send a (picklable) object"""
        self._check_closed()
        self._check_writable()
        super().send(obj, tag)

    def isend(self, obj: Any, tag: int = 0) -> Any:
        self._check_closed()
        self._check_writable()
        return super().isend(obj, tag)

    # -- receiving ---------------------------------------------------------------------

    def _recv_raw(self, into: Any = None) -> Any:
        self._check_closed()
        self._check_readable()
        return self.irecv(ANY, ANY, into=into).wait()

    def recv(self) -> Any:  # type: ignore[override]
        """Receive a (picklable) object"""
        self._check_closed()
        self._check_readable()
        req = self.irecv()
        req.wait()
        return mp_loads(*req._raw)

    def recv_bytes(self, maxlength: Optional[int] = None) -> bytes:
        """Receive bytes data as a bytes object."""
        self._check_closed()
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        req = self.irecv()
        req.wait()
        data = _as_bytes(req)
        if maxlength is not None and len(data) > maxlength:
            self._bad_message_length()
        return data

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive bytes data into a writeable bytes-like object.
        Return the number of bytes read."""
        self._check_closed()
        self._check_readable()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            elif offset > bytesize:
                raise ValueError("offset too large")
            flat = m.cast("B") if (m.ndim != 1 or m.format != "B") else m
            req = self.irecv(into=flat[offset:])
            try:
                msg = req.wait()
            except BufferTooShort as e:
                raise BufferTooShort(_as_bytes_msg(e.args[0], req)) from None
            if req._raw[0] == P_PICKLE:
                # An object sent with send(): its pickle, as multiprocessing gives.
                data = _as_bytes(req)
                if bytesize < offset + len(data):
                    raise BufferTooShort(data)
                flat[offset:offset + len(data)] = data
                return len(data)
            return len(msg.payload)

    def _ended(self, error: Optional[BaseException]) -> None:
        # As multiprocessing's: a peer that exited (even without closing)
        # is the end of the connection, EOFError, not a reset.
        if isinstance(error, ConnectionResetError) and not isinstance(error, ProtocolError):
            error = None
        super()._ended(error)

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether there is any input available to be read"""
        self._check_closed()
        self._check_readable()
        return super().poll(timeout)

    def close(self) -> None:
        """Close the connection"""
        super().close()

    def __reduce__(self) -> Any:
        raise TypeError("a shrimpio.msg Connection goes to a child process by fork "
                        "(multiprocessing's default on Linux), not by pickling")

    def __repr__(self) -> str:
        return f"<shrimpio.msg.Connection {'closed' if self._closed else ('shm' if self.shm else 'tcp')}>"

    # The channel keeps the raw payload type of each receive for the methods above.
    def _deliver(self, req: Any, ptype: int, tag: int, body: Any, objs: list, short: bool) -> None:
        req._raw = (ptype, body, objs)
        super()._deliver(req, ptype, tag, body, objs, short)


def _as_bytes(req: Any) -> bytes:
    """The message as multiprocessing's recv_bytes gives it."""
    ptype, body, objs = req._raw
    if ptype == P_PICKLE:
        if not objs:
            return bytes(body)
        return bytes(ForkingPickler.dumps(decode(P_PICKLE, body, objs)))
    return bytes(objs[0])


def _as_bytes_msg(msg: Any, req: Any) -> bytes:
    return _as_bytes(req)


# -- Listener / Client -----------------------------------------------------------------------

def _default_address() -> Any:
    return ("127.0.0.1", 0)


class Listener:
    """``multiprocessing.connection.Listener`` for shrimpio.msg connections."""

    def __init__(self, address: Any = None, family: Optional[str] = None, backlog: int = 1,
                 authkey: Optional[bytes] = None) -> None:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        family = family or (_mpc.address_type(address) if address is not None else "AF_INET")
        if address is None:
            address = _default_address() if family == "AF_INET" else _unix_path()
        if family == "AF_INET":
            sock = _sock_class()(_std.AF_INET6 if ":" in address[0] else _std.AF_INET,
                                 _std.SOCK_STREAM)
        elif family == "AF_UNIX":
            sock = _std.socket(_std.AF_UNIX, _std.SOCK_STREAM)
        else:
            raise ValueError(f"unrecognized family {family!r}")
        listening(sock, address, backlog, blocking=True)
        self._sock: Optional[Any] = sock
        self._family = family
        self._address = sock.getsockname()
        self._unlink = address if family == "AF_UNIX" else None
        self._pid = os.getpid()            # (a forked child's close() leaves the path)
        self._authkey = authkey
        self._last_accepted = None

    def accept(self) -> Connection:
        """Accept a connection on the bound socket or named pipe of `self`."""
        if self._sock is None:
            raise OSError("listener is closed")
        s, self._last_accepted = self._sock.accept()
        s.setblocking(True)
        c = Connection(s)
        if self._authkey is not None:
            _mpc.deliver_challenge(c, self._authkey)
            _mpc.answer_challenge(c, self._authkey)
        return c

    def close(self) -> None:
        """Close the bound socket or named pipe of `self`."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            if self._unlink is not None and self._pid == os.getpid():
                try:
                    os.unlink(self._unlink)
                except OSError:
                    pass

    @property
    def address(self) -> Any:
        return self._address

    @property
    def last_accepted(self) -> Any:
        return self._last_accepted

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unix_path() -> str:
    return tempfile.mktemp(prefix="shrimpio-msg-", dir=tempfile.gettempdir())


def Client(address: Any, family: Optional[str] = None, authkey: Optional[bytes] = None) -> Connection:
    """Returns a connection to the address of a `Listener`"""
    family = family or _mpc.address_type(address)
    if family == "AF_INET":
        sock = _sock_class()(_std.AF_INET6 if ":" in address[0] else _std.AF_INET, _std.SOCK_STREAM)
    elif family == "AF_UNIX":
        sock = _std.socket(_std.AF_UNIX, _std.SOCK_STREAM)
    else:
        raise ValueError(f"unrecognized family {family!r}")
    try:
        sock.setblocking(True)
        sock.connect(address)
        c = Connection(sock)
    except BaseException:
        sock.close()
        raise
    if authkey is not None:
        if not isinstance(authkey, bytes):
            c.close()
            raise TypeError("authkey should be a byte string")
        _mpc.answer_challenge(c, authkey)
        _mpc.deliver_challenge(c, authkey)
    return c


_std_wait = _mpc.wait


def wait(object_list: Any, timeout: Optional[float] = None) -> list:
    """``multiprocessing.connection.wait`` that also knows shrimpio.msg
    connections (messages they already hold, and their rings); importing
    shrimpio.msg makes ``multiprocessing.connection.wait`` this function
    (it hands lists without shrimpio.msg connections to the stdlib's)."""
    import time
    objs = list(object_list)
    if not any(isinstance(o, Channel) for o in objs):
        return _std_wait(objs, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready = [o for o in objs if isinstance(o, Channel) and not o.closed and o.poll(0)]
        others = [o for o in objs if not isinstance(o, Channel)]
        if others:
            ready += _std_wait(others, 0)
        if ready:
            return ready
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return []
        from .. import _poll
        p = _poll.poll()
        for o in objs:
            if isinstance(o, Channel):
                if o.closed:
                    continue
            p.register(o if isinstance(o, int) else o.fileno(), _poll.POLLIN)
        p.poll(None if left is None else left * 1000.0)


def install() -> None:
    """Make ``multiprocessing.connection.wait`` :func:`wait` (done on import)."""
    if _mpc.wait is _std_wait:
        _mpc.wait = wait


install()
