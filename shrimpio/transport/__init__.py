"""asyncio over shrimpio: a uvloop-based loop with shared-memory transports.

``shrimpio.run(main)``, ``shrimpio.new_event_loop()``, ``EventLoopPolicy``
and ``install()`` (re-exported by ``shrimpio``); ``import shrimpio.patch``
makes plain ``asyncio.run`` use the shrimpio loop.
"""

from ._loop import EventLoopPolicy, Loop, install, new_event_loop, run
from ._transport import ShmTransport

__all__ = ["EventLoopPolicy", "Loop", "ShmTransport", "install", "new_event_loop", "run"]
