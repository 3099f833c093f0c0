"""Entry points outside the socket class that can meet a connection's fd.

``shrimpio.patch`` installs these beside the socket class and the pollers:

* ``os.sendfile`` into a shared-memory connection's fd copies the file's
  bytes into the send ring (the kernel's sendfile would write them into the
  connection's doorbell, where the peer never reads them); ``os.read`` and
  ``os.write`` of such an fd receive from and send into the rings (the
  kernel's would read and write the doorbell); ``open``/``os.fdopen`` of it
  make a file object that reads the fd in C, so the connection escapes to a
  kernel stream first;
* ``subprocess.Popen`` given such an fd as a child's stdin, stdout or stderr,
  or in ``pass_fds``, and ``multiprocessing``'s spawn (which passes fds to
  the child it starts): the program that runs there reads and writes the fd
  itself, so the connection escapes to a kernel stream first
  (:mod:`shrimpio._escape`);
* ``multiprocessing.connection``'s socket Listener and Client give
  connections on shared memory (:mod:`shrimpio._mpconn`);
* gevent's cooperative sockets and servers run over shared memory
  (:mod:`shrimpio._gevent`); eventlet's stay on kernel TCP and say so
  (:mod:`shrimpio._eventlet`);
* a listening shrimpio socket given to another process (a ``Process``
  argument, a pool's ``initargs``: pickled with its fd) takes its registry
  socket along, so that the processes share one queue of shared-memory
  clients as they share the kernel's queue of TCP clients: each client is
  accepted once, by whichever process is free first.

The multiprocessing hooks are installed when those modules are imported
(a program that never uses multiprocessing does not pay for its import).
"""

from __future__ import annotations

import builtins
import fcntl
import functools
import importlib.abc
import importlib.machinery
import inspect
import io
import os
import subprocess
import sys
from typing import Any, Callable, Optional

from . import _escape
from . import socket as _ss

__all__ = ["install", "uninstall", "sendfile", "SENDFILE_CHUNK"]

#: Most bytes one ``os.sendfile`` into a shared-memory connection moves.
SENDFILE_CHUNK = 1024 * 1024

_real_sendfile: Optional[Callable[..., int]] = getattr(os, "sendfile", None)
_real_execute_child: Callable[..., Any] = subprocess.Popen._execute_child  # type: ignore[attr-defined]


def sendfile(out_fd: int, in_fd: int, offset: Optional[int], count: int, *args: Any,
             **kwargs: Any) -> int:
    """``os.sendfile`` that understands shared-memory connections (see the
    module docstring); anything else goes to the kernel's."""
    conn = _ss._conn_of_fd(out_fd) if isinstance(out_fd, int) and not args and not kwargs else None
    if conn is None:
        assert _real_sendfile is not None
        return _real_sendfile(out_fd, in_fd, offset, count, *args, **kwargs)
    if count < 0:
        raise OSError(22, "Invalid argument")
    want = min(count, SENDFILE_CHUNK)
    if want == 0:
        return 0
    data = os.pread(in_fd, want, offset) if offset is not None else os.read(in_fd, want)
    if not data:
        return 0
    # The fd's own blocking mode decides, as for the kernel's sendfile; but
    # a socket object with a timeout (whose fd is non-blocking for Python's
    # own waits) waits for room up to it: a ring is far smaller than the
    # buffer a kernel TCP socket grows to, so a program that never met
    # EAGAIN there would meet it here.
    sock = _ss._by_fd.get(out_fd)
    if sock is not None and sock.fileno() == out_fd and sock._shm is conn:
        timeout = sock.gettimeout()
        if timeout is not None and timeout > 0:
            try:
                conn.tx.wait_writable(1, timeout)
            except (OSError, ValueError):
                pass                     # the send below says what is wrong
            timeout = 0.0
    else:
        timeout = 0.0 if fcntl.fcntl(out_fd, fcntl.F_GETFL) & os.O_NONBLOCK else None
    try:
        sent = conn.stream.send(data, 0, timeout)
    except BaseException:
        if offset is None:
            os.lseek(in_fd, -len(data), os.SEEK_CUR)     # nothing went: as if unread
        raise
    if offset is None and sent < len(data):
        os.lseek(in_fd, sent - len(data), os.SEEK_CUR)
    return sent


_real_read: Callable[[int, int], bytes] = os.read
_real_write: Callable[[int, Any], int] = os.write
_real_open: Callable[..., Any] = io.open
_by_fd_refs = _ss._by_fd.data          # fd -> weak reference (no Python-level get())


def _shm_socket(fd: Any) -> Any:
    """The shrimpio socket object whose fd ``fd`` is, if it is on shared
    memory (a plain dict look-up for any other fd)."""
    ref = _by_fd_refs.get(fd) if type(fd) is int else None
    sock = ref() if ref is not None else None
    if sock is None or sock._shm is None or sock._shm.closed or sock.fileno() != fd:
        return None
    return sock


def read(fd: int, length: int) -> bytes:
    """``os.read`` that understands shared-memory connections: a socket's
    fd read as a file gives what ``recv`` would (the kernel's read() of a
    socket is a recv), from the ring, not the doorbell's bytes.  The fd's
    blocking mode decides (a socket object with a timeout has a
    non-blocking fd: EAGAIN when there is nothing, as the kernel says)."""
    sock = _shm_socket(fd)
    if sock is None:
        return _real_read(fd, length)
    if length < 0:
        raise ValueError("negative length")      # (what os.read says)
    return sock._shm.stream.recv(length, 0, None if sock.gettimeout() is None else 0.0)


def write(fd: int, data: Any) -> int:
    """``os.write`` that understands shared-memory connections (a send into
    the ring; see :func:`read`)."""
    sock = _shm_socket(fd)
    if sock is None:
        return _real_write(fd, data)
    return sock._shm.stream.send(data, 0, None if sock.gettimeout() is None else 0.0)


def open(file: Any, *args: Any, **kwargs: Any) -> Any:   # noqa: A001 - it is builtins.open
    """``open``/``io.open``/``os.fdopen`` given a shared-memory connection's
    fd: a file object reads and writes the fd in C, so the connection
    escapes to a kernel stream first (see _escape)."""
    if type(file) is int and file >= 0:
        conn = _ss._conn_of_fd(file)
        if conn is not None:
            _escape.escape_conn(conn, "fd opened as a file", file)
    return _real_open(file, *args, **kwargs)


def _fd_params() -> tuple[int, ...]:
    """Positions (after self) of the fds a child keeps, in Popen._execute_child."""
    names = list(inspect.signature(_real_execute_child).parameters)[1:]
    return tuple(names.index(n) for n in ("pass_fds", "p2cread", "c2pwrite", "errwrite")
                 if n in names)


_FD_PARAMS = _fd_params()


@functools.wraps(_real_execute_child)
def _execute_child(self: Any, *args: Any, **kwargs: Any) -> Any:
    fds: list[int] = []
    for i in _FD_PARAMS:
        if i < len(args):
            value = args[i]
            if isinstance(value, int):
                fds.append(value)
            elif isinstance(value, (tuple, list, set, frozenset)):      # pass_fds
                fds.extend(v for v in value if isinstance(v, int))
    _escape_fds(fds, "fd given to a child process")
    return _real_execute_child(self, *args, **kwargs)


def _escape_fds(fds: Any, why: str) -> None:
    """Escape the shared-memory connections among ``fds`` (see _escape)."""
    for fd in fds:
        if not isinstance(fd, int) or fd < 0:
            continue
        conn = _ss._conn_of_fd(fd)
        if conn is not None:
            _escape.escape_conn(conn, why, fd)
        _escape.shared(fd)


def _spawnv_passfds_hook(real: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(real)
    def spawnv_passfds(path: Any, args: Any, passfds: Any) -> Any:
        _escape_fds(passfds, "fd given to a child process")
        return real(path, args, passfds)
    spawnv_passfds.__wrapped_by_shrimpio__ = real   # type: ignore[attr-defined]
    return spawnv_passfds


def _hook_mp_util(mod: Any) -> None:
    if not hasattr(mod.spawnv_passfds, "__wrapped_by_shrimpio__"):
        mod.spawnv_passfds = _spawnv_passfds_hook(mod.spawnv_passfds)


def _unhook_mp_util(mod: Any) -> None:
    real = getattr(mod.spawnv_passfds, "__wrapped_by_shrimpio__", None)
    if real is not None:
        mod.spawnv_passfds = real


def _hook_mp_connection(mod: Any) -> None:
    from . import _mpconn
    _mpconn.install()


def _unhook_mp_connection(mod: Any) -> None:
    from . import _mpconn
    _mpconn.uninstall()


def _reduce_socket(sock: Any) -> Any:
    reduction = sys.modules["multiprocessing.reduction"]
    lst = sock._lst
    df = reduction.DupFd(sock.fileno())
    if lst is None:
        return _rebuild_socket, (df, sock.family, sock.type, sock.proto, None, None)
    # The registry entry is now shared with another process: as after a
    # fork, closing our copy removes it only if nobody listens there.
    lst.share_with_others()
    return _rebuild_socket, (df, sock.family, sock.type, sock.proto, lst.name,
                             reduction.DupFd(lst.usock.fileno()))


def _rebuild_socket(df: Any, family: int, type: int, proto: int, name: Any, udf: Any) -> Any:
    sock = _ss.socket(family, type, proto, fileno=df.detach())
    if name is not None:
        sock._adopt_listener(name, udf.detach())
    return sock


def _hook_gevent_socket(mod: Any) -> None:
    from . import _gevent
    _gevent.install_socket(mod)


def _unhook_gevent_socket(mod: Any) -> None:
    from . import _gevent
    _gevent.uninstall_socket(mod)


def _hook_gevent_server(mod: Any) -> None:
    from . import _gevent
    _gevent.install_server(mod)


def _unhook_gevent_server(mod: Any) -> None:
    from . import _gevent
    _gevent.uninstall_server(mod)


def _hook_gevent_ssl(mod: Any) -> None:
    from . import _gevent
    _gevent.install_ssl(mod)


def _unhook_gevent_ssl(mod: Any) -> None:
    from . import _gevent
    _gevent.uninstall_ssl(mod)


def _hook_eventlet(mod: Any) -> None:
    from . import _eventlet
    _eventlet.install(mod)


def _unhook_eventlet(mod: Any) -> None:
    from . import _eventlet
    _eventlet.uninstall(mod)


def _hook_mp_reduction(mod: Any) -> None:
    mod.register(_ss.socket, _reduce_socket)


#: module -> (install, uninstall), applied when the module is imported.
_MODULE_HOOKS: dict[str, tuple[Callable[[Any], None], Callable[[Any], None]]] = {
    "multiprocessing.util": (_hook_mp_util, _unhook_mp_util),
    "multiprocessing.connection": (_hook_mp_connection, _unhook_mp_connection),
    "multiprocessing.reduction": (_hook_mp_reduction, lambda mod: None),
    "gevent._socket3": (_hook_gevent_socket, _unhook_gevent_socket),
    "gevent.baseserver": (_hook_gevent_server, _unhook_gevent_server),
    "gevent.ssl": (_hook_gevent_ssl, _unhook_gevent_ssl),
    "eventlet.greenio.base": (_hook_eventlet, _unhook_eventlet),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a module's hook right after the module is imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _MODULE_HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            if _installed:
                _MODULE_HOOKS[name][0](module)
        spec.loader.exec_module = exec_module      # type: ignore[method-assign]
        return spec


_finder = _AfterImport()
_installed = False


def install() -> None:
    """Install the hooks (shrimpio.patch.enable)."""
    global _installed
    _installed = True
    if _real_sendfile is not None:
        os.sendfile = sendfile
    os.read, os.write = read, write
    builtins.open = io.open = open
    subprocess.Popen._execute_child = _execute_child  # type: ignore[attr-defined]
    for name, (hook, _unhook) in _MODULE_HOOKS.items():
        mod = sys.modules.get(name)
        if mod is not None:
            hook(mod)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Put the originals back (shrimpio.patch.disable)."""
    global _installed
    _installed = False
    if _real_sendfile is not None:
        os.sendfile = _real_sendfile
    os.read, os.write = _real_read, _real_write
    builtins.open = io.open = _real_open
    subprocess.Popen._execute_child = _real_execute_child  # type: ignore[attr-defined]
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name, (_hook, unhook) in _MODULE_HOOKS.items():
        mod = sys.modules.get(name)
        if mod is not None:
            unhook(mod)
