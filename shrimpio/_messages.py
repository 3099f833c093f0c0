"""Control messages: one datagram each on a ``SOCK_SEQPACKET`` socket, with fds.

Theory of operation
-------------------
A control message is one datagram (``SOCK_SEQPACKET`` keeps boundaries)::

    '!4sHHI'  magic b'SHRM', version, flags (reserved, sent as 0, ignored),
              payload length
    payload   compact UTF-8 JSON object {"kind": str, ...body}

plus at most ``MAX_FDS`` descriptors in one ``SCM_RIGHTS`` control message.
Everything received is untrusted: any malformed datagram raises
:class:`ProtocolError`, and descriptors that came with it are closed first,
so a misbehaving peer can never make us leak an fd.  Received descriptors are
close-on-exec.  This module knows nothing about shared memory rings.
"""

from __future__ import annotations

import array
import errno
import json
import operator
import os
import select
import socket
import struct
import time
from typing import NamedTuple, Sequence

from ._fastpath import recvmsg_fds, sendmsg_fds

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE", "MAX_FDS", "ProtocolError", "Message",
    "send_message", "send_payload_fd", "header", "datagram_payload", "recv_message",
    "recv_payload", "decode_payload", "expect", "error_reply",
]

#: The kernel's poll, whatever shrimpio.patch does to select.poll (these
#: waits watch kernel fds only).
_real_poll = select.poll

PROTOCOL_VERSION: int = 1
MAX_MESSAGE: int = 4096        # bytes of one datagram, header included
MAX_FDS: int = 4               # fds one message may carry

_MAGIC = b"SHRM"
_HEADER = struct.Struct("!4sHHI")
_INT_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * _INT_SIZE)
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_ERROR_TEXT_MAX = 600                  # chars; keeps any 'error' reply < MAX_MESSAGE
# Plain ints: the socket module's are enums, and mixing them in arithmetic
# goes through the enum machinery (microseconds per message).
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class ProtocolError(ConnectionError):
    """A peer sent something that is not a valid control message (bad magic, version, length, JSON, too many fds, truncated)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (errno.EPROTO, args[0])      # give it an errno for error_reply
        super().__init__(*args)


class Message(NamedTuple):
    kind: str
    body: dict       # the JSON object without 'kind'
    fds: list[int]   # received fds, now owned by the caller (close-on-exec set on them)


def _close_fds(fds: list[int]) -> None:
    """Close every fd in `fds` and empty the list, so nobody closes them twice."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def send_message(sock: socket.socket, kind: str, body: dict | None = None,
                 fds: Sequence[int] = ()) -> None:
    """Send one control datagram {'kind': kind, **body}, with `fds` passed by SCM_RIGHTS."""
    if not isinstance(kind, str):
        raise TypeError(f"message kind must be str, not {type(kind).__name__}")
    obj: dict = {"kind": kind}
    if body:
        if "kind" in body:
            raise ValueError("message body must not contain the key 'kind'")
        obj.update(body)
    fd_list = [operator.index(fd) for fd in fds]
    if len(fd_list) > MAX_FDS:
        raise ValueError(f"a control message carries at most {MAX_FDS} fds, not {len(fd_list)}")
    payload = _ENCODER.encode(obj).encode("utf-8")
    data = header(len(payload)) + payload
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"{kind!r} control message is {len(data)} bytes, "
                         f"more than MAX_MESSAGE ({MAX_MESSAGE})")
    sent = _sendmsg(sock, data, fd_list)
    if sent != len(data):        # cannot happen on SOCK_SEQPACKET; never send half a message
        raise OSError(errno.EMSGSIZE, f"short send of a control message ({sent}/{len(data)})")


def _sendmsg(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    if sock.gettimeout() is None:           # a blocking socket: one system call, in C
        return sendmsg_fds(sock.fileno(), data, fds)
    ancdata = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], ancdata, _MSG_NOSIGNAL)   # the socket's timeout applies


def header(length: int) -> bytes:
    """The header of a control datagram whose payload is ``length`` bytes."""
    return _HEADER.pack(_MAGIC, PROTOCOL_VERSION, 0, length)


def send_payload_fd(sock: int, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one control datagram whose payload (the UTF-8 JSON object, with
    its ``kind``) the caller built, over the blocking socket ``sock`` (an
    fd): the fast path of :func:`send_message` for messages sent per
    connection."""
    data = header(len(payload)) + payload
    if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
        raise ValueError("control message too long, or too many fds")
    sent = sendmsg_fds(sock, data, fds)
    if sent != len(data):
        raise OSError(errno.EMSGSIZE, f"short send of a control message ({sent}/{len(data)})")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def datagram_payload(data: bytes, msg_flags: int, fds: list[int]) -> bytes:
    """Check a received datagram's size, fds and header; return its payload."""
    if msg_flags & _MSG_TRUNC or len(data) > MAX_MESSAGE:
        raise ProtocolError(f"control message longer than MAX_MESSAGE ({MAX_MESSAGE} bytes)")
    if msg_flags & _MSG_CTRUNC or len(fds) > MAX_FDS:
        raise ProtocolError(f"control message carried more than {MAX_FDS} fds "
                            "(ancillary data truncated)")
    if len(data) < _HEADER.size:
        raise ProtocolError(f"short control message ({len(data)} bytes, "
                            f"the header alone is {_HEADER.size})")
    magic, version, _flags, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a shrimpio control message")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks control protocol v{version}, "
                            f"this is v{PROTOCOL_VERSION}")
    payload = data[_HEADER.size:]
    if length != len(payload):
        raise ProtocolError(f"control message length field says {length} bytes "
                            f"but {len(payload)} arrived")
    return payload


def decode_payload(payload: bytes, fds: list[int]) -> Message:
    """The Message of a checked payload (see :func:`recv_payload`); raises
    ProtocolError, leaving ``fds`` to the caller."""
    try:
        obj = _DECODER.decode(payload.decode("utf-8"))
    except (ValueError, RecursionError) as e:     # UnicodeDecodeError, JSONDecodeError too
        raise ProtocolError(f"control message payload is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"control message payload is a JSON {type(obj).__name__}, "
                            "not an object")
    kind = obj.pop("kind", None)
    if not isinstance(kind, str):
        raise ProtocolError("control message has no string 'kind'")
    return Message(kind, obj, fds)


def _parse(data: bytes, msg_flags: int, fds: list[int]) -> Message:
    return decode_payload(datagram_payload(data, msg_flags, fds), fds)


def recv_message(sock: socket.socket, timeout: float | None = None) -> Message:
    """Receive and validate one control datagram; see the module docstring."""
    payload, fds = recv_payload(sock, timeout)
    try:
        return decode_payload(payload, fds)
    except BaseException:
        _close_fds(fds)
        raise


def recv_payload(sock: socket.socket, timeout: float | None = None) -> tuple[bytes, list[int]]:
    """Receive one control datagram and check its header: (the UTF-8 JSON
    payload, still to be decoded, and the fds that came with it, now the
    caller's).  For callers that recognise a message of theirs by its
    bytes before a generic decode (see :func:`decode_payload`)."""
    # A socket in blocking mode is read by one system call in C; one with a
    # timeout of its own through the socket module, which honours it.
    blocking = sock.gettimeout() is None
    flags = _MSG_CMSG_CLOEXEC
    deadline = None
    wait = False
    if timeout is not None:
        flags |= _MSG_DONTWAIT
        # The message is usually there already or about to be (a client
        # sends its hello right after connecting): try at once, wait only
        # if it is not.  A socket with a timeout of its own would wait
        # inside recvmsg first, so for those wait here from the start.
        wait = not blocking
    while True:
        if wait:
            if deadline is None:
                deadline = time.monotonic() + timeout
            poller = _real_poll()
            poller.register(sock.fileno(), select.POLLIN)
            remaining = max(0.0, deadline - time.monotonic())
            if not poller.poll(remaining * 1000.0):
                raise TimeoutError(errno.ETIMEDOUT,
                                   f"no control message within {timeout}s")
        try:
            if blocking:
                data, fds, msg_flags = recvmsg_fds(sock.fileno(), MAX_MESSAGE + 1, MAX_FDS, flags)
            else:
                data, ancdata, msg_flags, _addr = sock.recvmsg(MAX_MESSAGE + 1, _ANCBUF, flags)
                fds = None
        except BlockingIOError:
            if timeout is None:
                raise
            if deadline is None:
                deadline = time.monotonic() + timeout
            wait = True         # not there yet, or a false alarm (another reader won)
            continue
        break
    try:
        if fds is None:
            fds = []
            for level, ctype, cdata in ancdata:
                if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[:len(cdata) - len(cdata) % _INT_SIZE])
                    fds.extend(got)
        if not _MSG_CMSG_CLOEXEC:
            for fd in fds:
                os.set_inheritable(fd, False)
        if not data and not fds and not msg_flags & _MSG_CTRUNC:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed the control connection")
        return datagram_payload(data, msg_flags, fds), fds
    except BaseException:
        _close_fds(fds)
        raise


def expect(message: Message, kind: str) -> Message:
    """Return `message` if it is of `kind`; raise the OSError an 'error' reply carries, or ProtocolError."""
    if message.kind == "error":
        _close_fds(message.fds)
        code = message.body.get("errno")
        text = message.body.get("message", "")
        if (isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 4096
                or not isinstance(text, str)):
            # (An errno out of range made os.strerror raise OverflowError
            # out of the caller: found by the chaos suite.)
            raise ProtocolError(f"malformed error reply: {message.body!r}"[:300])
        raise OSError(code, text or os.strerror(code))
    if message.kind != kind:
        _close_fds(message.fds)
        raise ProtocolError(f"expected a {kind!r} control message, got {message.kind!r}")
    return message


def error_reply(sock, exc: OSError | int, message: str = "") -> None:
    """Send an 'error' message {'errno', 'message'}; a vanished asker is not an error."""
    if isinstance(exc, OSError):
        code = exc.errno or errno.EIO
        text = message or exc.strerror or str(exc) or os.strerror(code)
    else:
        code = operator.index(exc)
        text = message or os.strerror(code)
    try:
        send_message(sock, "error", {"errno": code, "message": str(text)[:_ERROR_TEXT_MAX]})
    except (BrokenPipeError, ConnectionResetError):
        pass
