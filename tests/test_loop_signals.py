"""An exception raised by a Python signal handler leaves the loop.

In asyncio such an exception (a program's own ``raise`` on a signal, a test
runner's timeout on ``SIGALRM``) propagates out of ``run_until_complete``;
uvloop logs it and goes on, so a timeout could not stop a hung shrimpio loop.
Every test runs on asyncio's loop and on shrimpio's, so each also proves the
two behave alike.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, Callable, Iterator

import pytest

import shrimpio

LOOPS = {"asyncio": asyncio.new_event_loop, "shrimpio": shrimpio.new_event_loop}


class Raised(Exception):
    pass


class RaisedBase(BaseException):
    """Like pytest's ``Failed``: not an ``Exception``."""


@pytest.fixture(scope="module", autouse=True)
def libuv_initialised() -> None:
    """libuv opens a process-wide pipe for signals with its first loop and
    keeps it; open it before the per-test fd check starts counting."""
    shrimpio.new_event_loop().close()


@pytest.fixture(params=sorted(LOOPS))
def loop(request: Any) -> Iterator[asyncio.AbstractEventLoop]:
    lp = LOOPS[request.param]()
    yield lp
    lp.close()


class Pester:
    """Sends SIGUSR1 to this process every few milliseconds from a thread
    until stopped.  A signal whose handler runs while the loop executes a
    callback is that callback's exception (asyncio and uvloop agree); one
    that arrives while the loop waits must end the run, so the test sends
    until the loop has stopped."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.stop = threading.Event()
        self.sent = 0
        self.old = signal.signal(signal.SIGUSR1, handler)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02) and self.sent < 500:
            os.kill(os.getpid(), signal.SIGUSR1)
            self.sent += 1

    def __enter__(self) -> "Pester":
        return self

    def start(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(10)
        signal.signal(signal.SIGUSR1, self.old)


def _raiser(kind: type) -> Callable[..., None]:
    def handler(signum: int, frame: Any) -> None:
        raise kind(f"signal {signum}")
    return handler


def _swallowed(loop: asyncio.AbstractEventLoop) -> list:
    """Route the exception handler to a list (a signal that lands inside a
    callback is that callback's exception, logged by both loops)."""
    seen: list = []
    loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
    return seen


@pytest.mark.parametrize("kind", [Raised, RaisedBase])
def test_handler_exception_ends_run_until_complete(loop: asyncio.AbstractEventLoop, kind: type) -> None:
    _swallowed(loop)
    with Pester(_raiser(kind)) as pester:
        async def wait_forever() -> None:
            loop.call_soon(pester.start)
            await loop.create_future()
        with pytest.raises(kind, match="signal"):
            loop.run_until_complete(asyncio.wait_for(wait_forever(), 20))
    # The loop is still usable, as asyncio's is.
    assert loop.run_until_complete(asyncio.sleep(0, "again")) == "again"


def test_handler_exception_ends_run_forever(loop: asyncio.AbstractEventLoop) -> None:
    _swallowed(loop)
    with Pester(_raiser(Raised)) as pester:
        loop.call_soon(pester.start)
        guard = loop.call_later(20, loop.stop)
        with pytest.raises(Raised):
            loop.run_forever()
        guard.cancel()


def test_handler_exception_with_connection_waiting(loop: asyncio.AbstractEventLoop) -> None:
    """A shared-memory connection waiting for data (its ring watched by the
    loop) does not keep the exception in the loop."""
    _swallowed(loop)
    paths: list = []

    async def main(pester: Pester) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(1)
            w.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        paths.append(shrimpio.info(writer).get("path"))
        try:
            loop.call_soon(pester.start)
            await asyncio.wait_for(reader.read(1), 20)
        finally:
            writer.close()
            server.close()

    with Pester(_raiser(Raised)) as pester:
        task = loop.create_task(main(pester))
        with pytest.raises(Raised):
            loop.run_until_complete(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)
    expected = "shm" if isinstance(loop, shrimpio.Loop) else None
    if expected:
        assert paths == [expected]


def test_callback_exception_still_goes_to_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Only signal handlers' exceptions leave the loop: a callback's goes to
    the exception handler and the loop goes on (both loops)."""
    seen = _swallowed(loop)

    def bad() -> None:
        raise Raised("callback")

    loop.call_soon(bad)
    assert loop.run_until_complete(asyncio.sleep(0.01, "done")) == "done"
    assert [type(c.get("exception")) for c in seen] == [Raised]


def test_handler_that_returns_does_not_stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    got = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        got.set()

    async def main(pester: Pester) -> str:
        loop.call_soon(pester.start)
        deadline = loop.time() + 20
        while not got.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return "ran"

    with Pester(handler) as pester:
        assert loop.run_until_complete(main(pester)) == "ran"
    assert got.is_set()
