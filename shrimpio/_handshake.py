"""Setting up a shared-memory stream connection: the client's connect and the listener's accept.

Theory of operation
-------------------
(docs/control-plane.md has the whole picture and the measurements.)

The client decides once per destination (and environment) whether it may
use shared memory and which registry entries may serve it
(:func:`destination`, remembered).  Per connection it takes a spare kit
(segment with two ring headers, space socketpair) and makes *one* call into
C, :func:`~shrimpio._fastpath.stream_connect`: dial the entry, check the
listener's uid, bind the user's socket to (destination, 0) for its local
address, send the hello with the kit's two fds.  Only what does not fit
that call (no spare kit, a socket bound already, a stale or busy entry, a
timeout) goes the general way, here in Python, with the same checks.  Then
the :class:`~shrimpio._connection.Connection` attaches the rings and the
registry socket is ``dup2``-ed onto the user's fd (its number never
changes); the registry socket's own fd stays the connection's doorbell.

The listener's :func:`accept_shm` makes one call into C per client,
:func:`~shrimpio._fastpath.stream_accept` (accept4, ``SO_PEERCRED``, the
doorbell fd, a busy-poll for the hello, recvmsg with fds, the space fd's
type), then checks the hello in :func:`accept_hello` exactly as it would
any peer's: everything in it is untrusted, and anything wrong refuses the
client (its control socket is closed: it reads EOF) and takes the next.
A client whose hello is not there after the busy-poll is not waited for
(a silent one would hold up every other client, and in asyncio the whole
loop): it waits on the :class:`Listener`, whose fds to watch then include
its control socket, until its hello comes or HELLO_WAIT runs out.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import os
import re
import socket as _std
import _socket as _csocket
import threading
import time
from typing import Any, Optional, Sequence

from . import _connection, _control, _route
from ._connection import DEFAULT_RING, Connection, Kit, describe_error, ring_capacity
from ._fastpath import Segment, get_busy_poll_us, stream_accept, stream_connect, stream_hello

__all__ = ["ACCEPT_SPIN", "Listener", "accept_shm", "connect_shm", "registry"]

HELLO_KIND = "stream"
PROTOCOL_VERSION = 1
_AF_INET6 = int(_std.AF_INET6)
_AF_UNIX, _SOCK_SEQPACKET = int(_std.AF_UNIX), int(_std.SOCK_SEQPACKET)
_STREAM = int(_std.SOCK_STREAM)
_SNDBUF, _RCVBUF = int(_std.SO_SNDBUF), int(_std.SO_RCVBUF)
_family = _csocket.socket.family.__get__
# A control message's header up to its length field (see _control).
_PRE = _control.header(0)[:8]

# The stream hello, a control message built from a template: it is sent
# once per connection, and a generic JSON encoding costs more than the
# system call.  Addresses go in as JSON strings (json_str); the client's
# port goes between head and tail (filled in by C on the fast path).
_HEAD = ('{"kind":"%s","v":%d,' % (HELLO_KIND, PROTOCOL_VERSION)
         + '"c2s":%d,"s2c":%d,"size":%d,"client":[%s,').encode()
_TAIL = b'],"server":[%s,%d]}'

# The same hello as the listener recognises it: a strict subset of JSON
# (numbers without leading zeros, host strings without escapes), so that a
# match means exactly what the JSON would; anything else takes the generic
# decode.  Either way the values are then checked alike.
HELLO_RE = re.compile(
    (r'\{"kind":"%s","v":%d,' % (HELLO_KIND, PROTOCOL_VERSION)
     + r'"c2s":(0|[1-9][0-9]{0,18}),"s2c":(0|[1-9][0-9]{0,18}),"size":(0|[1-9][0-9]{0,18}),'
     r'"client":\["([0-9A-Za-z.:%_-]{1,64})",(0|[1-9][0-9]{0,5})\],'
     r'"server":\["([0-9A-Za-z.:%_-]{1,64})",(0|[1-9][0-9]{0,5})\]\}').encode())


@functools.lru_cache(maxsize=256)
def json_str(text: str) -> bytes:
    return json.dumps(str(text), ensure_ascii=False).encode()


@functools.lru_cache(maxsize=256)
def hello_parts(c2s: int, s2c: int, size: int, client_host: str, server: tuple) -> tuple[bytes, bytes]:
    """The hello's bytes before and after the client's port."""
    return (_HEAD % (c2s, s2c, size, json_str(client_host)),
            _TAIL % (json_str(server[0]), int(server[1])))


def hello(c2s: int, s2c: int, size: int, client: tuple, server: tuple) -> bytes:
    """The whole hello payload (the general way; C joins the parts itself)."""
    head, tail = hello_parts(c2s, s2c, size, client[0], tuple(server[:2]))
    return head + b"%d" % int(client[1]) + tail


@functools.lru_cache(maxsize=64)
def _layout_ok(c2s: int, s2c: int, size: int) -> bool:
    """Are these a valid pair of ring capacities and the segment size that
    holds them?  (Cached: clients use a few sizes; the arguments are exact
    ints, checked by the caller.)"""
    return (ring_capacity(c2s) == c2s and ring_capacity(s2c) == s2c
            and size == Connection.layout(c2s, s2c)[1])


# -- addresses --------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _literal(host: str) -> Optional[str]:
    """Canonical form of a numeric address, None for a name."""
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return None


def _numeric(family: int, host: str, port: int) -> Optional[str]:
    """Numeric form of a destination host, or None if it cannot be resolved
    without the network (then the kernel decides, on TCP)."""
    literal = _literal(host)
    if literal is not None:
        return literal
    try:
        infos = _std.getaddrinfo(host, port, family, _std.SOCK_STREAM)
    except OSError:
        return None
    return infos[0][4][0] if infos else None


@functools.lru_cache(maxsize=1024)
def host_as_seen(family: int, host: str) -> str:
    """``host`` as a socket of ``family`` reports it.  Like the kernel, an
    IPv6 socket sees an IPv4 peer as ``::ffff:a.b.c.d`` (dual-stack
    listener), and an IPv4 socket sees a v4-mapped address unmapped."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if family == _std.AF_INET6:
        if ip is not None and ip.version == 4:
            host = f"::ffff:{ip}"
        elif ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
            host = f"::ffff:{ip.ipv4_mapped}"      # inet_ntop's spelling, not ::ffff:7f00:1
    elif ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        host = str(ip.ipv4_mapped)
    return host


def addr_tuple(family: int, addr: Any) -> tuple:
    """An address as a socket of ``family`` reports it (see host_as_seen)."""
    host, port = host_as_seen(family, addr[0]), int(addr[1])
    if family == _AF_INET6:
        return (host, port, 0, 0)
    return (host, port)


@functools.lru_cache(maxsize=1024)
def unspecified(host: str) -> bool:
    """Is the numeric address ``host`` 0.0.0.0 / :: ?"""
    return ipaddress.ip_address(host.split("%")[0]).is_unspecified


def _loopback(family: int) -> str:
    return "::1" if family == _AF_INET6 else "127.0.0.1"


# -- the client's static decisions -------------------------------------------------

_registries: dict[str, _control.Registry] = {}
_reg_lock = threading.Lock()


def registry() -> _control.Registry:
    root = _control.registry_root()
    reg = _registries.get(root)
    if reg is None:
        with _reg_lock:
            reg = _registries.get(root) or _control.Registry.open(root)
            _registries[root] = reg
    return reg


class _Destination:
    """What a connect to one shrimpio-eligible destination needs that does
    not change between connects: the registry, its candidate entries
    (name, path), the numeric address the kernel would connect to, the
    peer address as the socket reports it, and, for the one-call connect,
    the packed address to bind to and our address as the peer sees it."""

    __slots__ = ("reg", "names", "entries", "flat", "numeric", "peer", "ip", "local_host", "listed",
                 "turn")

    def __init__(self, reg: _control.Registry, family: int, numeric: str, port: int) -> None:
        self.reg = reg
        self.names = _route.candidate_entries(family, numeric, port)
        self.listed = -1.0          # when the groups were last listed (see register_listener)
        self.turn = 0
        self.entries: tuple = ()
        self.list_members()
        if unspecified(numeric):
            # connect() to 0.0.0.0 / :: reaches this host over loopback, and
            # the kernel reports the loopback address as the peer.
            numeric = _loopback(family)
        self.numeric = numeric
        self.peer = addr_tuple(family, (numeric, port))
        try:
            self.ip = _std.inet_pton(family, numeric)
            self.local_host = host_as_seen(family, _std.inet_ntop(family, self.ip))
        except (OSError, ValueError):
            self.ip, self.local_host = b"", ""      # the general way only


    def list_members(self) -> None:
        """Each candidate entry with the other members of its group: a
        tuple per candidate of (name, path) pairs."""
        reg = self.reg
        members = reg.members(self.names)
        self.entries = tuple(tuple((n, os.fsencode(reg._entry_path(n))) for n in [name, *members[name]])
                             for name in self.names)
        # No group: the same list every time.
        self.flat = tuple(g[0] for g in self.entries) if all(len(g) == 1 for g in self.entries) else None
        self.listed = time.monotonic()

    def in_turn(self) -> "Sequence[tuple[str, bytes]]":
        """The entries to try for the next connect: each group's members
        starting from the next one in turn (one connect each, in turn)."""
        if time.monotonic() - self.listed > MEMBERS_TTL:
            self.list_members()
        if self.flat is not None:
            return self.flat
        self.turn += 1
        out = []
        for group in self.entries:
            if len(group) == 1:
                out.append(group[0])
            else:
                k = self.turn % len(group)
                out.extend(group[k:] + group[:k])
        return out


# (_route.env_key(), family, numeric host, port) -> the TCP Route that rules
# the destination out, or its _Destination: a connect's static decisions,
# remembered (the key holds all they depend on).
_client_routes: dict[tuple, Any] = {}


def destination(family: int, host: str, port: int) -> "_route.Route | _Destination":
    numeric = _numeric(family, host, port)
    if numeric is None:
        return _route.Route(_route.TCP, "unresolvable host")
    key = (_route.env_key(), family, numeric, port)
    known = _client_routes.get(key)
    if known is None:
        known = _route.decide_client(numeric, port)
        if known.path == _route.SHM:
            try:
                known = _Destination(registry(), family, numeric, port)
            except (OSError, ValueError) as exc:
                # An unusable registry (bad owner or mode, an entry path too
                # long...) costs the fast path, never the connection.
                return _route.Route(_route.TCP, f"registry unusable: {exc}")
        if len(_client_routes) >= 1024:
            _client_routes.clear()
        _client_routes[key] = known
    return known


# -- connect ---------------------------------------------------------------------

def connect_shm(sock: Any, address: Any, kit_later: bool = False) -> bool:
    """Connect ``sock`` (a shrimpio socket, TCP, not connected) over shared
    memory if the route allows and a shrimpio listener answers; False (with
    the reason recorded on ``sock``) to go by TCP.  ``kit_later``: build the
    spare connect kit when this connection first waits for its peer rather
    than now (see _connection)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return False        # let the stdlib raise its own TypeError
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return False
    family = _family(sock)
    dest = destination(family, host, port)
    if type(dest) is not _Destination:
        sock._route = dest
        return False
    bufs = sock._bufs
    c2s = ring_capacity(bufs.get(_SNDBUF, DEFAULT_RING))
    s2c = ring_capacity(bufs.get(_RCVBUF, DEFAULT_RING))
    # A ready kit (no system call) lets the hello go in the same call as
    # the registry connect, so the listener finds it when it looks.
    kit = _connection.take_kit(c2s, s2c)
    timeout = sock.gettimeout()
    user_fd = sock.fileno()
    try:
        ctl, lport, reason = _dial(sock, dest, family, timeout, user_fd, kit, c2s, s2c)
    except BaseException:
        _connection.give_back(kit)
        raise
    if ctl < 0:
        _connection.give_back(kit)
        sock._route = _route.Route(_route.TCP, reason)
        return False
    try:
        if lport:                   # the hello went with the dial
            sock._unbound = False
            local = (dest.local_host, lport) if family != _AF_INET6 else (dest.local_host, lport, 0, 0)
        else:
            local = sock._local_address(dest.numeric)
            if kit is None:
                kit = Kit(c2s, s2c)
            seg = kit.segment
            _control.send_payload_fd(ctl, hello(c2s, s2c, seg.size, local, dest.peer),
                                     (seg.fileno(), kit.theirs.fileno()))
        # ctl is the doorbell fd the connection keeps.  Should this fail,
        # closing ctl tells the listener: EOF.
        conn = Connection(kit.segment, ctl, kit.mine, client=True, caps=(c2s, s2c),
                          local=local, peer=dest.peer)
    except OSError as exc:
        if kit is not None:
            kit.close()
        os.close(ctl)
        sock._route = _route.Route(_route.TCP, describe_error(exc))
        return False
    except BaseException:
        if kit is not None:
            kit.close()
        os.close(ctl)
        raise
    kit.theirs.close()
    kit.segment.close_fd()          # the listener has it; our mapping stays
    os.dup2(ctl, user_fd, inheritable=False)
    _connection.connected()
    if timeout is not None or _std.getdefaulttimeout() is not None:
        # O_NONBLOCK went with the old file; the registry socket's file is
        # in blocking mode.
        sock.settimeout(timeout)
    sock._install(conn)
    if c2s != DEFAULT_RING or s2c != DEFAULT_RING:
        pass                        # spare kits have the default sizes only
    elif kit_later:
        conn.kit_due = True
    else:
        # The listener is busy with our hello: a good time to get the next
        # connect's kit ready.
        _connection.refill()
    return True


def _dial(sock: Any, dest: _Destination, family: int, timeout: Optional[float], user_fd: int,
          kit: "Kit | None", c2s: int, s2c: int) -> tuple[int, int, str]:
    """Connect to the first live candidate entry: (control fd, our port if
    the hello went too else 0, "") or (-1, 0, why not)."""
    fast = kit is not None and sock._unbound and dest.ip
    if fast:
        seg = kit.segment
        head, tail = hello_parts(c2s, s2c, seg.size, dest.local_host, dest.peer[:2])
        seg_fd, space_fd = seg.fileno(), kit.theirs.fileno()
    else:
        head = tail = b""
        seg_fd = space_fd = -1
    reason = "no shrimpio listener"
    for name, path in dest.in_turn():
        try:
            ctl, lport = stream_connect(path, timeout, user_fd, family, dest.ip, _PRE, head,
                                        tail, seg_fd, space_fd)
            if ctl == -errno.ENOENT:
                continue
            if ctl < 0:
                dest.listed = -1.0      # a member may have gone: list them again next time
                # A stale entry, a full backlog, an error: the registry's
                # general way sorts them out (and says why).
                ctl, lport = dest.reg.connect(name, timeout=timeout, raw=True).detach(), 0
            return ctl, lport, ""
        except FileNotFoundError:
            continue
        except PermissionError:
            return -1, 0, "other user"
        except OSError as exc:
            return -1, 0, describe_error(exc)
        except ValueError as exc:   # e.g. entry path too long for a Unix socket
            return -1, 0, f"registry unusable: {exc}"
    return -1, 0, reason


def local_address(sock: Any, dest: str) -> tuple:
    """Our address as the peer sees it: bound if the user bound us, else a
    real ephemeral port reserved by binding (released when the fd is
    replaced, as a closed TCP port would be)."""
    family = _family(sock)
    src = dest if not unspecified(dest) else _loopback(family)
    host, port = "", 0
    if sock._unbound:
        # Nobody bound it (through this object): no need to ask.  If
        # someone did behind our back, bind() says so (EINVAL).
        try:
            _csocket.socket.bind(sock, (src, 0))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            sock._unbound = False
            host, port = _csocket.socket.getsockname(sock)[:2]
    if port == 0:
        try:
            host, port = _csocket.socket.getsockname(sock)[:2]
        except OSError:
            host, port = "", 0
    if port == 0:
        _csocket.socket.bind(sock, (src, 0))
        host, port = _csocket.socket.getsockname(sock)[:2]
    if unspecified(host):
        host = dest
    return addr_tuple(family, (host, port))


# -- listeners sharing an address ---------------------------------------------------
#
# Listeners that share an address through SO_REUSEPORT (worker processes of
# one server) each get a registry entry: the first the address's own name,
# the others that name + "+2", "+3"...  A client spreads its connects over
# the group's live entries in turn (the kernel spreads TCP ones by a hash of
# the addresses), learning of members that came or went by listing the
# registry at most once a second, or at once when an entry failed it.

#: Listeners of one address that may take shared-memory clients.
MAX_MEMBERS = 64
#: How long a client trusts its list of a group's members (seconds).
MEMBERS_TTL = 1.0


def register_listener(sock: Any, name: str, backlog: int) -> tuple[str, _std.socket]:
    """The registry entry for a listening ``sock``: ``(its name, the
    listening Unix socket)``.  An address whose entry is live already gets
    a member entry if ``sock`` shares the address on purpose (SO_REUSEPORT);
    otherwise (or with MAX_MEMBERS taken) ``FileExistsError`` says why."""
    reg = registry()
    try:
        return name, reg.listen(name, backlog)
    except FileExistsError:
        if not sock.getsockopt(_std.SOL_SOCKET, getattr(_std, "SO_REUSEPORT", -1)):
            raise FileExistsError("another listener holds the shrimpio entry") from None
    for k in range(2, MAX_MEMBERS + 1):
        member = f"{name}{_control.MEMBER_SEP}{k}"
        try:
            return member, reg.listen(member, backlog)
        except FileExistsError:
            continue
    raise FileExistsError(f"{MAX_MEMBERS} listeners share the address already")


# -- accept ----------------------------------------------------------------------

#: accept()'s busy-poll budget in units of the rings' (SHRIMPIO_BUSY_POLL_US).
#: The wait it covers is a client's whole turn (its close, then its next
#: connect's set-up), several data hand-offs long.
ACCEPT_SPIN = 4
#: Longest a client that connected may take to send its hello.
HELLO_WAIT = 5.0
#: Connected clients whose hello has not come yet, at most per listener
#: (past it the oldest is dropped: a flood of silent clients costs fds only
#: up to here).
MAX_WAITING = 64


def accept_spin_top() -> float:
    """Most seconds accept() busy-polls before it sleeps (0 when
    ``SHRIMPIO_BUSY_POLL_US=0`` turns every busy-poll off)."""
    return get_busy_poll_us() * ACCEPT_SPIN / 1e6


class Listener:
    """The registry half of a listening shrimpio socket.

    ``spin`` is the adaptive busy-poll budget of ``accept()`` (seconds), by
    the rules of the rings' (``_adapt_spin`` in ``_fastpath.pyx``): a spin
    that caught a client keeps it, a sleep that a longer spin would have
    avoided grows it, a longer sleep halves it (down to 1/16 of the budget),
    so an idle server spins little."""

    def __init__(self, name: str, usock: _std.socket) -> None:
        self.name = name
        self.usock = usock
        self.forks = _connection.forks
        self.spin = accept_spin_top()
        # Clients that connected but whose hello has not come yet (a client
        # sends it right after its connect, but may be descheduled, slow, or
        # hostile): control fd -> (doorbell fd, deadline).  accept() never
        # waits for one of them; they are watched beside the entry.
        self.waiting: dict[int, tuple[int, float]] = {}

    def watch_fds(self) -> list[int]:
        """The fds whose readability may mean a client to accept: the
        registry entry and each client waiting for its hello."""
        return [self.usock.fileno(), *self.waiting]

    def next_deadline(self) -> Optional[float]:
        """When the first waiting client runs out of time (monotonic), if any."""
        return min((d for _, d in self.waiting.values()), default=None)

    def park(self, ctl: int, bell: int) -> None:
        """Keep a client whose hello has not come yet."""
        if len(self.waiting) >= MAX_WAITING:
            try:
                oldest = next(iter(self.waiting))
            except (StopIteration, RuntimeError):   # emptied (or changed) by another thread
                oldest = None
            # Popped first: whoever pops an entry owns its fds.
            entry = self.waiting.pop(oldest, None) if oldest is not None else None
            if entry is not None:
                _drop(oldest, entry)
        self.waiting[ctl] = (bell, time.monotonic() + HELLO_WAIT)

    def take_hello(self) -> "tuple | None":
        """A waiting client whose hello has come, as ``stream_accept``
        returns it; clients gone or out of time are dropped (they read EOF)."""
        now = time.monotonic()
        for ctl in list(self.waiting):
            entry = self.waiting.pop(ctl, None)
            if entry is None:
                continue                # taken by another thread
            bell, deadline = entry
            try:
                got = stream_hello(ctl, _control.MAX_MESSAGE + 1, _control.MAX_FDS)
            except BaseException:
                _drop(ctl, entry)
                raise
            if got is not None:
                return (ctl, bell) + got
            if deadline > now:
                self.waiting[ctl] = entry
            else:
                _drop(ctl, entry)
        return None

    def spin_budget(self) -> float:
        top = accept_spin_top()
        if self.spin > top:
            self.spin = top
        return self.spin

    def adapt(self, spun: bool, waited: float) -> None:
        top = accept_spin_top()
        cur = min(self.spin, top)
        if spun:
            self.spin = min(top, cur * 2 + 1e-6)
        elif waited <= top:
            self.spin = min(top, max(cur * 2, waited * 1.25))   # a longer spin catches it
        else:
            self.spin = max(top / 16, cur / 2)

    def close(self) -> None:
        while self.waiting:
            _drop(*self.waiting.popitem())
        if _connection.forks != self.forks:
            # Shared across a fork: as with a TCP listener, the entry must stay
            # findable while any process still holds the listener.  Let go of
            # our copy, then remove the entry only if nobody listens there
            # any more (the registry probes it).
            self.usock.close()
            try:
                registry().remove(self.name)
            except OSError:
                pass
            return
        try:
            registry().remove(self.name, self.usock)
        except OSError:
            pass
        self.usock.close()


def _drop(ctl: int, entry: tuple[int, float]) -> None:
    """Close the two fds of a waiting client taken out of ``Listener.waiting``
    (it reads EOF)."""
    os.close(entry[0])
    os.close(ctl)


def accept_shm(sock: Any, lst: Listener, bare: bool) -> "tuple[Any, Any] | None":
    """The next shared-memory client of the listening ``sock``: (a new
    socket of ``sock``'s class, the client's address), or None if none is
    waiting.  Clients that fail the checks are refused and skipped.
    ``bare``: the class is shrimpio's own, whose objects can be made
    without its constructor (a new connection needs no look-up by inode)."""
    family = _family(sock)
    cls = type(sock)
    usock = lst.usock.fileno()
    while True:
        got = lst.take_hello() if lst.waiting else None
        if got is None:
            got = stream_accept(usock, get_busy_poll_us() / 1e6, _control.MAX_MESSAGE + 1,
                                _control.MAX_FDS)
            if got is None:
                return None
            if got[2] is None:          # no hello yet: never wait for it here
                lst.park(got[0], got[1])
                continue
        fd, bell, data, fds, msg_flags, space_ok = got
        new = None
        try:
            if bare:
                # Made here: no timeout to apply (the fd from accept4 is
                # blocking, and a default timeout was applied by the
                # constructor).
                new = cls.__new__(cls)
                _std.socket.__init__(new, family, _STREAM, sock.proto, fd)
                new._clear()
            conn, client, server = accept_hello(bell, data, msg_flags, fds, space_ok)
        except BaseException as exc:
            if new is not None:
                new.detach()
            os.close(fd)
            if isinstance(exc, (OSError, _control.ProtocolError)):
                continue            # a prober or a broken client: not a connection
            raise
        conn.local = addr_tuple(family, server)
        conn.peer = addr_tuple(family, client)
        if new is None:
            new = cls(family, _STREAM, sock.proto, fileno=fd)
            if _std.getdefaulttimeout() is None:
                new.setblocking(True)
            else:
                new.settimeout(_std.getdefaulttimeout())
        new._install(conn)
        return new, conn.peer


def accept_hello(bell: int, data: bytes, msg_flags: int, fds: list[int],
                 space_ok: bool) -> tuple[Connection, tuple, tuple]:
    """Check a client's hello (as :func:`~shrimpio._fastpath.stream_accept`
    received it) and map its segment: (connection, client address, server
    address).  Anything malformed raises ``ProtocolError`` (or OSError)
    after closing ``bell`` and the fds."""
    try:
        payload = _control.datagram_payload(data, msg_flags, fds)
        m = HELLO_RE.fullmatch(payload)
        if m is not None:              # our own clients' hello: no generic decode
            c2s, s2c, size = int(m[1]), int(m[2]), int(m[3])
            client, server = (m[4].decode(), int(m[5])), (m[6].decode(), int(m[7]))
        else:
            c2s, s2c, size, client, server = _generic_hello(payload, fds)
        if len(fds) != 2:
            raise _control.ProtocolError("stream hello must carry two fds")
        if not (type(c2s) is int and type(s2c) is int and type(size) is int
                and _layout_ok(c2s, s2c, size)):
            raise _control.ProtocolError(
                f"bad ring capacities or segment size {c2s!r}, {s2c!r}, {size!r}")
        if (len(client) < 2 or len(server) < 2 or type(client[0]) is not str
                or type(server[0]) is not str or type(client[1]) is not int
                or type(server[1]) is not int or not 0 <= client[1] <= 65535
                or not 0 <= server[1] <= 65535):
            raise _control.ProtocolError("bad addresses in stream hello")
        if not space_ok:
            raise _control.ProtocolError("space doorbell is not a Unix seqpacket socket")
        fd0, fds[0] = fds[0], -1
        try:
            seg = Segment.from_fd(fd0, size, keep_fd=False)    # closes fd0 on failure
        except ValueError as exc:    # not a shared memory object, or too small
            raise _control.ProtocolError(f"bad segment in stream hello: {exc}") from None
    except BaseException:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        os.close(bell)
        raise
    try:
        space = _csocket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, fds[1])
    except BaseException:
        os.close(fds[1])
        os.close(bell)
        seg.close()
        raise
    try:
        conn = Connection(seg, bell, space, client=False, caps=(c2s, s2c))
    except BaseException:
        os.close(bell)
        seg.close()
        space.close()
        raise
    return conn, client, server


def _generic_hello(payload: bytes, fds: list[int]) -> tuple:
    """(c2s, s2c, size, client, server) of a hello in any JSON form; the
    caller checks the values."""
    msg = _control.decode_payload(payload, fds)
    _control.expect(msg, HELLO_KIND)  # closes (and empties) fds on refusal
    body = msg.body
    if body.get("v") != PROTOCOL_VERSION:
        raise _control.ProtocolError(f"unsupported stream protocol version {body.get('v')!r}")
    try:
        return (body["c2s"], body["s2c"], body["size"], tuple(body["client"]),
                tuple(body["server"]))
    except (KeyError, TypeError) as exc:
        raise _control.ProtocolError(f"bad stream hello: {exc}") from None
