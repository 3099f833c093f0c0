"""Local ports of shared-memory connections are unique among live connections,
as TCP's are (shrimpio/_ports.py): a server that keys its clients by
``getpeername()`` must never see two of them at one address.

The kernel forgets a shared-memory connection's port once its socket's fd
becomes the control socket, so it offers the port again; the claims must pass
it over, within a process and across processes.  To make that certain rather
than likely, the tests run in a network namespace of their own whose
ephemeral port range is ten ports wide: ten live connections then need every
one of them (the kernel picking at random among ten, unclaimed, would repeat
one in all but 4 runs in 10,000)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from children import child_env

RANGE = (40000, 40009)

#: Runs in the namespace: a listener on a port outside the range, and client
#: processes that each make connections on command and keep them.
DRIVER = textwrap.dedent(r'''
    import json, os, signal, subprocess, sys
    import shrimpio, shrimpio.socket as ss

    CLIENT = """
    import json, sys
    import shrimpio, shrimpio.socket as ss
    conns = []
    for line in sys.stdin:
        for _ in range(int(line)):
            c = ss.socket()
            c.connect(("127.0.0.1", int(sys.argv[1])))
            conns.append(c)
        print(json.dumps([[c.getsockname()[1], shrimpio.info(c)["path"]] for c in conns]), flush=True)
    """

    lst = ss.socket()
    lst.bind(("127.0.0.1", 5000))
    lst.listen(64)
    served = {}                             # client process -> server-side sockets

    def client():
        return subprocess.Popen([sys.executable, "-c", CLIENT, "5000"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    def make(proc, n):
        proc.stdin.write(f"{n}\n")
        proc.stdin.flush()
        for _ in range(n):
            s, _addr = lst.accept()
            served.setdefault(proc, []).append(s)
        return json.loads(proc.stdout.readline())

    def peers():
        return sorted(s.getpeername()[1] for socks in served.values() for s in socks)

    out = {}
    a, b = client(), client()
    make(a, 3)
    make(b, 3)
    got_a = make(a, 2)                      # (each answer lists all of that client's)
    got_b = make(b, 2)
    out["first"] = {"a": got_a, "b": got_b, "peers": peers()}
    # A killed client's claims go with it: its ports serve the next one.
    a.kill()
    a.wait()
    for s in served.pop(a):
        s.settimeout(10)
        assert s.recv(1) == b""
        s.close()
    c = client()
    got_c = make(c, 5)
    out["after_kill"] = {"b": got_b, "c": got_c, "peers": peers()}
    for p in (b, c):
        p.stdin.close()
        p.wait()
    print(json.dumps(out))
''')


@pytest.fixture
def narrow_namespace():
    """A command prefix that runs a program in a new network namespace (gone
    with its last process) whose loopback is up and whose ephemeral ports
    are RANGE."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a network namespace of our own needs root, unshare and ip")
    setup = (f"ip link set lo up && echo '{RANGE[0]} {RANGE[1]}' > /proc/sys/net/ipv4/ip_local_port_range"
             ' && exec "$@"')
    probe = subprocess.run(["unshare", "--net", "sh", "-c", setup, "sh", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {probe.stderr.strip()}")
    return ["unshare", "--net", "sh", "-c", setup, "sh"]


def test_live_connections_of_several_processes_never_share_a_port(narrow_namespace, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    res = subprocess.run(narrow_namespace + [sys.executable, str(driver)], capture_output=True,
                         text=True, timeout=120, env=child_env())
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    for phase, got in out.items():
        conns = [c for key in ("a", "b", "c") for c in got.get(key, [])]
        assert {path for _, path in conns} == {"shm"}, (phase, got)
        ports = sorted(p for p, _ in conns)
        assert len(ports) == 10 and all(RANGE[0] <= p <= RANGE[1] for p in ports), (phase, got)
        # Every port of the range, once: none shown by two live connections.
        assert ports == list(range(RANGE[0], RANGE[1] + 1)), (phase, got)
        # The listener sees each client at the address the client sees.
        assert got["peers"] == ports, (phase, got)


LOCK_ALL = textwrap.dedent(r'''
    import fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 65536, 0))
    print("locked", flush=True)
    sys.stdin.read()
''')


@pytest.mark.parametrize("what", ["every port locked", "a directory", "a fifo"])
def test_a_ports_file_held_or_replaced_by_another_process_does_not_stop_connects(registry, what):
    """A peer of the same user may lock every byte of the ports file or put
    something else in its place: connects still go by shared memory, at
    once, and work (their ports are then this process's own claims only)."""
    import shrimpio
    import shrimpio.socket as ss
    from shrimpio import _registry
    net = _registry.Registry.open(str(registry)).path
    path = os.path.join(net, ".ports")
    holder = None
    if what == "every port locked":
        holder = subprocess.Popen([sys.executable, "-c", LOCK_ALL, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "locked\n"
    else:
        os.unlink(path)                         # (made with the registry directory)
        os.mkdir(path) if what == "a directory" else os.mkfifo(path)
    lst = ss.socket()
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        pairs = []
        for _ in range(20):
            c = ss.socket()
            c.settimeout(10)
            c.connect(lst.getsockname())
            s, peer = lst.accept()
            pairs.append((c, s))
            assert shrimpio.info(c)["path"] == "shm"
            assert peer == c.getsockname()
            c.sendall(b"ping")
            assert s.recv(4) == b"ping"
        ports = [c.getsockname()[1] for c, _ in pairs]
        assert len(set(ports)) == len(ports)       # this process's own claims still hold
        for c, s in pairs:
            c.close()
            s.close()
    finally:
        lst.close()
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=10)
        if os.path.isdir(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
