"""``python -m shrimpio._chaos.proc ROLE JSON``: one chaos process (a
victim, an honest peer or a hostile one).  See common.py for how it talks
to the harness and what its exit code means."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
import threading
import traceback

from .common import EXIT_DATA, EXIT_ERROR, EXIT_HANG, EXIT_OK, DataError, HangError

_errors: list[str] = []


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(f"uncaught exception in thread {args.thread.name if args.thread else '?'}:\n{text}")
    _errors.append(text)
    code = EXIT_DATA if issubclass(args.exc_type, DataError) else \
        EXIT_HANG if issubclass(args.exc_type, HangError) else EXIT_ERROR
    sys.stderr.flush()
    os._exit(code)


def asyncio_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """An exception nobody handled in an asyncio callback or task is an
    uncaught exception of this process."""
    loop.default_exception_handler(context)
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        return          # asyncio's own report of EMFILE on accept: it pauses and goes on
    exc = context.get("exception")
    sys.stderr.flush()
    os._exit(EXIT_DATA if isinstance(exc, DataError) else EXIT_ERROR)


def main(argv: list[str]) -> int:
    role, args = argv[0], json.loads(argv[1])
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    threading.excepthook = _thread_hook
    if not args.get("unpatched"):
        import shrimpio.patch  # noqa: F401  (unmodified code under the patch)
    if args.get("api") == "asyncio":
        # uvloop opens a process-wide pipe with its first loop and keeps
        # it: before the baseline of fds is taken.
        import uvloop

        async def nothing() -> None:
            pass
        uvloop.run(nothing())
    from . import roles
    fn = roles.ROLES[role]
    try:
        fn(args)
    except DataError:
        traceback.print_exc()
        return EXIT_DATA
    except HangError:
        traceback.print_exc()
        return EXIT_HANG
    except BaseException:
        traceback.print_exc()
        return EXIT_ERROR
    return EXIT_ERROR if _errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
