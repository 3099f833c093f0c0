"""Local ports of shared-memory connections: one live connection per port, as TCP.

Theory of operation
-------------------
A client's shared-memory connection tells its peer a local address, as TCP
would: a real port, reserved by binding the program's socket.  But that
socket's fd becomes the connection's control socket, and the kernel then
forgets the port: the next bind may be given it again while the connection
lives, and two live connections would show the same address (1,000
connections of one process had 26 such pairs), so that a server keying its
clients by ``getpeername()`` mixes them up.

So a connection also *claims* its port for as long as it lives (C, in
``_fastpath_ctl.h``): a bit in this process's map, for its own connections,
and an open-file-description lock (``F_OFD_SETLK``) on byte ``port`` of the
registry's ports file (``<registry>/net-<ns>/.ports``, made with the
directory, and empty: locks may lie past the end of a file), for those of the
user's other processes.  The kernel
drops a process's locks when it dies, however it dies: no claim goes stale,
and nothing is mapped that a peer could truncate.  A port the kernel offers
that is claimed already is passed over: spare sockets are bound until it
offers one that is not.  A port the program bound itself is claimed if it is
free, and used as it is otherwise.

This module holds the ports file: opened at a process's first connect (one
fd for the process, like its stat table), closed by :func:`drop` once no
claim on it is live (tests check fds: ``_connection.drop_spares`` calls it),
and not shared with a forked child (whose locks would be its parent's: the
child opens its own).  Where the file cannot be opened, claims are this
process's own only, as before the file existed.

What is left: a kernel TCP socket of another program (or of another user) can
still be given a port a shared-memory connection holds; only shrimpio
connections of one user and network namespace see each other's claims.
"""

from __future__ import annotations

import os
import socket as _std
import stat
import threading
from typing import Optional

from ._fastpath import claim_port, give_port, use_ports_file
from ._control import PORTS_FILE

__all__ = ["ready", "claim", "give", "drop"]

_lock = threading.Lock()
_path: Optional[str] = None      # the registry directory whose file is in use (C holds its fd)
_live = 0                        # claims made on that file and not given back
_gen = 0                         # forks into this process (claims of an older one are not ours)


def ready(registry_dir: str) -> None:
    """Use ``registry_dir``'s ports file for the claims of the next connects
    (a string compare when it is in use already)."""
    global _path
    if registry_dir == _path:
        return
    with _lock:
        if registry_dir == _path or _live > 0:
            return                  # (claims live on the file in use: it stays)
        fd = _open(os.path.join(registry_dir, PORTS_FILE))
        old = use_ports_file(fd)
        _path = registry_dir
        if old >= 0:
            os.close(old)


def _open(path: str) -> int:
    """The ports file, opened for locks, or -1 (this process's own
    connections only) if it cannot be or is not a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return -1
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


def claimed(port: int) -> tuple:
    """Count a claim made (by ``stream_connect`` or :func:`claim`) for a
    connection: the token :func:`give` takes when it closes."""
    global _live
    with _lock:
        _live += 1
    return (port, _gen)


def claim(family: int, address: tuple, ours: bool) -> tuple[tuple, Optional[tuple]]:
    """Claim the port of ``address`` (our end of a connection being made):
    ``(address to tell the peer, token for give() or None)``.  ``ours``: we
    bound it, so another port may be taken if it is claimed already."""
    host, port = address[0], address[1]
    try:
        ip = _std.inet_pton(family, host)
    except (OSError, ValueError, TypeError):
        return address, None
    got, ok = claim_port(family, ip, port, ours)
    if not ok:
        return address, None
    if got != port:
        address = (host, got, *address[2:])
    return address, claimed(got)


def give(token: Optional[tuple]) -> None:
    """Give back a claim (the token from :func:`claimed`); None: nothing."""
    global _live
    if token is None:
        return
    port, gen = token
    give_port(port)
    if gen == _gen:
        with _lock:
            _live -= 1


def drop() -> None:
    """Close the ports file if no claim on it is live (it opens again at the
    next connect)."""
    global _path
    with _lock:
        if _live > 0 or _path is None:
            return
        old = use_ports_file(-1)
        _path = None
        if old >= 0:
            os.close(old)


def _forked() -> None:
    # The inherited fd is the parent's open file description: its locks
    # are the parent's, and a claim made through it would not stop the
    # parent from claiming the same port.  Our copy goes; the parent's
    # claims stay its own (this process's map still marks them).
    global _path, _live, _gen, _lock
    _lock = threading.Lock()
    old = use_ports_file(-1)
    if old >= 0:
        try:
            os.close(old)
        except OSError:
            pass
    _path, _live = None, 0
    _gen += 1


os.register_at_fork(after_in_child=_forked)
