"""Setting up a shared-memory stream connection: the hello both sides
speak, and the client's connect (the listener's side is :mod:`._accept`).

Theory of operation
-------------------
(docs/control-plane.md has the whole picture and the measurements.)

The client decides once per destination (and environment) whether it may
use shared memory and which registry entries may serve it
(:func:`destination`, remembered).  Per connection it takes a spare kit
(segment with two ring headers, space socketpair) and makes *one* call into
C, :func:`~shrimpio._fastpath.stream_connect`: dial the entry, check the
listener's uid, bind the user's socket to (destination, 0) for its local
address, send the hello with the kit's two fds.  (A destination whose last
connect found a listener is bound first, so that the hello follows the
listener's wake-up at once.)  Only what does not fit
that call (no spare kit, a socket bound already, a stale or busy
entry) goes the general way, here in Python, with the same checks.  Then
the :class:`~shrimpio._connection.Connection` attaches the rings and the
registry socket is ``dup2``-ed onto the user's fd (its number never
changes); that fd is then the connection's data doorbell too.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import os
import re
import resource
import socket as _std
import _socket as _csocket
import threading
import time
import weakref
from typing import Any, Optional, Sequence

from . import _connection, _control, _ports, _route
from ._connection import DEFAULT_RING, Connection, Kit, describe_error, ring_capacity
from ._fastpath import stream_connect

__all__ = ["connect_shm", "destination", "hello", "local_address", "registry"]

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
# A client whose socket layer follows a listener's refusal after its
# connect returned (the late fallback, _socklate) says so: the listener
# sends only such clients to TCP when it has no room for their fds.
_TAIL_LATE = b'],"server":[%s,%d],"late":1}'

# The same hello as the listener recognises it: a strict subset of JSON
# (numbers without leading zeros, host strings without escapes), so that a
# match means exactly what the JSON would; anything else takes the generic
# decode.  Either way the values are then checked alike.
HELLO_RE = re.compile(
    (r'\{"kind":"%s","v":%d,' % (HELLO_KIND, PROTOCOL_VERSION)
     + r'"c2s":(0|[1-9][0-9]{0,18}),"s2c":(0|[1-9][0-9]{0,18}),"size":(0|[1-9][0-9]{0,18}),'
     r'"client":\["([0-9A-Za-z.:%_-]{1,64})",(0|[1-9][0-9]{0,5})\],'
     r'"server":\["([0-9A-Za-z.:%_-]{1,64})",(0|[1-9][0-9]{0,5})\](,"late":1)?\}').encode())


@functools.lru_cache(maxsize=256)
def json_str(text: str) -> bytes:
    return json.dumps(str(text), ensure_ascii=False).encode()


@functools.lru_cache(maxsize=256)
def hello_parts(c2s: int, s2c: int, size: int, client_host: str, server: tuple,
                late: bool = False) -> tuple[bytes, bytes]:
    """The hello's bytes before and after the client's port."""
    return (_HEAD % (c2s, s2c, size, json_str(client_host)),
            (_TAIL_LATE if late else _TAIL) % (json_str(server[0]), int(server[1])))


def hello(c2s: int, s2c: int, size: int, client: tuple, server: tuple, late: bool = False) -> bytes:
    """The whole hello payload (the general way; C joins the parts itself)."""
    head, tail = hello_parts(c2s, s2c, size, client[0], tuple(server[:2]), late)
    return head + b"%d" % int(client[1]) + tail


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


#: How long a client trusts its list of the members of a group of listeners
#: sharing an address (SO_REUSEPORT, see _accept.register_listener): it
#: lists the registry again after this (seconds), or at once when an entry
#: failed it, so members that came or went are seen.
MEMBERS_TTL = 1.0


class _Destination:
    """What a connect to one shrimpio-eligible destination needs that does
    not change between connects: the registry, its candidate entries
    (name, path), the numeric address the kernel would connect to, the
    peer address as the socket reports it, and, for the one-call connect,
    the packed address to bind to and our address as the peer sees it."""

    __slots__ = ("reg", "names", "entries", "flat", "numeric", "peer", "ip", "local_host", "listed",
                 "turn", "served", "absent")

    def __init__(self, reg: _control.Registry, family: int, numeric: str, port: int) -> None:
        self.reg = reg
        self.names = _route.candidate_entries(family, numeric, port)
        self.listed = -1.0          # when the groups were last listed (see register_listener)
        self.turn = 0
        # The last connect found a listener: the next binds before its dial
        # (see _fastpath.stream_connect).
        self.served = False
        # The registry directory as it was when no candidate entry was in
        # it (see known_absent), or None.
        self.absent: Optional[tuple] = None
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

    # Theory of operation: a program on shared memory that also talks to
    # kernel TCP servers of this host (unpatched ones) would dial every
    # candidate entry for every connect only to find none: three system
    # calls per entry.  A listener's entry is a file in the registry
    # directory, so the directory changes (its mtime, ctime) whenever a
    # listener comes.  A dial that may find nothing (the last one did)
    # first takes the directory's signature; if the dial then finds no
    # entry, that signature is remembered, and while one stat() of the
    # directory gives the same, no listener came: no dial.  An entry made
    # after the signature was taken changes it; one made before is found
    # by the dial.  File times come from a coarse clock (a tick of a few
    # ms): a change in the same tick as the one before would leave them as
    # they were, so a signature younger than ABSENT_QUIET_NS is not used.

    def known_absent(self) -> bool:
        """No candidate entry can be in the registry: none was at the last
        dial, and the directory has not changed since."""
        if self.absent is None:
            return False
        if _dir_signature(self.reg.path) == self.absent:
            return True
        self.absent = None
        return False

    def quiet_signature(self) -> Optional[tuple]:
        """The directory's signature, taken before a dial, if it has been
        quiet long enough for its times to tell a later change; else None."""
        sig = _dir_signature(self.reg.path)
        if sig is not None and time.time_ns() - max(sig[2], sig[3]) > ABSENT_QUIET_NS:
            return sig
        return None

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


#: How long the registry directory must have been unchanged for a client
#: to trust that no listener came since its last dial (ns; see
#: _Destination.known_absent).  Many ticks of the file-time clock.
ABSENT_QUIET_NS = 50_000_000


def _dir_signature(path: str) -> Optional[tuple]:
    """What changes when an entry is made in or removed from the directory
    ``path`` (or the directory is made anew), None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)


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

#: Connections whose hello said "late" (see _socklate.settled).
late_hellos: "weakref.WeakSet[Connection]" = weakref.WeakSet()


def connect_shm(sock: Any, address: Any, kit_later: bool = False, late: bool = False) -> bool:
    """Connect ``sock`` (a shrimpio socket, TCP, not connected) over shared
    memory if the route allows and a shrimpio listener answers; False (with
    the reason recorded on ``sock``) to go by TCP.  ``kit_later``: build the
    spare connect kit when this connection first waits for its peer rather
    than now (see _connection).  ``late``: the socket's own data calls
    will use the connection, and move it to TCP if the listener sends it
    there after this returned (see _socklate); the hello says so."""
    if not isinstance(address, tuple) or len(address) < 2:
        return False        # let the stdlib raise its own TypeError
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return False
    forced = _route.class_rule(sock)
    if forced is not None:
        sock._route = forced
        return False
    family = _family(sock)
    dest = destination(family, host, port)
    if type(dest) is not _Destination:
        sock._route = dest
        return False
    if dest.known_absent():
        sock._route = _route.Route(_route.TCP, "no shrimpio listener")
        return False
    user_fd = sock.fileno()
    if user_fd >= _fd_headroom_mark():
        # Near the fd limit: shared memory would cost one fd more than TCP
        # (and a few while it connects); TCP leaves them to the program.
        sock._route = _route.Route(_route.TCP, "fd limit")
        return False
    bufs = sock._bufs
    c2s = ring_capacity(bufs.get(_SNDBUF, DEFAULT_RING))
    s2c = ring_capacity(bufs.get(_RCVBUF, DEFAULT_RING))
    # A ready kit (no system call) lets the hello go in the same call as
    # the registry connect, so the listener finds it when it looks.
    kit = _connection.take_kit(c2s, s2c)
    timeout = sock.gettimeout()
    _ports.ready(dest.reg.path)
    try:
        ctl, lport, reason, claim = _dial(sock, dest, family, timeout, user_fd, kit, c2s, s2c, late)
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
            local, ours = local_address(sock, dest.numeric)
            local, claim = _ports.claim(family, local, ours)
            if kit is None:
                kit = Kit(c2s, s2c)
            seg = kit.segment
            _control.send_payload_fd(ctl, hello(c2s, s2c, seg.size, local, dest.peer, late),
                                     (seg.fileno(), kit.theirs.fileno()))
        # ctl is the doorbell fd the connection keeps.  Should this fail,
        # closing ctl tells the listener: EOF.
        conn = Connection(kit.segment, ctl, kit.mine, client=True, caps=(c2s, s2c),
                          local=local, peer=dest.peer)
    except OSError as exc:
        _ports.give(claim)
        if kit is not None:
            kit.close()
        os.close(ctl)
        sock._route = _route.Route(_route.TCP, describe_error(exc))
        return False
    except BaseException:
        _ports.give(claim)
        if kit is not None:
            kit.close()
        os.close(ctl)
        raise
    conn.claim = claim
    kit.theirs.close()
    kit.segment.close_fd()          # the listener has it; our mapping stays
    if late:
        late_hellos.add(conn)
    # The socket object is a shared-memory one before its fd becomes the
    # control socket: the listener's accept() may return before this
    # connect does, and a thread that uses this object then (CPython's
    # TCPCloserTest reads it from the accepting thread) must find the
    # rings, never a kernel socket whose fd reads doorbell bytes as data.
    sock._install(conn)
    os.dup2(ctl, user_fd, inheritable=False)
    # The user's fd is the doorbell from now on: the registry socket's own
    # fd goes (one fd per connection, the space socket, beyond TCP's).
    conn.set_bell(user_fd, owned=False)
    _connection.connected()
    if timeout is not None or _std.getdefaulttimeout() is not None:
        # O_NONBLOCK went with the old file; the registry socket's file is
        # in blocking mode.
        sock.settimeout(timeout)
    if c2s != DEFAULT_RING or s2c != DEFAULT_RING:
        pass                        # spare kits have the default sizes only
    elif kit_later:
        conn.kit_due = True
    else:
        # The listener is busy with our hello: a good time to get the next
        # connect's kit ready.
        _connection.refill()
    return True


#: fds kept free for the program: a connect whose socket's fd is within
#: this many of RLIMIT_NOFILE goes by TCP.  (The kernel gives the lowest
#: free fd, so a new socket's number says how full the table is.)
FD_HEADROOM = 16
_headroom_mark = (0.0, 0)           # (when read, the fd number from which TCP is used)


def _fd_headroom_mark() -> int:
    global _headroom_mark
    now = time.monotonic()
    when, mark = _headroom_mark
    if now - when > 1.0:            # the limit may change (setrlimit): read it again now and then
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        mark = (1 << 30) if soft == resource.RLIM_INFINITY else max(0, soft - FD_HEADROOM)
        _headroom_mark = (now, mark)
    return mark


def _dial(sock: Any, dest: _Destination, family: int, timeout: Optional[float], user_fd: int,
          kit: "Kit | None", c2s: int, s2c: int, late: bool) -> tuple[int, int, str, Optional[tuple]]:
    """Connect to the first live candidate entry: (control fd, our port if
    the hello went too else 0, "", its claim (see _ports) or None) or (-1,
    0, why not, None)."""
    fast = kit is not None and sock._unbound and dest.ip
    if fast:
        seg = kit.segment
        head, tail = hello_parts(c2s, s2c, seg.size, dest.local_host, dest.peer[:2], late)
        seg_fd, space_fd = seg.fileno(), kit.theirs.fileno()
    else:
        head = tail = b""
        seg_fd = space_fd = -1
    reason = "no shrimpio listener"
    before = None if dest.served else dest.quiet_signature()
    for name, path in dest.in_turn():
        try:
            ctl, lport, bound, claimed = stream_connect(path, timeout, user_fd, family, dest.ip, _PRE,
                                                        head, tail, seg_fd, space_fd,
                                                        fast and dest.served)
            if bound:
                sock._unbound = False
                if lport == 0:
                    seg_fd = space_fd = -1  # (the next entry's dial: the general way)
            if ctl == -errno.ENOENT:
                continue
            if ctl < 0:
                dest.listed = -1.0      # a member may have gone: list them again next time
                # A stale entry, a full backlog, an error: the registry's
                # general way sorts them out (and says why).
                ctl, lport = dest.reg.connect(name, timeout=timeout, raw=True).detach(), 0
            dest.served = True
            return ctl, lport, "", (_ports.claimed(lport) if claimed else None)
        except FileNotFoundError:
            continue
        except PermissionError:
            return -1, 0, "other user", None
        except OSError as exc:
            return -1, 0, describe_error(exc), None
        except ValueError as exc:   # e.g. entry path too long for a Unix socket
            return -1, 0, f"registry unusable: {exc}", None
    dest.served = False
    dest.absent = before
    return -1, 0, reason, None


def local_address(sock: Any, dest: str) -> tuple[tuple, bool]:
    """Our address as the peer sees it, and whether we bound it here: bound
    if the user bound us, else a real ephemeral port reserved by binding
    (the connection claims it while it lives: see _ports)."""
    family = _family(sock)
    src = dest if not unspecified(dest) else _loopback(family)
    host, port = "", 0
    ours = False
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
            ours = True
            host, port = _csocket.socket.getsockname(sock)[:2]
    if port == 0:
        try:
            host, port = _csocket.socket.getsockname(sock)[:2]
        except OSError:
            host, port = "", 0
    if port == 0:
        _csocket.socket.bind(sock, (src, 0))
        ours = True
        host, port = _csocket.socket.getsockname(sock)[:2]
    if unspecified(host):
        host = dest
    return addr_tuple(family, (host, port)), ours
