"""Which socket object or shared-memory connection an fd is.

A shrimpio socket's fd is the control socket of its connection, so the fd
number alone says nothing: these tables map an fd number to its socket
object (``by_fd``, weak), and a file (``(st_dev, st_ino)`` of the control
socket) to its connection (``by_inode``), so that an fd made by
``os.dup``, ``socket.fromfd`` or inheritance finds its connection again.
Indexing a connection by inode costs an ``fstat``, which only adopting a
bare fd needs, so new connections wait in a list until then
(:func:`index_pending`).  ``detached`` holds the connections whose socket
object was ``detach()``-ed by shrimpio itself, owned by the bare fd until a
new object adopts it.  The pollers, the escape of an fd that leaves
shrimpio's hands and the ``os``-level hooks look connections up here.
"""

from __future__ import annotations

import errno
import os
import socket as _std
import threading
import weakref
from typing import TYPE_CHECKING, Optional

from . import _escape
from ._connection import Connection

if TYPE_CHECKING:
    from .socket import socket

#: Called with an fd whose file is about to be replaced, or that is about to
#: become (or stop being) a shared-memory connection or listener: pollers
#: that keep registrations (the patched epoll) put it where it now belongs.
fd_change_hooks: list = []


def fd_changing(fd: int) -> None:
    for hook in fd_change_hooks:
        hook(fd)


# fd -> socket object, for the pollers and fromfd (weak: objects die normally).
by_fd: "weakref.WeakValueDictionary[int, socket]" = weakref.WeakValueDictionary()
# (st_dev, st_ino) of a control socket -> its Connection, so that an fd made
# by os.dup/socket.fromfd/inheritance finds the connection again.
by_inode: "weakref.WeakValueDictionary[tuple[int, int], Connection]" = weakref.WeakValueDictionary()
# Connections whose socket object was detach()ed: the bare fd owns them until
# a new socket object adopts the fd.
detached: "dict[tuple[int, int], Connection]" = {}
# Connections not yet in by_inode: indexing one costs an fstat, and is
# only needed when a socket object is made from a bare fd, so it waits
# until then (index_pending).  A weak set: an entry goes with its
# connection (a list of weak references kept the dead ones until the next
# add, a few per closed connection, scattered over the heap: they kept the
# memory of every closed connection around them from going back).
unindexed: "weakref.WeakSet[Connection]" = weakref.WeakSet()


_unindexed_lock = threading.Lock()


def index_pending() -> None:
    """Put the connections made since the last call into by_inode (the
    inode of a connection's own doorbell fd is that of its control socket)."""
    with _unindexed_lock:
        pending = list(unindexed)
        unindexed.clear()
    for conn in pending:
        if not conn.closed:
            try:
                by_inode[inode(conn.bell_fd)] = conn
            except OSError:
                pass


def unindexed_add(conn: Connection) -> None:
    with _unindexed_lock:
        unindexed.add(conn)


def ebadf() -> OSError:
    """The error of a call on a closed socket (as the stdlib's)."""
    return OSError(errno.EBADF, "Bad file descriptor")


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def escape_passed_fds(ancdata: list) -> None:
    """Before fds go to another process in ``SCM_RIGHTS``: a shared-memory
    connection among them escapes to a kernel stream (the other process
    could only read its doorbell), an escaped one can no longer be taken
    back (see _escape), and a listener among them is shared from then on."""
    import array
    for item in ancdata:
        try:
            level, kind, data = item
        except (TypeError, ValueError):
            return                       # the stdlib raises its own error
        if level != _std.SOL_SOCKET or kind != _std.SCM_RIGHTS:
            continue
        fds = array.array("i")
        try:
            raw = memoryview(data).cast("B")
            fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
        except (TypeError, ValueError):
            continue
        for fd in fds:
            conn = conn_of_fd(fd)
            if conn is not None:
                _escape.escape_conn(conn, "fd sent to another process", fd)
            _escape.shared(fd)
            lsock = by_fd.get(fd)
            if lsock is not None and lsock._lst is not None and lsock.fileno() == fd:
                # A listener another process may accept on too: as after
                # a fork (see socket._accept_nowait and Listener.close).
                lsock._lst.share_with_others()
                os.set_blocking(fd, False)


def conn_of_fd(fd: int) -> Optional[Connection]:
    """The live shared-memory connection whose control socket ``fd`` is
    (a socket object's fd or a bare copy of one), or None."""
    sock = by_fd.get(fd)
    if sock is not None and sock._shm is not None and sock.fileno() == fd:
        return None if sock._shm.closed else sock._shm
    if not (by_inode or detached or unindexed):
        return None
    try:
        key = inode(fd)
    except OSError:
        return None
    if unindexed and key not in by_inode and key not in detached:
        index_pending()
    conn = detached.get(key) or by_inode.get(key)
    return None if conn is None or conn.closed else conn
