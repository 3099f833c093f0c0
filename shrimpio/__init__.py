"""shrimpio: SHRIMP's virtual memory-mapped communication (VMMC) for Python.

Processes of one host exchange data through shared memory with no system
call on the data path.  Layers (docs/architecture.md draws them):

* ``import shrimpio.patch`` / ``shrimpio run prog.py`` - unmodified socket
  programs get shared-memory connections; ``shrimpio.info(sock)`` says which
  path a connection took and why.
* ``shrimpio.run(main())``, ``shrimpio.new_event_loop()``,
  ``shrimpio.EventLoopPolicy`` - asyncio on the shrimpio loop (a
  ``uvloop.Loop`` whose local connections are shared memory).
* ``shrimpio.vmmc`` - the VMMC API: ``Endpoint``, exported and imported
  buffers, deliberate update, remote fetch, notifications.
* ``shrimpio._fastpath`` - the data plane in Cython: ``Segment``, ``Ring``.
* ``shrimpio._control`` - the control plane: registry, handshake, fd passing.

asyncio and uvloop are imported only when the asyncio names are used (they
would double the time ``import shrimpio`` takes).
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any, Callable, Coroutine, TypeVar

try:
    from ._fastpath import Ring, RingCorruptedError, Segment, get_busy_poll_us, set_busy_poll_us
except ImportError as _exc:         # pragma: no cover - depends on how it was installed
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _exc.name != "shrimpio._fastpath" or not _os.path.exists(
            _os.path.join(_here, "..", "setup.py")):
        raise
    raise ImportError(
        f"shrimpio is being imported from its source tree ({_os.path.dirname(_here)}), where its "
        "C extension shrimpio._fastpath is not built.  Either build it here: "
        "`pip install -e .` (or `python setup.py build_ext --inplace`), or install shrimpio "
        "(`pip install .`) and run Python from another directory.",
        name=_exc.name, path=_exc.path) from None
from .socket import info
from .vmmc import Endpoint, ExportedBuffer, ImportedBuffer

if TYPE_CHECKING:
    import asyncio

    from .transport import EventLoopPolicy, Loop

__version__ = "0.1.0"

_T = TypeVar("_T")


def run(main: Coroutine[Any, Any, _T], *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        debug: bool | None = None, **run_kwargs: Any) -> _T:
    """Run the coroutine ``main`` on a new shrimpio loop and return its
    result, as ``asyncio.run`` / ``uvloop.run`` do (``loop_factory``:
    another loop, as ``asyncio.Runner`` takes).  Connections between two
    shrimpio processes of this host then go over shared memory, without
    ``shrimpio.patch``."""
    from . import transport
    if loop_factory is None:
        loop_factory = transport.new_event_loop
    return transport.run(main, loop_factory=loop_factory, debug=debug, **run_kwargs)


def new_event_loop() -> Loop:
    """A new shrimpio event loop (a ``uvloop.Loop`` subclass, as
    ``uvloop.new_event_loop``)."""
    from . import transport
    return transport.new_event_loop()


def install() -> None:
    """Make shrimpio loops asyncio's default (``asyncio.set_event_loop_policy``
    with :class:`EventLoopPolicy`); deprecated with event loop policies since
    Python 3.12: prefer :func:`run`."""
    from . import transport
    transport.install()


# The classes, whose bases are asyncio's and uvloop's, come from
# shrimpio.transport on first use (typed above for type checkers; listed by
# dir() and so by help()).
_ASYNCIO_CLASSES = ("EventLoopPolicy", "Loop")


def __getattr__(name: str) -> Any:
    if name in _ASYNCIO_CLASSES:
        from . import transport
        value = getattr(transport, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shrimpio' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ASYNCIO_CLASSES))


__all__ = [
    "Endpoint",
    "EventLoopPolicy",
    "ExportedBuffer",
    "ImportedBuffer",
    "Loop",
    "Ring",
    "RingCorruptedError",
    "Segment",
    "__version__",
    "get_busy_poll_us",
    "info",
    "install",
    "new_event_loop",
    "run",
    "set_busy_poll_us",
]
