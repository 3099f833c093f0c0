"""shrimpio control plane: registry, control messages, fd passing, credentials.

Theory of operation
-------------------
Processes of one user on one host find each other through a *registry*: a
directory that only that user can enter (``SHRIMPIO_REGISTRY``, else
``/tmp/shrimpio-<euid>``), with one subdirectory per network namespace
(``net-<inode of /proc/self/ns/net>``) so that "same host" means "same network
namespace".  Both levels are checked on every open: a real directory (not a
symlink), owned by us, mode ``& 0o077 == 0``.  Because nobody else can enter
the directory, nobody else can bind, unlink or even connect to the entries.

An *entry* is a listening ``AF_UNIX``/``SOCK_SEQPACKET`` socket bound at
``<registry>/<name>.sock``.  Entries are not cleaned up by the kernel when a
process dies, so liveness is decided by connecting: ``ECONNREFUSED`` means the
file is there but nobody listens (stale), and a stale file is unlinked by
whoever notices first (``listen``, ``connect`` or ``sweep``).  Probing means
that a live listener occasionally accepts a connection that closes at once
without a message; listeners must shrug that off.

The check-then-unlink steps race with concurrent ``listen`` calls (a socket is
connectable only after ``listen()``, not right after ``bind()``), so every
"decide an entry is stale, unlink, bind, listen" sequence runs under an
exclusive ``flock`` on the registry directory.  The lock is taken only on
those rare paths, never around a plain successful ``connect``.

``remove`` unlinks an entry only if it is still the file this ``Registry``
bound.  Files are identified by ``(st_dev, st_ino)``; inode numbers can be
reused (ext4 does so readily), but a bound socket pins its inode for as long
as it is open, so the identity is exact while our listener is open, and once
it is closed we only unlink the file if it is also stale.

Credentials are checked on both sides with ``SO_PEERCRED``: ``connect``
refuses a listener of another uid; listeners call :func:`peer_credentials`.

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
import contextlib
import errno
import fcntl
import json
import operator
import os
import re
import select
import socket
import _socket as _csocket
import stat
import struct
import sys
import time
import weakref
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from ._fastpath import dial_unix, exit_unlink_add, exit_unlink_remove, recvmsg_fds, sendmsg_fds

#: The kernel's poll, whatever shrimpio.patch does to select.poll (these
#: waits watch kernel fds only).
_real_poll = select.poll

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE", "MAX_FDS", "ProtocolError",
    "registry_root", "check_name", "peer_credentials", "Registry",
    "send_message", "send_payload_fd", "header", "datagram_payload", "Message", "recv_message", "recv_payload", "decode_payload",
    "expect", "error_reply", "getenv",
]

PROTOCOL_VERSION: int = 1
MAX_MESSAGE: int = 4096        # bytes of one datagram, header included
MAX_FDS: int = 4               # fds one message may carry

_MAGIC = b"SHRM"
_HEADER = struct.Struct("!4sHHI")
_UCRED = struct.Struct("iII")          # struct ucred: pid_t, uid_t, gid_t
_SUN_PATH_MAX = 107                    # sizeof(sun_path) minus the NUL
_SUFFIX = ".sock"
#: Between an entry's name and the number of a further member of its group.
MEMBER_SEP = "+"
_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+-]{1,96}")
_INT_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * _INT_SIZE)
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)
_ERROR_TEXT_MAX = 600                  # chars; keeps any 'error' reply < MAX_MESSAGE
# Plain ints: the socket module's are enums, and mixing them in arithmetic
# goes through the enum machinery (microseconds per message).
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SO_PEERCRED = int(socket.SO_PEERCRED)
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


# --------------------------------------------------------------------------- names, paths

_ENVIRON_TYPE = type(os.environ) if os.name == "posix" else None


def environ_data() -> dict | None:
    """CPython's encoded ``os.environ`` mapping (bytes to bytes), or None."""
    env = os.environ
    data = getattr(env, "_data", None) if type(env) is _ENVIRON_TYPE else None
    return data if type(data) is dict else None


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, without its per-call key encoding (a
    connect reads several variables, each of which may change at any time):
    CPython's ``os.environ`` keeps the encoded variables in a dict."""
    data = environ_data()
    if data is None:
        return os.environ.get(name)
    value = data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def registry_root() -> str:
    """os.environ['SHRIMPIO_REGISTRY'] if set (non-empty), else f'/tmp/shrimpio-{os.geteuid()}'."""
    env = getenv("SHRIMPIO_REGISTRY")
    return env if env else f"/tmp/shrimpio-{os.geteuid()}"


def check_name(name: str) -> str:
    """Validate an entry name: str, 1..96 chars of [A-Za-z0-9_.:@+-], not starting with '.'; return it."""
    if not isinstance(name, str):
        raise TypeError(f"shrimpio endpoint name must be str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid shrimpio endpoint name {name!r}: "
                         "use 1 to 96 characters from A-Z a-z 0-9 _ . : @ + -")
    if name.startswith("."):
        raise ValueError(f"invalid shrimpio endpoint name {name!r}: must not start with '.'")
    return name


def _netns_id() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:        # no /proc: every process of the user shares one registry
        return 0


def _ensure_private_dir(path: str) -> None:
    """Create `path` (leaf only, mode 0700) if missing, then check it is safe to use."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass                      # someone (maybe a concurrent opener) made it: check it below
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip("/")) or "/"
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot create shrimpio registry directory: its parent {parent!r} does not "
            "exist (create the parent directory, or unset SHRIMPIO_REGISTRY to use the "
            "default)", path) from None
    else:
        os.chmod(path, 0o700)     # mkdir's mode went through the umask
    st = os.lstat(path)
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        reason = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        reason = "it is not a directory"
    elif st.st_uid != euid:
        reason = f"it is owned by uid {st.st_uid}, not by this user (uid {euid})"
    elif st.st_mode & 0o077:
        reason = (f"its mode {stat.S_IMODE(st.st_mode):04o} lets group or others in "
                  "(it must be 0700)")
    else:
        return
    raise PermissionError(errno.EACCES, f"refusing to use shrimpio registry directory: {reason}",
                          path)


def on_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` when this process exits normally: at interpreter exit,
    and at the end of a multiprocessing child (which leaves by os._exit,
    after its finalizers) if multiprocessing is in use."""
    import atexit
    atexit.register(fn)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, fn, exitpriority=100)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _dial(path: str, timeout: float | None, raw: bool = False) -> tuple[socket.socket | None, int]:
    """Connect a blocking SEQPACKET socket to `path`: (socket, 0) or (None, errno).

    A Unix connect() only ever blocks while the listener's backlog is full;
    ``timeout`` bounds that wait (see ``_fastpath.dial_unix``).  timeout <= 0
    means do not wait.  ``raw``: a ``_socket.socket`` (no Python-level
    wrapper)."""
    fd = dial_unix(os.fsencode(path), timeout)
    if fd < 0:
        return None, -fd
    return (_csocket.socket if raw else socket.socket)(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd), 0


def _is_stale(path: str) -> bool:
    """True if a file is at `path` but nobody listens there."""
    sock, err = _dial(path, 0)
    if sock is not None:
        sock.close()
    return err == errno.ECONNREFUSED


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket, via SO_PEERCRED."""
    if isinstance(sock, int):
        s = socket.socket(fileno=sock)
        try:
            return peer_credentials(s)
        finally:
            s.detach()
    raw = sock.getsockopt(_SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


# --------------------------------------------------------------------------- registry

class Registry:
    """The per-user, per-network-namespace directory of named control sockets."""

    path: str   # the per-network-namespace directory actually used
    root: str   # the per-user directory above it

    def __init__(self, root: str, path: str) -> None:
        self.root = root
        self.path = path
        # name -> (st_dev, st_ino, weakref to the listening socket) of what we bound
        self._bound: dict[str, tuple[int, int, weakref.ref]] = {}
        self._paths: dict[str, str] = {}     # name -> checked entry path

    def __repr__(self) -> str:
        return f"<shrimpio Registry {self.path!r}>"

    @classmethod
    def open(cls, root: str | None = None) -> "Registry":
        """Open (creating if needed) and check the registry; see the module docstring."""
        root = os.path.abspath(os.fspath(root) if root else registry_root())
        _ensure_private_dir(root)
        path = os.path.join(root, f"net-{_netns_id()}")
        _ensure_private_dir(path)
        return cls(root, path)

    # -- helpers

    def _entry_path(self, name: str) -> str:
        path = self._paths.get(name) if type(name) is str else None
        if path is not None:
            return path
        path = os.path.join(self.path, check_name(name) + _SUFFIX)
        n = len(os.fsencode(path))
        if n > _SUN_PATH_MAX:
            raise ValueError(
                f"shrimpio endpoint path {path!r} is {n} bytes, more than the {_SUN_PATH_MAX} "
                "a Unix socket address can hold: use a shorter name or a shorter "
                "SHRIMPIO_REGISTRY")
        if len(self._paths) < 4096:
            self._paths[name] = path
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            # Unlocked explicitly: a replaced os.close may close later
            # (gevent's defers closing anything but regular files to its
            # loop's next turn, and the lock would be held until then).
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # -- API

    def listen(self, name: str, backlog: int = 128) -> socket.socket:
        """Bind and listen at <registry>/<name>.sock, replacing a stale entry; FileExistsError if live."""
        path = self._entry_path(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | _SOCK_CLOEXEC)
        try:
            with self._locked():
                try:
                    sock.bind(path)
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
                    if not _is_stale(path) and os.path.lexists(path):
                        raise FileExistsError(
                            errno.EADDRINUSE,
                            f"shrimpio endpoint {name!r} is already served by a live "
                            "listener", path) from None
                    _unlink_quiet(path)
                    sock.bind(path)
                try:
                    sock.listen(backlog)
                    st = os.lstat(path)
                except BaseException:
                    _unlink_quiet(path)
                    raise
        except BaseException:
            sock.close()
            raise
        self._bound[name] = (st.st_dev, st.st_ino, weakref.ref(sock))
        # Removed on close and at exit; and if SIGTERM or SIGHUP (left at
        # their default action) kill us, by a C signal handler.
        exit_unlink_add(os.fsencode(path))
        return sock

    def connect(self, name: str, timeout: float | None = 5.0, raw: bool = False) -> socket.socket:
        """Connect to a live entry of this user: a blocking socket with no
        timeout set (``raw``: a ``_socket.socket``, for callers that only
        send on it and hand its fd on)."""
        path = self._entry_path(name)
        sock, err = _dial(path, timeout, raw)
        if err == errno.ECONNREFUSED:
            # Stale, or a listener between bind() and listen(): decide under the lock.
            with self._locked():
                sock, err = _dial(path, 0)
                if err == errno.ECONNREFUSED:
                    _unlink_quiet(path)
                    err = errno.ENOENT
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):     # live but busy: wait as asked
                sock, err = _dial(path, timeout, raw)
        if err:
            if err in (errno.ENOENT, errno.ECONNREFUSED):
                raise FileNotFoundError(
                    errno.ENOENT, f"no shrimpio endpoint named {name!r} in {self.path}", path)
            if err in (errno.EACCES, errno.EPERM):
                raise PermissionError(
                    err, f"not allowed to connect to shrimpio endpoint {name!r}", path)
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"shrimpio endpoint {name!r} did not accept within {timeout}s "
                    "(listen backlog full)", path)
            raise OSError(err, os.strerror(err), path)
        assert sock is not None
        try:
            pid, uid, _gid = peer_credentials(sock)
        except BaseException:
            sock.close()
            raise
        if uid != os.geteuid():
            sock.close()
            raise PermissionError(
                errno.EACCES,
                f"shrimpio endpoint {name!r} is served by uid {uid} (pid {pid}), "
                f"not by this user (uid {os.geteuid()})", path)
        return sock

    def members(self, names: "Iterable[str]") -> dict[str, list[str]]:
        """For each of ``names``, the entries ``name+2``, ``name+3``...
        present (live or not): the other members of a group of listeners
        sharing one address (``SO_REUSEPORT``), whose first holds ``name``."""
        out: dict[str, list[str]] = {name: [] for name in names}
        try:
            files = os.listdir(self.path)
        except OSError:
            return out
        n = len(_SUFFIX)
        for f in files:
            base, sep, k = f[:-n].rpartition(MEMBER_SEP)
            if sep and base in out and f.endswith(_SUFFIX) and k.isdigit():
                out[base].append(f[:-n])
        for group in out.values():
            group.sort(key=lambda m: int(m.rpartition(MEMBER_SEP)[2]))
        return out

    def remove(self, name: str, sock: socket.socket | None = None) -> None:
        """Unlink the entry if it is still the file we bound for `name`; close `sock` if given."""
        try:
            record = self._bound.pop(name, None)
            if record is None:
                return
            exit_unlink_remove(os.fsencode(os.path.join(self.path, name + _SUFFIX)))
            dev, ino, ref = record
            path = os.path.join(self.path, name + _SUFFIX)
            try:
                with self._locked():
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        return
                    if (st.st_dev, st.st_ino) != (dev, ino):
                        return                       # re-created by someone else
                    # While our listener is open it pins the inode, so the identity is
                    # exact; once closed the number may have been reused: unlink only
                    # if nobody listens there either.
                    ours_open = any(s is not None and s.fileno() != -1 for s in (ref(), sock))
                    if ours_open or _is_stale(path):
                        _unlink_quiet(path)
            except FileNotFoundError:
                return                               # the registry directory itself is gone
        finally:
            if sock is not None:
                sock.close()

    def names(self) -> list[str]:
        """Names of the entries present (without '.sock'), sorted."""
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            name = entry[:-len(_SUFFIX)]
            if entry.endswith(_SUFFIX) and _NAME_RE.fullmatch(name) and not name.startswith("."):
                out.append(name)
        return sorted(out)

    def sweep(self) -> list[str]:
        """Remove stale entries (nobody listens there: a listener that died
        without closing), return their names.  Entries are checked against
        the kernel's list of bound Unix sockets (``/proc/net/unix``), so a
        live listener is not disturbed; where that list cannot be read,
        by a connect (refused: stale)."""
        removed = []
        with self._locked():
            bound = _bound_unix_paths()
            for name in self.names():
                path = os.path.join(self.path, name + _SUFFIX)
                if (path not in bound) if bound is not None else _is_stale(path):
                    _unlink_quiet(path)
                    removed.append(name)
        return removed


def _bound_unix_paths() -> "set[str] | None":
    """Paths that a Unix socket of this network namespace is bound to (None
    if /proc/net/unix cannot be read)."""
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    out = set()
    for line in lines:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7].startswith(b"/"):
            out.add(os.fsdecode(parts[7]))
    return out


# --------------------------------------------------------------------------- messages

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
