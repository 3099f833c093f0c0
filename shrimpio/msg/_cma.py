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

__all__ = ["copy_stats", "BufferRef", "available", "pull", "push", "verify", "stats", "new_bytes",
           "new_bytearray"]

stats = {"received_copied": 0, "sent_copied": 0}


def copy_stats() -> dict:
    """Bytes this process copied as a receiver and as a sender, all paths."""
    from ._msgfast import counters
    r, s = counters()
    return {"received_copied": stats["received_copied"] + r, "sent_copied": stats["sent_copied"] + s}


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Py_buffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_api = ctypes.pythonapi
_api.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
_api.PyObject_GetBuffer.restype = ctypes.c_int
_api.PyBuffer_Release.argtypes = [ctypes.POINTER(_Py_buffer)]
_api.PyBuffer_Release.restype = None
_api.PyBytes_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_api.PyBytes_FromStringAndSize.restype = ctypes.py_object
_api.PyByteArray_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_api.PyByteArray_FromStringAndSize.restype = ctypes.py_object

_libc = ctypes.CDLL(None, use_errno=True)
try:
    _readv = _libc.process_vm_readv
    _writev = _libc.process_vm_writev
except AttributeError:          # no such call in this libc: copies go through the rings
    _readv = _writev = None
else:
    for _f in (_readv, _writev):
        _f.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                       ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
        _f.restype = ctypes.c_ssize_t

#: Iovecs per call (the kernel's IOV_MAX).
_IOV_MAX = 1024


def available() -> bool:
    """Does this system have process_vm_readv/writev at all?"""
    return _readv is not None


class BufferRef:
    """A held buffer export of ``obj`` (contiguous, writable if asked): its
    address and length stay valid until ``release()``."""

    __slots__ = ("_view", "addr", "nbytes", "_held")

    def __init__(self, obj: Any, writable: bool = False) -> None:
        self._view = _Py_buffer()
        # PyBUF_SIMPLE (0) or PyBUF_WRITABLE (1): both refuse non-contiguous buffers.
        _api.PyObject_GetBuffer(obj, ctypes.byref(self._view), 1 if writable else 0)
        self._held = True
        self.addr = int(self._view.buf or 0)
        self.nbytes = int(self._view.len)

    def release(self) -> None:
        if self._held:
            self._held = False
            _api.PyBuffer_Release(ctypes.byref(self._view))

    def __del__(self) -> None:
        self.release()


def new_bytes(n: int) -> tuple[bytes, BufferRef]:
    """A new ``bytes`` of ``n`` bytes, not yet filled, and a reference to
    its storage (as C code fills a fresh bytes object before sharing it)."""
    b = _api.PyBytes_FromStringAndSize(None, n)
    ref = BufferRef.__new__(BufferRef)
    ref._view = None
    ref._held = False
    ref.addr = id(b) + _BYTES_OFFSET
    ref.nbytes = n
    return b, ref


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


def _iovs(pairs: Sequence[tuple[int, int]]) -> "ctypes.Array[_iovec]":
    arr = (_iovec * len(pairs))()
    for i, (addr, n) in enumerate(pairs):
        arr[i].base = addr
        arr[i].len = n
    return arr


def _copy(fn: Any, pid: int, local: Sequence[tuple[int, int]],
          remote: Sequence[tuple[int, int]]) -> int:
    """Copy the byte ranges ``local`` <-> ``remote`` (same total) with
    process_vm_readv/writev, resuming after partial transfers."""
    if fn is None:
        raise OSError(errno.ENOSYS, "process_vm_readv/writev are not available")
    total = sum(n for _, n in local)
    if total != sum(n for _, n in remote):
        raise ValueError("local and remote ranges differ in size")
    done = 0
    loc = [(a, n) for a, n in local if n]
    rem = [(a, n) for a, n in remote if n]
    while loc:
        lchunk, rchunk = loc[:_IOV_MAX], rem[:_IOV_MAX]
        want = min(sum(n for _, n in lchunk), sum(n for _, n in rchunk))
        got = fn(pid, _iovs(lchunk), len(lchunk), _iovs(rchunk), len(rchunk), 0)
        if got < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            raise OSError(e, f"cross-memory copy with pid {pid}: {os.strerror(e)}")
        if got == 0 and want:
            raise OSError(errno.EFAULT, f"cross-memory copy with pid {pid} moved nothing")
        done += got
        loc = _advance(loc, got)
        rem = _advance(rem, got)
    return done


def _advance(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = list(ranges)
    while n and out:
        a, k = out[0]
        if k <= n:
            n -= k
            out.pop(0)
        else:
            out[0] = (a + n, k - n)
            n = 0
    return out


def push(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> int:
    """Write our ranges into process ``pid``'s (the GIL is released)."""
    n = _copy(_writev, pid, local, remote)
    stats["sent_copied"] += n
    return n


def pull(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]]) -> int:
    """Read process ``pid``'s ranges into ours (the GIL is released)."""
    n = _copy(_readv, pid, local, remote)
    stats["received_copied"] += n
    return n


def verify(pid: int, addr: int, token: bytes) -> bool:
    """Is ``token`` at ``addr`` in process ``pid``, and may we access it?"""
    if _readv is None or pid <= 0 or addr <= 0:
        return False
    buf = ctypes.create_string_buffer(len(token))
    try:
        _copy(_readv, pid, [(ctypes.addressof(buf), len(token))], [(addr, len(token))])
    except OSError:
        return False
    return buf.raw == token


def ranges(refs: Iterable[BufferRef]) -> list[tuple[int, int]]:
    return [(r.addr, r.nbytes) for r in refs]
