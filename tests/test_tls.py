"""TLS (``SSLContext.wrap_socket``) over shrimpio sockets, beside the stdlib.

Every test runs twice.  ``shm``: this process patched
(``shrimpio.patch.enable()``) and the peer process under ``shrimpio run``,
so the connection is on shared memory and TLS runs over its rings.
``stdlib``: nothing patched, kernel TCP and the stdlib's own
``ssl.SSLSocket``.  The same assertions hold in both, so each test shows
that shrimpio behaves as the real thing; each also checks which path it
was on.  Peers are real processes (``tests/tls_programs.py``), with
certificates from trustme.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import shrimpio
import shrimpio.patch as patch
from shrimpio import _tls

from children import child_env
from program_runner import SHM, records_when_idle, run_client, server, server_records
from tls_programs import (HTTPS_CLIENT, HTTPS_SERVER, IMPORT_FIRST_CLIENT, TLS_CLIENT, TLS_SERVER,
                          expected_https, pattern)

trustme = pytest.importorskip("trustme")

patch.disable()         # importing shrimpio.patch enabled it: the `mode` fixture decides

MiB = 1 << 20
HOST = "127.0.0.1"
DEADLINE = 20.0         # for anything that waits on the peer


@pytest.fixture(params=["shm", "stdlib"])
def mode(request):
    """``shm``: this process patched, peers under ``shrimpio run``;
    ``stdlib``: nothing patched."""
    if request.param == "shm":
        patch.enable()
        try:
            yield "shm"
        finally:
            patch.disable()
    else:
        yield "stdlib"


@pytest.fixture
def certs(tmp_path):
    """A trustme CA and a server certificate for 127.0.0.1 (and localhost)
    in files; ``client()``/``server()`` make contexts."""
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "localhost")
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))

    def client() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca_file))

    def server_ctx() -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert_file))
        return ctx

    return SimpleNamespace(ca=str(ca_file), cert=str(cert_file), client=client, server=server_ctx,
                           env={"TLS_CERT": str(cert_file), "TLS_CA": str(ca_file)})


def _write(name: str, text: str) -> str:
    path = Path.cwd() / name          # conftest chdirs into tmp_path
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def tls_server(mode, certs, program=TLS_SERVER, **env):
    """The TLS server program in a child, patched in ``shm`` mode."""
    name = "https_server.py" if program is HTTPS_SERVER else "tls_server.py"
    with server(_write(name, program), patched=mode == "shm", env={**certs.env, **env}) as srv:
        yield srv


def check_path(sock, mode) -> None:
    """What ``wrap_socket`` made, and the path of its connection."""
    assert isinstance(sock, ssl.SSLSocket)
    if mode == "shm":
        assert type(sock) is _tls.SSLSocket
        assert shrimpio.info(sock)["path"] == "shm", shrimpio.info(sock)
    else:
        assert type(sock) is ssl.SSLSocket
        assert shrimpio.info(sock)["path"] == "tcp"


def connect(port, certs, **kw):
    """A blocking TLS client connection to the server child."""
    raw = socket.create_connection((HOST, port), timeout=DEADLINE)
    return certs.client().wrap_socket(raw, server_hostname=HOST, **kw)


def recv_exact(sock, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(n - len(out), 1 << 17))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


def recv_line(sock) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        data = sock.recv(1)
        assert data, out
        out += data
    return out


def check_server_report(srv, mode, n: int) -> None:
    """The server child closed ``n`` connections, all on shared memory in
    ``shm`` mode (its report; a plain server writes none)."""
    if mode == "shm":
        assert [r["path"] for r in server_records(srv, n)] == [SHM] * n
    else:
        assert records_when_idle(srv) == []


def wait_io(sock, want_read: bool, poller: str) -> None:
    """Wait until ``sock`` is readable (or writable), by select.select or a
    selectors.DefaultSelector, within the deadline."""
    if poller == "select":
        r, w, _ = select.select([sock] if want_read else [], [] if want_read else [sock], [], DEADLINE)
        assert r or w, "not ready within the deadline"
        return
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ if want_read else selectors.EVENT_WRITE)
        assert sel.select(DEADLINE), "not ready within the deadline"


def drive(call, sock, poller: str) -> tuple[int, int]:
    """Call ``call()`` on a non-blocking TLS socket until it completes,
    waiting as the SSLWant* errors say; (reads waited, writes waited)."""
    waits = [0, 0]
    while True:
        try:
            return call(), waits
        except ssl.SSLWantReadError:
            waits[0] += 1
            wait_io(sock, True, poller)
        except ssl.SSLWantWriteError:
            waits[1] += 1
            wait_io(sock, False, poller)


# ---------------------------------------------------------------------------
# Data, both ways


@pytest.mark.parametrize("how", ["sendall", "sendfile"])
def test_echo_1mib_both_ways(mode, certs, how, tmp_path):
    """1 MiB out (sendall, or sendfile) and the same 1 MiB back; the server
    child's report says shm as well.  One thread: OpenSSL objects are not
    thread-safe, and the stdlib's SSLSocket does not serialise a reader
    thread and a writer thread (they failed with BAD_WRITE_RETRY), so such
    a test would try the stdlib's luck, not shrimpio's behaviour."""
    payload = os.urandom(MiB)
    src = tmp_path / "payload"
    src.write_bytes(payload)
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            assert s.version() == "TLSv1.3" and not s.server_side
            s.sendall(b"sink %d\n" % MiB)
            if how == "sendall":
                s.sendall(payload)
            else:
                with open(src, "rb") as f:
                    assert s.sendfile(f) == MiB
            got = recv_exact(s, MiB)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            if mode == "shm":
                counts = shrimpio.info(s)
                assert counts["bytes_sent"] > MiB and counts["bytes_received"] > MiB, counts
        check_server_report(srv, mode, 1)


def test_makefile_readline(mode, certs):
    """makefile("rwb") on the TLS socket: write lines, readline each echo
    (one longer than a ring), as through a kernel socket."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"lines\n")
            with s.makefile("rwb") as f:
                for i in range(200):
                    f.write(b"line %d\n" % i)
                    f.flush()
                    assert f.readline() == b"line %d\n" % i
                big = pattern(300_000).replace(b"\n", b".") + b"\n"
                f.write(big)
                f.flush()
                assert f.readline() == big


def test_pending_is_not_readiness(mode, certs):
    """A record read in part: the rest is pending() in the TLS object and
    select() does not report it (the stdlib's caveat, kept); the next
    record in the stream is reported."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"echo\n")
            s.sendall(b"x" * 100)                   # one record, echoed as one
            assert s.recv(10) == b"x" * 10
            assert s.pending() == 90
            assert select.select([s], [], [], 0) == ([], [], [])
            assert s.recv(1000) == b"x" * 90
            assert s.pending() == 0
            s.sendall(b"y" * 100)
            r, _, _ = select.select([s], [], [], DEADLINE)
            assert r == [s]
            assert recv_exact(s, 100) == b"y" * 100


# ---------------------------------------------------------------------------
# Timeouts and non-blocking sockets


def test_read_timeout(mode, certs):
    """A read that times out raises the engine's TimeoutError; the
    connection keeps working."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"echo\n")
            s.settimeout(0.2)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as exc:
                s.recv(10)
            assert time.monotonic() - t0 >= 0.19
            assert type(exc.value) is TimeoutError and isinstance(exc.value, socket.timeout)
            assert str(exc.value) == "The read operation timed out"
            s.settimeout(DEADLINE)
            s.sendall(b"ping")
            assert recv_exact(s, 4) == b"ping"


def test_write_timeout(mode, certs):
    """A peer that stops reading: writes fill the path, then one times out
    with the engine's message."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"stall\n")
            s.settimeout(0.3)
            chunk = b"z" * 65536
            with pytest.raises(TimeoutError) as exc:
                for _ in range(4096):                   # 256 MiB: far more than any buffer
                    s.sendall(chunk)
            assert str(exc.value) == "The write operation timed out"


def test_handshake_timeout(mode, certs):
    """A server that never answers the handshake: wrap_socket times out
    with the handshake's message, and the socket is closed."""
    with tls_server(mode, certs, TLS_MUTE="1") as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=0.3)
        if mode == "shm":
            assert shrimpio.info(raw)["path"] == "shm"
        with pytest.raises(TimeoutError) as exc:
            certs.client().wrap_socket(raw, server_hostname=HOST)
        # "_ssl.c:NNN: The handshake operation timed out" (the position
        # depends on the Python version).
        assert str(exc.value) == stdlib_handshake_timeout()
        assert raw.fileno() == -1               # detached by wrap_socket, then closed
        raw.close()


def stdlib_handshake_timeout() -> str:
    """The stdlib's message for a handshake that times out, from its own
    SSLSocket on a socketpair no one answers."""
    a, b = socket.socketpair()
    with a, b:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        plain = shrimpio.socket.StdSocket(fileno=a.detach())
        with ssl.SSLSocket._create(plain, do_handshake_on_connect=False, context=ctx) as tls:
            tls.settimeout(0.05)
            with pytest.raises(TimeoutError) as exc:
                tls.do_handshake()
    assert str(exc.value).endswith("The handshake operation timed out")
    return str(exc.value)


@pytest.mark.parametrize("poller", ["select", "selectors"])
def test_nonblocking_client_handshake(mode, certs, poller):
    """do_handshake_on_connect=False on a non-blocking socket; the handshake
    and then the data driven by SSLWantReadError/SSLWantWriteError and the
    (patched) poller."""
    with tls_server(mode, certs) as srv:
        with pytest.raises(ValueError, match="do_handshake_on_connect should not be specified"):
            certs.client().wrap_socket(_nonblocking(srv.port), server_hostname=HOST)
        raw = _nonblocking(srv.port)
        s = certs.client().wrap_socket(raw, server_hostname=HOST, do_handshake_on_connect=False)
        with s:
            check_path(s, mode)
            assert s.version() is None and s.cipher() is None
            drive(s.do_handshake, s, poller)
            assert s.version() == "TLSv1.3"
            assert drive(lambda: s.send(b"echo\n"), s, poller)[0] == 5
            with pytest.raises(ssl.SSLWantReadError) as exc:
                s.recv(10)                              # nothing echoed yet
            assert exc.value.args[0] == ssl.SSL_ERROR_WANT_READ
            assert str(exc.value).startswith("The operation did not complete (read)")
            assert drive(lambda: s.send(b"ping"), s, poller)[0] == 4
            got = b""
            while len(got) < 4:
                got += drive(lambda: s.recv(4 - len(got)), s, poller)[0]
            assert got == b"ping"
            with pytest.raises(ssl.SSLWantReadError):
                s.recv(10)


def test_nonblocking_write_wants_write(mode, certs):
    """Non-blocking writes to an echo server while not reading: both
    directions fill, send() raises SSLWantWriteError; then a select loop
    reads the echoes and retries the same data until it goes, and every
    byte comes back in order."""
    base = os.urandom(65536)

    def chunk(i):                                   # each one different
        return i.to_bytes(8, "big") + base[8:]

    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"echo\n")
            s.setblocking(False)
            n = 0
            with pytest.raises(ssl.SSLWantWriteError) as exc:
                while n < 4096:                     # 256 MiB: more than any buffers hold
                    assert s.send(chunk(n)) == len(base)
                    n += 1
            assert exc.value.args[0] == ssl.SSL_ERROR_WANT_WRITE
            assert n > 0
            got = bytearray()
            pending = True                          # the chunk that raised is retried
            deadline = time.monotonic() + DEADLINE
            while pending or len(got) < n * len(base):
                assert time.monotonic() < deadline, (n, len(got), pending)
                r, w, _ = select.select([s], [s] if pending else [], [], DEADLINE)
                if w:
                    try:
                        assert s.send(chunk(n)) == len(base)
                        n += 1
                        pending = False
                    except ssl.SSLWantWriteError:
                        pass
                if r:
                    try:
                        got += s.recv(1 << 17)
                    except ssl.SSLWantReadError:
                        pass
            assert got == b"".join(chunk(i) for i in range(n))


def _nonblocking(port):
    """A non-blocking connection to the server."""
    raw = socket.create_connection((HOST, port), timeout=DEADLINE)
    raw.setblocking(False)
    return raw


# ---------------------------------------------------------------------------
# Server side (this process serves, the client is a child)


@contextlib.contextmanager
def tls_client(mode, certs, *args):
    """The TLS client program in a child, patched in ``shm`` mode; its
    stdout pipe, reaped at the end."""
    cmd = [sys.executable] + (["-m", "shrimpio", "run"] if mode == "shm" else [])
    ours = [k for k in os.environ if k.startswith("SHRIMPIO_") and k != "SHRIMPIO_REGISTRY"]
    env = child_env({**certs.env, "SHRIMPIO_REPORT": str(Path.cwd() / "client.report")}, drop=ours)
    proc = subprocess.Popen(cmd + [_write("tls_client.py", TLS_CLIENT), *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE)


@pytest.mark.parametrize("how", ["accepted", "listener", "nonblocking"])
def test_server_side(mode, certs, how):
    """wrap_socket(server_side=True) on an accepted socket (blocking, or
    non-blocking with the handshake driven by selectors), and on the
    listening socket, whose accept() gives TLS sockets."""
    ctx = certs.server()
    lst = socket.create_server((HOST, 0))
    try:
        if how == "listener":
            lst = ctx.wrap_socket(lst, server_side=True)
            assert isinstance(lst, ssl.SSLSocket) and lst.server_side
            if mode == "shm":
                assert type(lst) is _tls.SSLSocket and shrimpio.info(lst)["path"] == "shm"
        lst.settimeout(DEADLINE)
        with tls_client(mode, certs, lst.getsockname()[1], "hello") as proc:
            if how == "listener":
                s, addr = lst.accept()
            else:
                conn, addr = lst.accept()
                if how == "nonblocking":
                    conn.setblocking(False)
                    s = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                    drive(s.do_handshake, s, "selectors")
                    s.setblocking(True)
                else:
                    s = ctx.wrap_socket(conn, server_side=True)
                assert conn.fileno() == -1
            with s:
                check_path(s, mode)
                assert s.server_side and s.server_hostname is None and s.version() == "TLSv1.3"
                assert addr == s.getpeername()
                assert recv_line(s) == b"hello\n"
                s.sendall(b"hi hello\n")
                assert proc.stdout.readline() == b"hi hello\n"
            assert proc.wait(DEADLINE) == 0
    finally:
        lst.close()


@pytest.mark.parametrize("ragged", ["suppressed", "raised"])
def test_peer_dies_mid_stream(mode, certs, ragged):
    """The client process is killed mid-stream (no close_notify) while we
    wait in recv: the stdlib's outcome (EOF, or SSLEOFError without
    suppress_ragged_eofs), never a hang; then writes raise SSLEOFError."""
    ctx = certs.server()
    with socket.create_server((HOST, 0)) as lst, \
            tls_client(mode, certs, lst.getsockname()[1], "feed", 200_000) as proc:
        lst.settimeout(DEADLINE)
        conn, _ = lst.accept()
        with ctx.wrap_socket(conn, server_side=True, suppress_ragged_eofs=ragged == "suppressed") as s:
            check_path(s, mode)
            s.settimeout(DEADLINE)
            s.sendall(b"go\n")
            assert recv_exact(s, 200_000) == pattern(200_000)
            assert proc.stdout.readline() == b"fed\n"
            outcome = []

            def reader():
                try:
                    outcome.append(s.recv(10))
                except Exception as exc:       # noqa: BLE001 (the outcome under test)
                    outcome.append(exc)

            t = threading.Thread(target=reader)
            t.start()
            proc.kill()
            t.join(DEADLINE)
            assert not t.is_alive(), "recv hung after the peer died"
            if ragged == "suppressed":
                assert outcome == [b""]
            else:
                assert type(outcome[0]) is ssl.SSLEOFError, outcome
                assert outcome[0].reason == "UNEXPECTED_EOF_WHILE_READING"
                assert "EOF occurred in violation of protocol" in str(outcome[0])
            with pytest.raises(ssl.SSLEOFError):
                s.sendall(b"x" * 65536)


# ---------------------------------------------------------------------------
# Certificates, sessions, shutdown


def test_wrong_hostname(mode, certs):
    """Verifying a name the certificate does not carry, and a CA we do not
    trust: SSLCertVerificationError with OpenSSL's code and message; the
    server sees the client's alert."""
    with tls_server(mode, certs) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        with pytest.raises(ssl.SSLCertVerificationError) as exc:
            certs.client().wrap_socket(raw, server_hostname="wrong.example")
        assert exc.value.verify_code == 62
        assert exc.value.verify_message == \
            "Hostname mismatch, certificate is not valid for 'wrong.example'."
        assert raw.fileno() == -1
        raw.close()
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        with pytest.raises(ssl.SSLCertVerificationError) as exc:
            ssl.create_default_context().wrap_socket(raw, server_hostname=HOST)
        assert exc.value.verify_code == 20
        assert exc.value.reason == "CERTIFICATE_VERIFY_FAILED"
        raw.close()
        # The server lived through both.
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"echo\nok")
            assert recv_exact(s, 2) == b"ok"


def test_session_alpn_and_attributes(mode, certs):
    """getpeercert, cipher, ALPN, context, fileno; a second connection
    resumes the first one's session."""
    ctx = certs.client()
    ctx.set_alpn_protocols(["http/1.1"])
    with tls_server(mode, certs) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        fd = raw.fileno()
        with ctx.wrap_socket(raw, server_hostname=HOST) as s:
            check_path(s, mode)
            assert s.fileno() == fd and s.gettimeout() == DEADLINE
            assert s.context is ctx and s.server_hostname == HOST and not s.server_side
            s.context = ctx                         # the setter reaches the engine
            assert s.context is ctx
            assert s.selected_alpn_protocol() == "http/1.1"
            assert s.cipher()[1] == "TLSv1.3" and s.version() == "TLSv1.3"
            cert = s.getpeercert()
            assert ("IP Address", HOST) in cert["subjectAltName"]
            assert isinstance(s.getpeercert(binary_form=True), bytes)
            assert not s.session_reused
            s.sendall(b"echo\nping")
            assert recv_exact(s, 4) == b"ping"    # the session tickets came before
            session = s.session
            assert session is not None and session.has_ticket
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        with ctx.wrap_socket(raw, server_hostname=HOST, session=session) as s:
            check_path(s, mode)
            assert s.session_reused
            s.sendall(b"echo\npong")
            assert recv_exact(s, 4) == b"pong"


def test_unwrap_back_to_plain(mode, certs):
    """unwrap(): both sides exchange close_notify; the same object goes on
    as a plain socket, on shared memory in shm mode."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"unwrap\n")
            assert recv_line(s) == b"unwrapping\n"
            plain = s.unwrap()
            assert plain is s
            assert s.version() is None and s.pending() == 0 and s.cipher() is None
            with pytest.raises(ValueError, match="No SSL wrapper"):
                s.unwrap()
            plain.sendall(b"hello\n")
            assert recv_line(plain) == b"plain hello\n"
            assert shrimpio.info(plain)["path"] == ("shm" if mode == "shm" else "tcp")


def test_close_notify(mode, certs):
    """A non-blocking unwrap() sends close_notify and wants the peer's
    (unless it is already there: the C engine tries SSL_shutdown twice);
    reading the peer's answer then raises SSLZeroReturnError (both sides
    have shut down), and unwrap() completes."""
    with tls_server(mode, certs) as srv:
        with connect(srv.port, certs) as s:
            check_path(s, mode)
            s.sendall(b"await-close\nping")
            assert recv_exact(s, 4) == b"ping"         # the session tickets came before
            s.setblocking(False)
            try:
                assert s.unwrap() is s
            except ssl.SSLWantReadError:
                wait_io(s, True, "select")
                with pytest.raises(ssl.SSLZeroReturnError) as exc:
                    s.recv(10)
                assert exc.value.args[0] == ssl.SSL_ERROR_ZERO_RETURN
                assert s.unwrap() is s
            assert s.version() is None


# ---------------------------------------------------------------------------
# Ways in


def test_wrap_before_connect(mode, certs):
    """wrap_socket on an unconnected socket, then connect() (and
    connect_ex): the path is chosen by connect, the engine after it."""
    with tls_server(mode, certs) as srv:
        for use_ex in (False, True):
            s = certs.client().wrap_socket(socket.socket(), server_hostname=HOST)
            with s:
                assert s.version() is None
                s.settimeout(DEADLINE)
                if use_ex:
                    assert s.connect_ex((HOST, srv.port)) == 0
                else:
                    s.connect((HOST, srv.port))
                check_path(s, mode)
                with pytest.raises(ValueError, match="already-connected"):
                    s.connect((HOST, srv.port))
                s.sendall(b"echo\nping")
                assert recv_exact(s, 4) == b"ping"


def test_starttls(mode, certs):
    """A plain exchange first, then both sides wrap the same connection
    (STARTTLS): TLS picks up the stream where the plain bytes ended."""
    with tls_server(mode, certs, TLS_STARTTLS="1") as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        if mode == "shm":
            assert shrimpio.info(raw)["path"] == "shm"
        raw.sendall(b"STARTTLS\n")
        assert recv_line(raw) == b"go ahead: STARTTLS\n"
        with certs.client().wrap_socket(raw, server_hostname=HOST) as s:
            check_path(s, mode)
            s.sendall(b"echo\nping")
            assert recv_exact(s, 4) == b"ping"


def test_ssl_imported_before_patch(mode, certs):
    """A program that imported ssl and made its context before
    ``import shrimpio.patch`` still gets TLS over shared memory."""
    with tls_server(mode, certs) as srv:
        prog = _write("import_first.py", IMPORT_FIRST_CLIENT)
        res = subprocess.run([sys.executable, prog, str(srv.port), "patch" if mode == "shm" else "plain"],
                             capture_output=True, env=child_env(certs.env), timeout=DEADLINE * 2)
        assert res.returncode == 0, res.stderr.decode()
        path = "shm" if mode == "shm" else "tcp"
        assert res.stdout.decode() == f"ping True TLSv1.3 {path}\n"


def test_https_requests_and_urllib(mode, certs):
    """A patched http.server with a TLS listener serves requests (one
    keep-alive session) and urllib.request over https, both verifying with
    the trustme CA; in shm mode all three connections are on shared memory
    (both processes' reports)."""
    pytest.importorskip("requests")
    with tls_server(mode, certs, HTTPS_SERVER) as srv:
        out, client = run_client(_write("https_client.py", HTTPS_CLIENT), [srv.port],
                                 patched=mode == "shm", env=certs.env)
        assert out == expected_https()
        if mode == "shm":
            assert len(client) == 3, client
            assert_tls_paired(client, server_records(srv, 3))
        else:
            assert client == [] and records_when_idle(srv) == []


def assert_tls_paired(client, served) -> None:
    """Each client connection has the server's record of it, both on
    shared memory; the counts agree, but that the server may have sent one
    record more than the client read: the alert OpenSSL sends when it
    reads the client's EOF without close_notify (it goes out over TCP too,
    to a socket that is closed)."""
    for c in client:
        match = [r for r in served if tuple(r["peer"]) == tuple(c["local"])
                 and tuple(r["local"]) == tuple(c["peer"])]
        assert len(match) == 1, (c, served)
        r = match[0]
        assert c["path"] == r["path"] == SHM, (c, r)
        assert c["bytes_sent"] == r["bytes_received"] > 0, (c, r)
        assert r["bytes_sent"] - c["bytes_received"] in (0, ALERT), (c, r)


ALERT = 24      # a TLS 1.3 alert record: header 5, alert 2, type 1, AEAD tag 16


def test_patched_server_plain_client(certs):
    """A patched TLS server (its listener wrapped) and a plain client: the
    connection is kernel TCP, and TLS works on both sides."""
    pytest.importorskip("requests")
    with tls_server("shm", certs, HTTPS_SERVER) as srv:
        out, client = run_client(_write("https_client.py", HTTPS_CLIENT), [srv.port],
                                 patched=False, env=certs.env)
        assert out == expected_https()
        assert client == []


def test_kernel_connections_keep_the_stdlib_class(certs):
    """Under the patch, a connection that went to kernel TCP (a plain
    server) keeps the stdlib's C engine: in shrimpio's class, which holds
    its ``shrimpio stat`` slot (a non-shrimpio socket keeps ssl.SSLSocket);
    disable() puts the stdlib's class back."""
    with tls_server("stdlib", certs) as srv:
        patch.enable()
        try:
            assert ssl.SSLContext.sslsocket_class is _tls.SSLSocket
            with connect(srv.port, certs) as s:
                assert isinstance(s, ssl.SSLSocket)
                assert type(s._sslobj) is not _tls._Engine
                assert s._tcp is not None                  # listed while open
                assert shrimpio.info(s)["path"] == "tcp"
                s.sendall(b"echo\nping")
                assert recv_exact(s, 4) == b"ping"
            assert s._tcp is None
            # Wrapped before connect(): shrimpio's class (the path was not
            # known yet), with the stdlib's C engine on the kernel socket.
            with certs.client().wrap_socket(socket.socket(), server_hostname=HOST) as s:
                assert type(s) is _tls.SSLSocket
                s.settimeout(DEADLINE)
                s.connect((HOST, srv.port))
                assert shrimpio.info(s)["path"] == "tcp"
                assert shrimpio.info(s)["reason"] == "no shrimpio listener"
                assert type(s._sslobj) is not _tls._Engine
                s.sendall(b"echo\nping")
                assert recv_exact(s, 4) == b"ping"
            raw = shrimpio.socket.StdSocket()
            raw.settimeout(DEADLINE)
            raw.connect((HOST, srv.port))
            with certs.client().wrap_socket(raw, server_hostname=HOST) as s:
                assert type(s) is ssl.SSLSocket
                s.sendall(b"echo\npong")
                assert recv_exact(s, 4) == b"pong"
        finally:
            patch.disable()
        assert ssl.SSLContext.sslsocket_class is ssl.SSLSocket


@pytest.mark.skipif(not hasattr(ssl, "wrap_socket"), reason="ssl.wrap_socket is gone (3.12)")
def test_module_wrap_socket(mode, certs):
    """The deprecated ssl.wrap_socket makes its context with SSLContext, so
    it takes the same path."""
    with tls_server(mode, certs) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=DEADLINE)
        with pytest.warns(DeprecationWarning):
            s = ssl.wrap_socket(raw, cert_reqs=ssl.CERT_REQUIRED, ca_certs=certs.ca)
        with s:
            check_path(s, mode)
            s.sendall(b"echo\nping")
            assert recv_exact(s, 4) == b"ping"


def test_escaped_fd_keeps_tls(certs):
    """Under the patch, a TLS-over-shm socket whose fd is given to a child
    process escapes to a kernel stream (shrimpio._escape); TLS carries on
    over it, and the server's side of the connection stays on shared
    memory."""
    with tls_server("shm", certs) as srv:
        patch.enable()
        try:
            with connect(srv.port, certs) as s:
                check_path(s, "shm")
                s.sendall(b"echo\nping")
                assert recv_exact(s, 4) == b"ping"
                subprocess.run([sys.executable, "-c", "pass"], pass_fds=[s.fileno()], check=True,
                               timeout=DEADLINE)
                info = shrimpio.info(s)
                assert (info["path"], info["reason"]) == ("tcp", "fd escaped: fd given to a child process")
                payload = os.urandom(100_000)
                s.sendall(payload)
                assert recv_exact(s, len(payload)) == payload
                s.settimeout(0.2)
                with pytest.raises(TimeoutError, match="^The read operation timed out$"):
                    s.recv(10)
                assert s.gettimeout() == 0.2
        finally:
            patch.disable()
        check_server_report(srv, "shm", 1)
