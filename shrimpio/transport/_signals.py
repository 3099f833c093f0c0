"""Exceptions raised by Python signal handlers leave the loop, as in asyncio.

Theory of operation.  In asyncio a Python signal handler runs while the
loop waits in ``select``: an exception it raises (``KeyboardInterrupt``, a
test runner's timeout, a program's own ``raise`` on ``SIGALRM`` or
``SIGTERM``) propagates out of ``select`` and so out of ``run_forever`` and
``run_until_complete``.  uvloop waits in C instead; the C handler writes the
signal number to the loop's wake-up socket, and the Python handler runs in
the callback that reads that socket (``Loop._read_from_self``).  uvloop's
callbacks pass every exception but ``KeyboardInterrupt`` and ``SystemExit``
to the loop's exception handler, which logs it: the program goes on as if the
handler had not raised, so a timeout cannot stop a hung loop.

The exception handler is the one place such an exception passes through, so
``SignalMixin.call_exception_handler`` recognises it there (the failing
handle is the wake-up reader), keeps it, and stops the loop; ``run_forever``
raises it once uvloop's own ``run_forever`` has returned.  Exceptions of
ordinary callbacks still go to the exception handler, as in both asyncio and
uvloop.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["SignalMixin"]

# uvloop names the handle that reads its signal wake-up socket so.
_SIGNAL_READER = "Loop._read_from_self"


class SignalMixin:
    """Makes exceptions raised by signal handlers propagate out of
    ``run_forever``/``run_until_complete``, as they do in asyncio."""

    _signal_error: Optional[BaseException] = None

    def call_exception_handler(self, context: dict) -> None:
        exc = context.get("exception")
        handle = context.get("handle")
        if exc is not None and handle is not None and _SIGNAL_READER in repr(handle):
            if self._signal_error is None:
                self._signal_error = exc
            self.stop()                                 # type: ignore[attr-defined]
            return
        super().call_exception_handler(context)         # type: ignore[misc]

    def run_forever(self) -> None:
        self._signal_error = None
        try:
            super().run_forever()                       # type: ignore[misc]
        finally:
            exc, self._signal_error = self._signal_error, None
        if exc is not None:
            try:
                raise exc
            finally:
                del exc
