"""A thread whose result the test collects (tests/test_wait.py and the
conformance suite's ``Worker``)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class ResultThread(threading.Thread):
    """A daemon thread running ``fn(*args)`` that keeps its return value or
    exception; ``result()`` waits for it at most ``timeout`` (``deadline``
    unless given) and returns the one or raises the other."""

    def __init__(self, fn: Callable[..., Any], *args: Any, deadline: float = 10.0) -> None:
        super().__init__(daemon=True)
        self._fn, self._args, self._deadline = fn, args, deadline
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: Optional[float] = None) -> Any:
        timeout = self._deadline if timeout is None else timeout
        self.join(timeout)
        name = getattr(self._fn, "__name__", repr(self._fn))
        assert not self.is_alive(), f"{name} did not finish within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value
