"""The one place that decides: shared memory or kernel TCP, and why.

Theory of operation
-------------------
A stream connection goes over shared memory when all of these hold, checked
in this order (the first that fails is the recorded *reason*):

0. the socket's class may use shared memory: a class whose owner polls the
   fd in the kernel (eventlet's green sockets, :mod:`shrimpio._eventlet`)
   names its reason in ``_only_tcp`` (:func:`class_rule`);
1. shrimpio is enabled (``SHRIMPIO_DISABLE`` unset) - reason ``"disabled"``;
2. no user rule keeps this port/address on TCP - ``"disabled by rule"``;
3. the destination is an address of this host, in this network namespace -
   ``"remote host"``;
4. a shrimpio listener for that address and port is in the registry -
   ``"no shrimpio listener"``;
5. it is served by this user - ``"other user"``;
6. the handshake succeeds - ``"handshake refused: ..."``.

Rules come from ``SHRIMPIO_TCP`` (a comma-separated list of ``port``,
``host``, ``host:port`` or ``[v6]:port``; such destinations stay on TCP) and
from :func:`add_tcp_rule` at run time.  Listeners obey the same rules for
their own address, so a rule can keep a whole service on TCP.

"Address of this host" is decided by the kernel: an address we can bind a UDP
socket to is local (``EADDRNOTAVAIL`` means it is not).  Results are cached
per address; the network namespace does not change under a running process.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket as _std
import threading
from typing import NamedTuple, Optional

from ._control import environ_data, getenv

__all__ = ["Route", "class_rule", "decide_client", "listener_allowed", "is_local_address", "add_tcp_rule",
           "clear_tcp_rules", "entry_name", "enabled"]

SHM = "shm"
TCP = "tcp"

_local_cache: dict[str, bool] = {}
_rules_lock = threading.Lock()
_runtime_rules: list[tuple[Optional[str], Optional[int]]] = []
_rules_version = 0          # bumped when _runtime_rules change (see env_key)


class Route(NamedTuple):
    """Where a connection goes: ``path`` is ``"shm"`` or ``"tcp"``;
    ``reason`` says why it is TCP (empty for shm)."""

    path: str
    reason: str


SHM_ROUTE = Route(SHM, "")


def class_rule(sock: object) -> Optional[Route]:
    """The TCP route of ``sock`` if its class must stay on kernel TCP (rule
    0 above), else None."""
    reason = getattr(sock, "_only_tcp", None)
    return None if reason is None else Route(TCP, reason)


def enabled() -> bool:
    """False when ``SHRIMPIO_DISABLE`` is set to anything but ``""``/``"0"``."""
    return getenv("SHRIMPIO_DISABLE") in (None, "", "0")


def _parse_rule(text: str) -> tuple[Optional[str], Optional[int]]:
    text = text.strip()
    if not text:
        raise ValueError("empty rule")
    if text.isdigit():
        return None, int(text)
    if text.startswith("["):                       # [v6] or [v6]:port
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
        return str(ipaddress.ip_address(host)), port
    if text.count(":") == 1:                       # host:port
        host, port = text.split(":")
        return str(ipaddress.ip_address(host)) if host else None, int(port)
    return str(ipaddress.ip_address(text)), None


def _env_rules() -> "tuple[tuple[Optional[str], Optional[int]], ...]":
    return _parse_rules(getenv("SHRIMPIO_TCP") or "")


@functools.lru_cache(maxsize=16)
def _parse_rules(spec: str) -> "tuple[tuple[Optional[str], Optional[int]], ...]":
    try:
        return tuple(_parse_rule(part) for part in spec.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"bad SHRIMPIO_TCP rule in {spec!r}: {exc}") from None


def add_tcp_rule(rule: str) -> None:
    """Keep connections matching ``rule`` (``"8080"``, ``"127.0.0.2"``,
    ``"127.0.0.1:8080"``, ``"[::1]:8080"``) on kernel TCP."""
    global _rules_version
    parsed = _parse_rule(rule)
    with _rules_lock:
        _runtime_rules.append(parsed)
        _rules_version += 1


def clear_tcp_rules() -> None:
    """Forget the rules added with :func:`add_tcp_rule`."""
    global _rules_version
    with _rules_lock:
        _runtime_rules.clear()
        _rules_version += 1


def _ruled_out(host: str, port: int) -> bool:
    if not _runtime_rules and not getenv("SHRIMPIO_TCP"):
        return False
    try:
        host = str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        pass
    for rhost, rport in _env_rules() + tuple(_runtime_rules):
        if (rhost is None or rhost == host) and (rport is None or rport == port):
            return True
    return False


def is_local_address(host: str) -> bool:
    """Is ``host`` (a numeric address) an address of this host?"""
    cached = _local_cache.get(host)
    if cached is not None:
        return cached
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if addr.is_loopback:
        local = True
    elif addr.is_unspecified or addr.is_multicast:
        local = addr.is_unspecified        # connect() to 0.0.0.0 / :: reaches this host
    else:
        family = _std.AF_INET6 if addr.version == 6 else _std.AF_INET
        probe = _std.socket(family, _std.SOCK_DGRAM)
        try:
            probe.bind((host, 0))
            local = True
        except OSError as exc:
            local = exc.errno != errno.EADDRNOTAVAIL
        finally:
            probe.close()
    _local_cache[host] = local
    return local


@functools.lru_cache(maxsize=1024)
def entry_name(family: int, host: str, port: int, v6only: bool = False) -> str:
    """Registry entry of a listener on ``(host, port)``; wildcard hosts are
    spelt ``0.0.0.0`` / ``::`` so that clients can find them.  An IPv6
    wildcard listener with ``IPV6_V6ONLY`` gets an entry of its own
    (``tcp6only-``): IPv4 clients must not find it, as the kernel does not
    let them reach it."""
    host = str(ipaddress.ip_address(host.split("%")[0]))
    if family == _std.AF_INET6 and v6only:
        return f"tcp6only-{host}-{port}"
    return f"tcp{6 if family == _std.AF_INET6 else 4}-{host}-{port}"


@functools.lru_cache(maxsize=1024)
def candidate_entries(family: int, host: str, port: int) -> "tuple[str, ...]":
    """Registry entries a client to ``(host, port)`` tries, most specific first."""
    addr = ipaddress.ip_address(host.split("%")[0])
    names = [entry_name(family, host, port)]
    if family == _std.AF_INET6:
        if addr.ipv4_mapped is not None:          # ::ffff:a.b.c.d reaches v4 listeners too
            names += [entry_name(_std.AF_INET, str(addr.ipv4_mapped), port),
                      entry_name(_std.AF_INET, "0.0.0.0", port)]
        names.append(entry_name(family, "::", port))
        names.append(entry_name(family, "::", port, v6only=True))
    else:
        if addr.is_unspecified:
            names.append(entry_name(family, "127.0.0.1", port))
        names.append(entry_name(family, "0.0.0.0", port))
        names.append(entry_name(_std.AF_INET6, "::", port))   # dual-stack wildcard listener
    return tuple(dict.fromkeys(names))


_ENV_NAMES = (b"SHRIMPIO_DISABLE", b"SHRIMPIO_TCP", b"SHRIMPIO_REGISTRY", b"SHRIMPIO_SEGMENT")


def env_key() -> tuple:
    """Everything a client's route and registry depend on besides the
    destination (the variables, the run-time rules, the user): equal keys,
    equal decisions, so the socket layer can remember them."""
    data = environ_data()
    if data is None:
        values = tuple(os.environ.get(n.decode()) for n in _ENV_NAMES)
    else:
        values = tuple(map(data.get, _ENV_NAMES))
    return values + (_rules_version, os.geteuid())


def decide_client(host: str, port: int) -> Route:
    """Static checks before looking at the registry (steps 1-3)."""
    if not enabled():
        return Route(TCP, "disabled")
    if _ruled_out(host, port):
        return Route(TCP, "disabled by rule")
    if not is_local_address(host):
        return Route(TCP, "remote host")
    if not _sealable_segments():
        # A listener maps only segments sealed against shrinking (one that
        # the peer could truncate would kill the mapper with SIGBUS).
        return Route(TCP, "segments cannot be sealed (SHRIMPIO_SEGMENT=shm)")
    return SHM_ROUTE


def _sealable_segments() -> bool:
    """Does this process make memfd segments (sealed against shrinking)?"""
    return getenv("SHRIMPIO_SEGMENT") != "shm" and hasattr(os, "memfd_create")


def listener_allowed(host: str, port: int) -> Route:
    """May a listener on ``(host, port)`` offer shared memory?"""
    if not enabled():
        return Route(TCP, "disabled")
    if _ruled_out(host, port):
        return Route(TCP, "disabled by rule")
    return Route(SHM, "")
