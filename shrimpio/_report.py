"""``SHRIMPIO_REPORT=file``: one JSON line per connection, by every patched
process (appended with ``O_APPEND``, so processes and forked children can
share the file).  This is how one sees, from outside an unmodified program,
which path its connections took::

    {"pid": 1234, "path": "shm", "reason": "", "local": [...], "peer": [...],
     "bytes_sent": 5, "bytes_received": 5}

A connection's line is written when its socket closes (or is collected);
one still open when the process exits (a ``makefile()`` never closed, a
socket or transport the program just left) writes it at exit, with
``"open_at_exit": true`` (see ``shrimpio._sockinfo.report_open``: at
interpreter exit, and at the end of a multiprocessing child).  A process
killed by a signal, or leaving by ``os._exit`` outside multiprocessing,
writes no line for what it left open.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import _process

__all__ = ["connection_closing"]


def connection_closing(record: dict[str, Any]) -> None:
    """Append ``record`` to the report file, if one is configured."""
    path = os.environ.get("SHRIMPIO_REPORT")
    if not path:
        return
    line = (json.dumps(dict(record, pid=_process.pid), default=list) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return        # a report is a diagnostic: never break the program for it
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
