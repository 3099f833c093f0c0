"""``multiprocessing.connection`` on shared memory.

``Listener.accept()`` and ``Client()`` connect a socket, then hand its
``detach()``-ed fd to a ``Connection`` that reads and writes the fd with
``os.read``/``os.write``.  On a shared-memory connection that fd would escape
to a kernel stream (:mod:`shrimpio._escape`: correct, but every message then
takes a relay's hop).  Under the patch, the socket ``Listener``/``Client``
return a :class:`ShmConnection` instead when the socket is on shared memory:
the same ``Connection`` (wire format, ``poll``, ``wait``, pickling to another
process), whose bytes go through the socket object's own calls.  Kernel
sockets (another host, an unpatched peer) get the stdlib's ``Connection``.
"""

from __future__ import annotations

import io
import multiprocessing.connection as _mpc
from multiprocessing import reduction as _reduction
from typing import Any

__all__ = ["ShmConnection", "install", "uninstall"]

_real_client = _mpc.SocketClient
_real_accept = _mpc.SocketListener.accept


class ShmConnection(_mpc.Connection):
    """A ``multiprocessing.connection.Connection`` over a shrimpio socket's
    own send and receive calls (its ``fileno()`` is the socket's, so
    ``multiprocessing.connection.wait`` sees it through the patched pollers)."""

    def __init__(self, sock: Any, readable: bool = True, writable: bool = True) -> None:
        self._sock = sock
        sock.setblocking(True)
        super().__init__(sock.fileno(), readable, writable)

    def _close(self, _close: Any = None) -> None:
        self._sock.close()

    def _send(self, buf: Any, write: Any = None) -> None:
        self._sock.sendall(buf)

    def _recv(self, size: int, read: Any = None) -> io.BytesIO:
        buf = io.BytesIO()
        remaining = size
        while remaining > 0:
            chunk = self._sock.recv(min(remaining, 1 << 20))
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf


def _client(address: Any) -> Any:
    import socket
    family = _mpc.address_type(address)
    s = socket.socket(getattr(socket, family))
    try:
        s.setblocking(True)
        s.connect(address)
    except BaseException:
        s.close()
        raise
    if getattr(s, "_shm", None) is not None:
        return ShmConnection(s)
    return _mpc.Connection(s.detach())


def _accept(self: Any) -> Any:
    s, self._last_accepted = self._socket.accept()
    if getattr(s, "_shm", None) is None:
        s.setblocking(True)
        return _mpc.Connection(s.detach())
    return ShmConnection(s)


def install() -> None:
    """Route the socket Listener and Client of multiprocessing.connection
    through ShmConnection (called once the module is imported)."""
    _mpc.SocketClient = _client
    _mpc.SocketListener.accept = _accept
    # Sent to another process, it goes as any Connection: its fd (which
    # escapes on the way, see _escape) rebuilt as a plain Connection there.
    _reduction.register(ShmConnection, _mpc.reduce_connection)


def uninstall() -> None:
    _mpc.SocketClient = _real_client
    _mpc.SocketListener.accept = _real_accept
