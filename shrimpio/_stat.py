"""``shrimpio stat``: every shrimpio listener and connection of this user on
this host, live, for programs that did nothing special.

Theory of operation
-------------------
Each process that has a shrimpio listener or connection keeps a *stat
table*: a memfd named ``shrimpio-stat`` (close-on-exec), mapped once, of a
header page and 256-byte slots, one per listener or connection (see
``SLOT`` below); the process holds one fd for it (its mapping's).  The
process writes a slot when the listener or connection comes and frees it
when it closes; on the data path each ring end mirrors its index into the
slot with one plain store (``Ring.set_stat``): bytes written by the
producer, bytes read by the consumer.  A ring's waits mark the slot while a
thread is blocked in them.  Nothing else is written, so the table costs no
system call and nothing measurable on the data path.

``shrimpio stat`` finds the tables as ``ss`` and ``lsof`` find sockets:
it looks through ``/proc/<pid>/fd`` of this user's processes for the fds
named ``/memfd:shrimpio-stat``, opens each through that link (any process
of the same user may), maps it read-only and lists the slots.  Nothing is
written to disk, so nothing can be left behind: a process that exits,
however it exits, takes its table with it.  A forked child keeps the
parent's mapping (its inherited connections stay listed under the parent,
whose slots they are: tables are told apart by inode and owner) and makes
its own table at its first listener or connection.  A ring's fill is the producer's count minus the consumer's,
from the two processes' slots of one connection (matched by their
addresses).  Stale registry entries (listeners that died without closing)
are shown and swept (``Registry.sweep``).

What is read from another process's table is that process's word: every
field is checked and a bad table is reported, never trusted.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import struct
import threading
import time
from typing import Any, Optional

__all__ = ["track_connection", "track_listener", "track_tcp", "tcp_closing", "release", "scan",
           "ensure_table"]

MAGIC = b"SHRSTAT1"
HEADER = 4096                   # magic, version, pid, slots in use (then unused)
SLOT = 256
MAX_SLOTS = 1 << 16             # slots a process can list (16 MiB of address space, sparse)

KIND_SHM, KIND_TCP, KIND_LISTENER = 1, 2, 3
KINDS = {KIND_SHM: "shm", KIND_TCP: "tcp", KIND_LISTENER: "listen"}

# Slot fields: offset, struct format.
_STATE = (0, "<I")              # 0 free, 1 live
_KIND = (4, "<I")
_SENT = 8                       # u64, mirrored by the send ring (its producer index)
_RECEIVED = 16                  # u64, mirrored by the receive ring (its consumer index)
_CREATED = (24, "<Q")           # time.time_ns() at open
_CAPS = (32, "<II")             # send ring, receive ring capacities
_TX_BLOCKED = 40                # u32: a thread waits for room in the send ring
_RX_BLOCKED = 44                # u32: a thread waits for data in the receive ring
_FD = (48, "<i")
_LOCAL = (56, 64)
_PEER = (120, 64)
_REASON = (184, 72)
assert _REASON[0] + _REASON[1] == SLOT


# --- the writing side: this process's table -----------------------------------

class _Table:
    """This process's stat table (see the module docstring): one mapping
    of a memfd sized for ``MAX_SLOTS`` slots up front (a sparse file: only
    the pages of slots ever used take memory), so that its slots never move
    and the process holds one fd for it (the mapping's own; Python's mmap
    keeps a duplicate of the fd it maps, and the original is closed)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        fd = os.memfd_create("shrimpio-stat", getattr(os, "MFD_CLOEXEC", 1))
        try:
            os.ftruncate(fd, HEADER + MAX_SLOTS * SLOT)
            self.map = mmap.mmap(fd, HEADER + MAX_SLOTS * SLOT)
        finally:
            os.close(fd)
        self.map[:24] = MAGIC + struct.pack("<IIQ", 1, 0, self.pid)
        # What slots are written through (and the rings mirror into): a
        # view costs the rings less to take than the mmap (never closed).
        self.view = memoryview(self.map)
        self.used = 0                    # high-water mark of slots (the header says it too)
        # Free slot numbers, unboxed: a list would hold an int object per
        # closed connection, allocated at its close and scattered over the
        # heap, keeping the memory of the closed connections around them
        # from going back to the system.
        self.free = array.array("I")

    def take(self) -> tuple[memoryview, int]:
        """A free slot: (the mapping's view, the slot's offset in it)."""
        if self.free:
            i = self.free.pop()
        elif self.used < MAX_SLOTS:
            i = self.used
            self.used += 1
            struct.pack_into("<I", self.map, 12, self.used)
        else:
            raise OSError(errno.ENOSPC, "stat table full")
        return self.view, HEADER + i * SLOT

    def give_back(self, chunk: memoryview, at: int) -> None:
        _U32.pack_into(chunk, at, 0)        # free: the reader skips it
        self.free.append((at - HEADER) // SLOT)


_table: Optional[_Table] = None
_lock = threading.Lock()
_disabled = False
_pid = os.getpid()          # this process's (kept by an at-fork hook: no system call per use)


class Slot:
    """One listener's or connection's slot in this process's table."""

    __slots__ = ("table", "chunk", "at")

    def __init__(self, table: _Table, chunk: mmap.mmap, at: int) -> None:
        self.table, self.chunk, self.at = table, chunk, at


_SLOT = struct.Struct("<IIQQQIIIIi4x64s64s72s")     # a whole slot, state to reason
assert _SLOT.size == SLOT and _LOCAL[0] == 56
_U32 = struct.Struct("<I")


def _address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "" if addr in (None, (), "") else str(addr)


# "host:" (or "[host]:") as slot text, per host: the connections of a
# process have few hosts and a new port each.
_host_texts: dict[str, bytes] = {}


def _address_text(addr: Any) -> bytes:
    """``_address(addr)`` as the slot stores it (UTF-8, at most 63 bytes)."""
    try:
        head = _host_texts[addr[0]]
    except (KeyError, TypeError, IndexError):
        head = None
    if head is not None and type(addr[1]) is int:
        return (head + b"%d" % addr[1])[:63]
    if type(addr) is tuple and len(addr) >= 2 and type(addr[0]) is str and len(_host_texts) < 256:
        _host_texts[addr[0]] = _address((addr[0], 0))[:-1].encode("utf-8", "replace")
    return _address(addr).encode("utf-8", "replace")[:63]


def _open_slot(kind: int, fd: int, local: Any, peer: Any, reason: str,
               caps: tuple[int, int] = (0, 0)) -> Optional[Slot]:
    global _table, _disabled
    if _disabled:
        return None
    with _lock:
        try:
            if _table is None or _table.pid != _pid:
                _table = _Table()        # first use, or a forked child's own
            chunk, at = _table.take()
        except (OSError, ValueError):
            # A diagnostic must never cost a connection: no table (no
            # memfd...) means no listing.
            _disabled = True
            return None
        table = _table
    # (struct pads each text with NULs; one byte is kept for the last NUL.)
    # The state word last: a reader sees the slot live only when it is whole.
    _SLOT.pack_into(chunk, at, 0, kind, 0, 0, time.time_ns(), caps[0], caps[1], 0, 0, fd,
                    _address_text(local), _address_text(peer),
                    reason.encode("utf-8", "replace")[:71] if reason else b"")
    _U32.pack_into(chunk, at, 1)
    return Slot(table, chunk, at)


def track_connection(conn: Any, fd: int) -> Optional[Slot]:
    """Give a shared-memory connection (shrimpio._connection.Connection) a
    slot, its rings mirroring their indices into it."""
    slot = _open_slot(KIND_SHM, fd, conn.local, conn.peer, "", (conn.tx.capacity, conn.rx.capacity))
    if slot is None:
        return None
    conn.tx.set_stat(slot.chunk, slot.at + _SENT, slot.at + _TX_BLOCKED, True)
    conn.rx.set_stat(slot.chunk, slot.at + _RECEIVED, slot.at + _RX_BLOCKED, False)
    return slot


def track_listener(name: str, fd: int) -> Optional[Slot]:
    """Give a listener (its registry entry ``name``, as ``tcp4-HOST-PORT``)
    a slot, listed under its address."""
    family, _, rest = name.partition("-")
    host, _, port = rest.rpartition("-")
    local: Any = (host, port) if family in ("tcp4", "tcp6") and port.isdigit() else name
    return _open_slot(KIND_LISTENER, fd, local, "", "")


def track_tcp(sock: Any, reason: str) -> None:
    """Give a connected shrimpio socket that went by kernel TCP a slot
    (with the reason), kept on the socket (``sock._tcp``) and freed when it
    closes or is collected (``tcp_closing``).  Its bytes are the kernel's
    (``ss -ti``): not mirrored."""
    try:
        local, peer = sock.getsockname(), sock.getpeername()
    except OSError:
        return
    sock._tcp = _open_slot(KIND_TCP, sock.fileno(), local, peer, reason)


def tcp_closing(sock: Any) -> None:
    """A socket closes: free its TCP slot if it has one."""
    slot, sock._tcp = sock._tcp, None
    if slot is not None:
        release(slot)


def release(slot: Optional[Slot], *rings: Any) -> None:
    """Free ``slot`` (after its connection's or listener's close); its
    ``rings``, if still open, stop mirroring into it (closed rings write
    nothing).  A slot of the table of another process (inherited over
    fork) is that process's to free."""
    for ring in rings:
        try:
            ring.set_stat(None, 0, 0, False)
        except (AttributeError, ValueError):
            pass
    if slot is None or slot.table.pid != _pid:
        return
    with _lock:
        slot.table.give_back(slot.chunk, slot.at)


def _start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _forked() -> None:
    """In a forked child: a new pid (its next listener or connection makes
    the child's own table; the parent's mapping stays, for the inherited
    connections' rings, whose slots are the parent's)."""
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def ensure_table() -> None:
    """Make this process's table now if it has none (for tests: the fd a
    process keeps for its life)."""
    global _table
    with _lock:
        if _table is None or _table.pid != _pid:
            _table = _Table()


# --- the reading side: `shrimpio stat` -------------------------------------------

def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _read_table(pid: int, fd: int) -> tuple[Optional[int], list[dict], str]:
    """The owner and live slots of the table that is fd ``fd`` of process
    ``pid``, or an error saying why it could not be read."""
    try:
        tfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return None, [], f"cannot open its table ({exc.strerror})"
    try:
        size = os.fstat(tfd).st_size
        if size < HEADER or (size - HEADER) % SLOT or size > HEADER + MAX_SLOTS * SLOT:
            return None, [], f"its table has an impossible size {size}"
        m = mmap.mmap(tfd, size, prot=mmap.PROT_READ)
    except OSError as exc:
        return None, [], f"cannot map its table ({exc.strerror})"
    finally:
        os.close(tfd)
    try:
        # One copy (the owner may change it meanwhile) of the slots it ever used.
        used = min(struct.unpack_from("<I", m, 12)[0], (size - HEADER) // SLOT)
        size = HEADER + used * SLOT
        data = bytes(m[:size])
    finally:
        m.close()
    if data[:8] != MAGIC:
        return None, [], "its table has no stat header"
    version, _, owner = struct.unpack_from("<IIQ", data, 8)
    if version != 1:
        return None, [], f"its table is of version {version}"
    out = []
    for at in range(HEADER, size, SLOT):
        state, kind = struct.unpack_from("<II", data, at)
        if state != 1 or kind not in KINDS:
            continue
        sent, received, created = struct.unpack_from("<QQQ", data, at + 8)
        tx_cap, rx_cap, tx_blocked, rx_blocked, sfd = struct.unpack_from("<IIIIi", data, at + 32)
        out.append({
            "kind": KINDS[kind], "fd": sfd, "created_ns": created,
            "local": _cstr(data[at + _LOCAL[0]:at + _LOCAL[0] + _LOCAL[1]]),
            "peer": _cstr(data[at + _PEER[0]:at + _PEER[0] + _PEER[1]]),
            "reason": _cstr(data[at + _REASON[0]:at + _REASON[0] + _REASON[1]]),
            # (A kernel TCP connection's bytes are the kernel's: not mirrored.)
            "bytes_sent": None if kind == KIND_TCP else sent,
            "bytes_received": None if kind == KIND_TCP else received,
            "ring_bytes": [tx_cap, rx_cap],
            "blocked_sending": bool(tx_blocked), "blocked_receiving": bool(rx_blocked),
        })
    return owner, out, ""


def _tables() -> list[tuple[int, int, int]]:
    """(pid, fd, inode) of every stat table fd in this user's processes."""
    uid = os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue            # gone, or not ours to look at
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:shrimpio-stat"):
                    found.append((pid, int(fd), os.stat(f"/proc/{pid}/fd/{fd}").st_ino))
            except (OSError, ValueError):
                continue
    return found


def _program(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    return " ".join(argv)[:120] or "?"


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return "?"


def scan(sweep: bool = True) -> dict:
    """Every stat table of this user's processes: ``{"processes": [...],
    "stale": [...]}``.  Each process: pid, program, state (``R`` running,
    ``S`` sleeping...: /proc) and its listeners and connections; a
    connection of shared memory also gets ``send_fill`` and
    ``receive_fill`` (bytes in its rings not yet read) and ``peer_pid``
    when its peer's slot is found.  ``stale``: registry entries of this
    network namespace that nobody listens on (removed if ``sweep``)."""
    procs: dict[int, dict] = {}
    seen: set[int] = set()
    for pid, fd, inode in sorted(_tables()):
        if inode in seen:
            continue            # the same table through another fd
        seen.add(inode)
        owner, slots, error = _read_table(pid, fd)
        if owner is not None and owner != pid and _start_time(owner) is not None:
            pid = owner         # a parent's table a forked child still holds
        p = procs.setdefault(pid, {"pid": pid, "program": _program(pid),
                                   "state": _process_state(pid), "error": "", "entries": []})
        p["entries"] += slots
        if error:
            p["error"] = error
    out = [p for p in procs.values() if p["entries"] or p["error"]]
    _fills(out)
    return {"processes": out, "stale": _stale_entries(sweep)}


def _stale_entries(sweep: bool) -> list[dict]:
    from ._control import _SUFFIX, Registry, _bound_unix_paths
    try:
        reg = Registry.open()
        if sweep:
            return [{"entry": n, "why": "nobody listens (removed)"} for n in reg.sweep()]
        bound = _bound_unix_paths() or set()
        return [{"entry": n, "why": "nobody listens"} for n in reg.names()
                if os.path.join(reg.path, n + _SUFFIX) not in bound]
    except OSError:
        return []


def _fills(procs: list[dict]) -> None:
    """Ring fills from the two ends of each shared-memory connection."""
    ends: dict[tuple[str, str], list[dict]] = {}
    for p in procs:
        for e in p["entries"]:
            if e["kind"] == "shm":
                ends.setdefault((e["local"], e["peer"]), []).append(e)
    for (local, peer), mine in ends.items():
        theirs = ends.get((peer, local), [])
        if len(mine) != 1 or len(theirs) != 1:
            continue            # not found, or ambiguous (shared after fork...)
        a, b = mine[0], theirs[0]
        a["peer_pid"] = next(p["pid"] for p in procs if b in p["entries"])
        fill_out = a["bytes_sent"] - b["bytes_received"]
        fill_in = b["bytes_sent"] - a["bytes_received"]
        if 0 <= fill_out <= a["ring_bytes"][0]:
            a["send_fill"] = fill_out
        if 0 <= fill_in <= a["ring_bytes"][1]:
            a["receive_fill"] = fill_in


# --- the command ------------------------------------------------------------------

def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024          # type: ignore[assignment]
    return str(n)


def format_text(res: dict) -> str:
    """The listing as `shrimpio stat` prints it."""
    rows = [("PID", "PROGRAM", "KIND", "LOCAL", "PEER", "SENT", "RECEIVED", "FILL OUT/IN",
             "WAITING", "REASON")]
    for p in res["processes"]:
        prog = p["program"].split(" ")
        name = os.path.basename(prog[0]) + (" " + " ".join(prog[1:]) if len(prog) > 1 else "")
        name = name[:28]
        if p["error"]:
            rows.append((str(p["pid"]), name, "?", "", "", "", "", "", p["state"], p["error"]))
        for e in p["entries"]:
            waiting = ",".join(w for w, on in (("send", e["blocked_sending"]),
                                               ("recv", e["blocked_receiving"])) if on)
            fill = ""
            if e["kind"] == "shm":
                fill = f"{_size(e.get('send_fill'))}/{_size(e.get('receive_fill'))}"
            listener = e["kind"] == "listen"
            rows.append((str(p["pid"]), name, e["kind"], e["local"], e["peer"],
                         "" if listener else _size(e["bytes_sent"]),
                         "" if listener else _size(e["bytes_received"]), fill,
                         waiting or ("" if listener else f"process {p['state']}"), e["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for s in res["stale"]:
        lines.append(f"stale registry entry: {s['entry']} ({s['why']})")
    if len(rows) == 1:
        lines.append("(no shrimpio listener or connection of this user on this host)")
    return "\n".join(lines)


def add_arguments(ap: Any) -> None:
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                    help="refresh every SECONDS until interrupted")
    ap.add_argument("--no-sweep", action="store_true",
                    help="list stale registry entries without removing them")


def main(args: Any) -> int:
    import json
    import sys
    import time
    if args.watch is not None and not args.watch > 0:
        print("shrimpio stat: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    while True:
        res = scan(sweep=not args.no_sweep)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(format_text(res), flush=True)
        if args.watch is None:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
