"""The shrimpio event loop: uvloop, plus shared-memory connections.

``Loop`` subclasses ``uvloop.Loop`` and overrides only the entry points that
can meet a shrimpio connection; everything else is uvloop's.  It is put
together from one mixin per responsibility:

* :mod:`._connect`: ``create_connection`` to a host and port (shrimpio
  sockets, asyncio's order of addresses);
* :mod:`._listen`: ``create_server`` (shrimpio listeners, served by
  :class:`._server.Server`);
* :mod:`._make_transport`: the transport a connected socket gets (a
  :class:`ShmTransport` over shared memory, uvloop's on kernel TCP through
  :mod:`._fallback`), ``connect_accepted_socket`` and ``start_tls``;
* :mod:`._sock`: the ``sock_*`` calls and sendfile;
* :mod:`._watch`: the fd callbacks (``add_reader`` ...) on shared-memory fds;
* :mod:`._signals`: exceptions of Python signal handlers leave the loop.

This module also holds the entry points: ``new_event_loop``, ``run``,
``EventLoopPolicy`` and ``install``.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from typing import Any, Callable, Optional

import uvloop

from ._connect import ConnectMixin
from ._listen import ListenMixin
from ._make_transport import MakeTransportMixin
from ._signals import SignalMixin
from ._sock import SockMixin
from ._watch import WatchMixin

__all__ = ["Loop", "new_event_loop", "run", "EventLoopPolicy", "install"]


class Loop(SignalMixin, SockMixin, WatchMixin, ConnectMixin, ListenMixin, MakeTransportMixin,
           uvloop.Loop):
    """``uvloop.Loop`` that runs shrimpio connections over shared memory."""

    def __init__(self) -> None:
        super().__init__()
        self._watch_init()

    def close(self) -> None:
        super().close()
        self._watch_close()
        if self._twin_timer is not None:
            self._twin_timer.cancel()
            self._twin_timer = None


def new_event_loop() -> Loop:
    """A new shrimpio event loop (a ``uvloop.Loop`` subclass)."""
    return Loop()


def run(main: Any, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
        debug: Optional[bool] = None, **run_kwargs: Any) -> Any:
    """Run a coroutine on a shrimpio loop, as ``uvloop.run`` / ``asyncio.run``."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory, **run_kwargs) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Event loop policy whose loops are shrimpio loops (as uvloop's)."""

    def _loop_factory(self) -> Loop:       # type: ignore[override]
        return new_event_loop()


def install() -> None:
    """Make shrimpio loops the default (``asyncio.set_event_loop_policy``)."""
    if sys.version_info >= (3, 12):
        warnings.warn("shrimpio.install() is deprecated in favor of shrimpio.run() "
                      "(asyncio event loop policies are deprecated since Python 3.12)",
                      DeprecationWarning, stacklevel=1)
    asyncio.set_event_loop_policy(EventLoopPolicy())
