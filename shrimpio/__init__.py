"""shrimpio: SHRIMP's virtual memory-mapped communication (VMMC) for Python.

Processes of one host exchange data through shared memory with no system
call on the data path.  Layers (see docs/ and the design notes):

* ``import shrimpio.patch`` / ``shrimpio run prog.py`` - unmodified socket
  programs get shared-memory connections; ``shrimpio.info(sock)`` says which
  path a connection took and why.
* ``shrimpio.vmmc`` - the VMMC API: ``Endpoint``, exported and imported
  buffers, deliberate update, remote fetch, notifications.
* ``shrimpio._fastpath`` - the data plane in Cython: ``Segment``, ``Ring``.
* ``shrimpio._control`` - the control plane: registry, handshake, fd passing.
"""

from ._fastpath import Ring, RingCorruptedError, Segment, get_busy_poll_us, set_busy_poll_us
from .socket import info
from .vmmc import Endpoint, ExportedBuffer, ImportedBuffer

__version__ = "0.1.0"

_ASYNCIO_NAMES = ("EventLoopPolicy", "Loop", "install", "new_event_loop", "run")


def __getattr__(name: str):
    # asyncio and uvloop are imported only by programs that use them.
    if name in _ASYNCIO_NAMES:
        from . import transport
        return getattr(transport, name)
    raise AttributeError(f"module 'shrimpio' has no attribute {name!r}")

__all__ = [
    "Endpoint",
    "EventLoopPolicy",
    "Loop",
    "install",
    "new_event_loop",
    "run",
    "ExportedBuffer",
    "ImportedBuffer",
    "Ring",
    "RingCorruptedError",
    "Segment",
    "get_busy_poll_us",
    "info",
    "set_busy_poll_us",
    "__version__",
]
