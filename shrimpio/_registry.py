"""The registry: where shrimpio processes of one user and host find each other.

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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import _socket as _csocket
import stat
import struct
import weakref
from typing import Iterable, Iterator

from ._fastpath import dial_unix, exit_unlink_add, exit_unlink_remove
from ._process import getenv

__all__ = ["registry_root", "check_name", "peer_credentials", "Registry", "MEMBER_SEP", "PORTS_FILE"]

_UCRED = struct.Struct("iII")          # struct ucred: pid_t, uid_t, gid_t
_SUN_PATH_MAX = 107                    # sizeof(sun_path) minus the NUL
_SUFFIX = ".sock"
#: Between an entry's name and the number of a further member of its group.
MEMBER_SEP = "+"
#: An empty file in each namespace's directory on whose bytes shared-memory
#: connections lock their local ports (shrimpio/_ports.py).  Made with the
#: directory (a file made later would change the directory, which a client
#: reads as "a listener may have come": see _handshake.known_absent).
PORTS_FILE = ".ports"
_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+-]{1,96}")
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SO_PEERCRED = int(socket.SO_PEERCRED)
#: The stdlib's class, whatever ``shrimpio.patch`` puts in ``socket.socket``
#: later: registry sockets are plain Unix sockets, never shrimpio's.
_StdSocket = socket.socket


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
    return (_csocket.socket if raw else _StdSocket)(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd), 0


def _is_stale(path: str) -> bool:
    """True if a file is at `path` but nobody listens there."""
    sock, err = _dial(path, 0)
    if sock is not None:
        sock.close()
    return err == errno.ECONNREFUSED


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected AF_UNIX socket, via SO_PEERCRED."""
    if isinstance(sock, int):
        s = _StdSocket(fileno=sock)
        try:
            return peer_credentials(s)
        finally:
            s.detach()
    raw = sock.getsockopt(_SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


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
        try:
            os.close(os.open(os.path.join(path, PORTS_FILE), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC
                             | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600))
        except OSError:
            pass            # (then claims are each process's own: see _ports)
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
        sock = _StdSocket(socket.AF_UNIX, socket.SOCK_SEQPACKET | _SOCK_CLOEXEC)
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
