"""shrimpio.msg: NX-style messages between processes, over shared memory.

Channels carry tagged messages between processes of one host (shared
memory) or of two hosts (kernel TCP, decided by the socket layer).
Any picklable object travels; its buffers (bytes, bytearrays, numpy
arrays, anything with the buffer protocol, including those pickle protocol
5 hands out of band) are never pickled, and large ones move in one copy:
the sender writes them straight into the receive buffer the receiver
posted (VMMC-2's transfer redirection), or the receiver copies them out
of the sender's buffer when its receive came late.

::

    from shrimpio import msg

    srv = msg.listen(("127.0.0.1", 5000))      # serves many senders
    m = srv.recv()                             # Message(payload, tag, source)
    m.source.send(("ok", m.payload), tag=m.tag)

    ch = msg.connect(("127.0.0.1", 5000))
    ch.send({"x": numpy.arange(10**6)}, tag=7)
    reply = ch.recv(tag=7).payload

``Pipe``, ``Listener``, ``Client`` and ``Connection`` are a drop-in for
``multiprocessing.connection``.  See docs/msg.md.
"""

from ._base import ANY, BufferTooShort, Message, ProtocolError, Status
from ._cma import copy_stats
from ._channel import RNDV_MIN, CancelledError, Channel, Request
from ._listen import Pipe, connect, listen
from ._listen import Listener as MsgListener
from ._mpc import Client, Connection, Listener, wait

__all__ = [
    "ANY",
    "BufferTooShort",
    "CancelledError",
    "Channel",
    "Client",
    "Connection",
    "Listener",
    "Message",
    "MsgListener",
    "Pipe",
    "ProtocolError",
    "RNDV_MIN",
    "Request",
    "Status",
    "connect",
    "copy_stats",
    "listen",
    "wait",
]
