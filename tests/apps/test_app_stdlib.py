"""App matrix: stdlib idioms that go below socket.recv/send: blocking TLS
(ssl wrap_socket on both sides), socket.sendfile and os.sendfile, asyncio's
loop.sock_* on a socket of the stdlib's own class, loop.add_reader /
add_writer on accepted sockets' fds."""

from __future__ import annotations

import pytest

from apprunner import Apps, appdata, assert_shm, need

pytestmark = [pytest.mark.apps]


@pytest.mark.timeout(60)
def test_blocking_tls_echo(tmp_path):
    need("trustme")
    import trustme
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with Apps() as apps:
        srv = apps.start("server", ["tls_echo_server.py", tmp_path / "server.pem", tmp_path / "server.pem"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["tls_echo_client.py", port, tmp_path / "ca.pem"])
        client = apps.procs[-1]
        apps.stop(srv)
        assert out.count("20 lines and 300001 bytes echoed") == 2, out
        assert_shm(srv, client, at_least=2)


@pytest.mark.parametrize("mode", [
    "socket",
    "os",
])
@pytest.mark.timeout(60)
def test_sendfile(mode, tmp_path):
    data = appdata.blob(4_000_000)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    with Apps() as apps:
        srv = apps.start("server", ["sendfile_server.py", mode])
        port = apps.wait_port(srv)
        out = apps.run("client", ["sendfile_client.py", port, mode, path])
        client = apps.procs[-1]
        apps.stop(srv)
        assert f"server got {len(data)} {appdata.digest(data)}" in out, out
        assert f"got back {len(data)} {appdata.digest(data)}" in out, out
        assert_shm(srv, client)


@pytest.mark.timeout(60)
def test_loop_sock_calls_on_stdlib_socket():
    with Apps() as apps:
        srv = apps.start("server", ["line_echo_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["sock_loop_client.py", port])
        apps.stop(srv)
        big = appdata.blob(1_000_000).replace(b"\n", b".") + b"\n"
        assert f"20 lines and {len(big)} bytes echoed, {appdata.digest(big)}" in out, out
        # The client's socket is the stdlib's class (no report of its own):
        # the server's record of the connection says which path it took.
        assert_shm(srv)


@pytest.mark.timeout(60)
def test_loop_add_reader_on_accepted_socket():
    with Apps() as apps:
        srv = apps.start("server", ["add_reader_server.py"])
        port = apps.wait_port(srv)
        out = apps.run("client", ["line_echo_client.py", port, 2])
        client = apps.procs[-1]
        apps.stop(srv)
        assert out.count("20 lines and 300001 bytes echoed") == 2, out
        assert_shm(srv, client, at_least=2)
