"""shrimpio control plane: registry, control messages, fd passing, credentials.

Processes of one user on one host find each other through a *registry* of
named ``AF_UNIX``/``SOCK_SEQPACKET`` listening sockets in a directory only
that user can enter, one per network namespace (:mod:`shrimpio._registry`:
entries, staleness, ``SO_PEERCRED`` checks).  Over a connection to an entry
they exchange *control messages*: one datagram each, a small header and a
JSON object, with fds passed by ``SCM_RIGHTS``, everything received checked
as untrusted (:mod:`shrimpio._messages`).  :mod:`shrimpio._process` holds
the process-wide helpers both use (environment reads, exit hooks).

This module is the control plane's one import path: the layers above use
``_control.X`` for all of it.  It knows nothing about shared memory rings.
"""

from __future__ import annotations

from ._messages import (  # noqa: F401  (re-exported: the control plane's API)
    MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION, Message, ProtocolError, _close_fds, _parse,
    datagram_payload, decode_payload, error_reply, expect, header, recv_message,
    recv_payload, send_message, send_payload_fd,
)
from ._process import environ_data, getenv, on_exit  # noqa: F401
from ._registry import (  # noqa: F401
    MEMBER_SEP, PORTS_FILE, Registry, _SUFFIX, _bound_unix_paths, check_name, peer_credentials,
    registry_root,
)

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE", "MAX_FDS", "ProtocolError",
    "registry_root", "check_name", "peer_credentials", "Registry",
    "send_message", "send_payload_fd", "header", "datagram_payload", "Message", "recv_message", "recv_payload", "decode_payload",
    "expect", "error_reply", "getenv",
]
