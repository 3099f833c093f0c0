"""Names shared by the modules of shrimpio.msg: ANY, Message, Status, errors."""

from __future__ import annotations

from multiprocessing import BufferTooShort
from typing import Any, NamedTuple

__all__ = ["ANY", "Message", "Status", "ProtocolError", "BufferTooShort", "check_tag"]


class _Any:
    """Matches any tag or any source (``shrimpio.msg.ANY``)."""

    _instance = None

    def __new__(cls) -> "_Any":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"

    def __reduce__(self) -> str:
        return "ANY"


ANY: Any = _Any()

#: Largest tag: tags are 63-bit non-negative integers.
MAX_TAG = (1 << 63) - 1


class Message(NamedTuple):
    """A received message: the object sent, its tag, and the channel it came
    by (reply with ``msg.source.send(...)``)."""

    payload: Any
    tag: int
    source: Any


class Status(NamedTuple):
    """What ``probe``/``iprobe`` saw: the next matching message's tag,
    source, and size in bytes (its pickle and buffers)."""

    tag: int
    source: Any
    nbytes: int


class ProtocolError(ConnectionResetError):
    """The peer sent something no shrimpio.msg peer sends; the channel is
    closed."""


def check_tag(tag: Any, any_ok: bool) -> Any:
    """A tag argument: an int in [0, 2**63), or ANY where allowed."""
    if tag is ANY:
        if any_ok:
            return tag
        raise TypeError("a message is sent with a tag, not ANY")
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise TypeError(f"tag must be an int{' or ANY' if any_ok else ''}, not {type(tag).__name__}")
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be in [0, 2**63), got {tag}")
    return int(tag)
