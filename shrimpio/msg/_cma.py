"""Cross-memory copies between processes: the deliberate update of shrimpio.msg.

A large message's bytes go in *one* copy straight from the sender's buffer
to the receiver's destination with ``process_vm_writev`` (the sender copies
into a buffer the receiver posted: the receiver's CPU moves nothing) or
``process_vm_readv`` (the receiver copies out of the sender's buffer).  The
kernel checks, for every call, that the caller may access the other
process (same user, and Yama's ptrace scope); nothing else is trusted.

A peer names itself by pid in every frame that carries addresses, and by a
random *token* at an address of its memory, told once in the channel's
hello.  Before the first copy to or from a pid, :func:`verify` reads the
token there: a pid of another namespace, of an unrelated process, or one
we may not access, fails, and the channel then moves that message through
its rings instead.  A forked child holds the same token at the same
address, and may use the channel as its parent did.

Counters: ``stats`` counts the bytes this process copied as a receiver
(``received_copied``: pulled from a peer, or copied out of the rings or
the receive queue into a destination) and as a sender (``sent_copied``:
written into a peer's posted buffer, or into the rings).  Tests read them
to show where copies happen.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Iterable, Sequence

from ._msgfast import BufferRef, vm_copy

__all__ = ["copy_stats", "BufferRef", "available", "pull", "push", "verify", "stats", "new_bytes",
           "new_bytearray"]

stats = {"received_copied": 0, "sent_copied": 0}


def copy_stats() -> dict:
    """Bytes this process copied as a receiver and as a sender, all paths."""
    from ._msgfast import counters
    r, s = counters()
    return {"received_copied": stats["received_copied"] + r, "sent_copied": stats["sent_copied"] + s}


_api = ctypes.pythonapi
_api.PyBytes_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_api.PyBytes_FromStringAndSize.restype = ctypes.py_object
_api.PyByteArray_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_api.PyByteArray_FromStringAndSize.restype = ctypes.py_object

_libc = ctypes.CDLL(None, use_errno=True)
#: Does this libc have the calls (else copies go through the rings)?
_HAVE = hasattr(_libc, "process_vm_readv") and hasattr(_libc, "process_vm_writev")


def available() -> bool:
    """Does this system have process_vm_readv/writev at all?"""
    return _HAVE


def new_bytes(n: int) -> bytes:
    """A new ``bytes`` of ``n`` bytes, not yet filled (as C code fills a
    fresh bytes object before sharing it: see writable_view)."""
    return _api.PyBytes_FromStringAndSize(None, n)


def new_bytearray(n: int) -> bytearray:
    """A new ``bytearray`` of ``n`` bytes, not zero-filled (``bytearray(n)``
    would write every byte once before the copy does)."""
    return _api.PyByteArray_FromStringAndSize(None, n)


# Where a bytes object's data starts (CPython: ob_sval after the header).
_BYTES_OFFSET = bytes.__basicsize__ - 1


def writable_view(b: bytes) -> memoryview:
    """A writable view of a fresh bytes object's storage (see new_bytes):
    only for filling it before anyone else sees it."""
    n = len(b)
    arr = (ctypes.c_char * n).from_address(id(b) + _BYTES_OFFSET)
    return memoryview(arr).cast("B")


def _copy(write: bool, pid: int, local: Sequence[tuple[int, int]],
          remote: Sequence[tuple[int, int]]) -> int:
    if not _HAVE:
        raise OSError(errno.ENOSYS, "process_vm_readv/writev are not available")
    return vm_copy(write, pid, list(local), list(remote))


def push(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> int:
    """Write our ranges into process ``pid``'s (the GIL is released)."""
    n = _copy(True, pid, local, remote)
    stats["sent_copied"] += n
    return n


def pull(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> int:
    """Read process ``pid``'s ranges into ours (the GIL is released)."""
    n = _copy(False, pid, local, remote)
    stats["received_copied"] += n
    return n


def verify(pid: int, addr: int, token: bytes) -> bool:
    """Is ``token`` at ``addr`` in process ``pid``, and may we access it?"""
    if not _HAVE or pid <= 0 or addr <= 0:
        return False
    buf = ctypes.create_string_buffer(len(token))
    try:
        _copy(False, pid, [(ctypes.addressof(buf), len(token))], [(addr, len(token))])
    except OSError:
        return False
    return buf.raw == token


def ranges(refs: Iterable[BufferRef]) -> list[tuple[int, int]]:
    return [(r.addr, r.nbytes) for r in refs]
