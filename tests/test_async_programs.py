"""Unmodified asyncio programs over shrimpio, as real processes.

The programs of ``tests/async_programs.py`` (asyncio streams, an asyncio
``Protocol`` server, aiohttp server and client, websockets server and
client, httpx ``AsyncClient``) run as subprocesses by
``tests/program_py``, as those of ``tests/test_programs.py``: both
sides patched (``python -m shrimpio run``, under which plain
``asyncio.run`` gets the shrimpio loop), then one side a plain ``python``
(plain asyncio event loop, kernel TCP).

Both patched: every connection must be on shared memory, which is read from
the ``SHRIMPIO_REPORT`` lines both processes write when a transport closes
its socket, paired client/server with matching byte counts.

One side plain: the transcript must be right (a plain process can only
speak kernel TCP, so a right transcript means the patched side fell back),
and the patched side must report no shared-memory connection.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import program_runner
from async_programs import expected_aiohttp, expected_httpx, expected_streams_echo, expected_websockets
from program_runner import (SHM, TCP, assert_paired, assert_tcp, read_report, records_when_idle,
                            run_client, server_records)

#: Nothing of this may appear in a server's stderr: an error the event loop
#: only logs ("Fatal read error", "Task exception was never retrieved", an
#: exception in a callback) would otherwise go unnoticed.
_TROUBLE = re.compile(r"Traceback|Error|[Ee]xception|never retrieved|was destroyed")


def server(name: str, *, patched: bool):
    """``program_runner.server`` for an async program: once it is stopped
    (SIGINT, reaped), its stderr must show no error the event loop logged."""
    return program_runner.server(name, patched=patched, stderr_must_not_match=_TROUBLE)


# (server, client, expected transcript, connections the client makes;
# None: as many as its connection pool decides, at least one)
PAIRS = {
    "streams-echo": ("streams_echo_server.py", "streams_echo_client.py", expected_streams_echo(), 3),
    "protocol-server": ("protocol_echo_server.py", "streams_echo_client.py", expected_streams_echo(), 3),
    "aiohttp": ("aiohttp_server.py", "aiohttp_client.py", expected_aiohttp(), None),
    "websockets": ("websockets_server.py", "websockets_client.py", expected_websockets(), 1),
    "httpx-aiohttp": ("aiohttp_server.py", "httpx_client.py", expected_httpx(), 1),
}

_LIBS = {"aiohttp": ("aiohttp",), "websockets": ("websockets",), "httpx-aiohttp": ("aiohttp", "httpx")}


def _need(pair: str) -> None:
    for lib in _LIBS.get(pair, ()):
        pytest.importorskip(lib)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_both_patched_use_shared_memory(pair):
    _need(pair)
    server_prog, client_prog, expected, nconn = PAIRS[pair]
    with server(server_prog, patched=True) as srv:
        out, client = run_client(client_prog, [srv.port], patched=True)
        assert out == expected
        if nconn is None:
            assert len(client) >= 1, client
        else:
            assert len(client) == nconn, client
        assert all(r["pid"] != srv.proc.pid for r in client), client
        served = server_records(srv, len(client))
        assert_paired(client, served, SHM)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_plain_server_patched_client_falls_back(pair):
    """The patched client (shrimpio loop) finds no shrimpio listener and
    connects by kernel TCP: the plain server's transcript is right."""
    _need(pair)
    server_prog, client_prog, expected, _nconn = PAIRS[pair]
    with server(server_prog, patched=False) as srv:
        out, client = run_client(client_prog, [srv.port], patched=True)
        assert out == expected
        assert [r for r in client if r["path"] != TCP] == [], client
    assert read_report(srv.report) == []    # the plain server really was plain


@pytest.mark.parametrize("pair", list(PAIRS))
def test_patched_server_plain_client_falls_back(pair):
    """The patched server (shrimpio loop, shrimpio listener) serves a plain
    asyncio client over kernel TCP."""
    _need(pair)
    server_prog, client_prog, expected, _nconn = PAIRS[pair]
    with server(server_prog, patched=True) as srv:
        out, client = run_client(client_prog, [srv.port], patched=False)
        assert out == expected
        assert client == []                         # the plain client really was plain
        served = records_when_idle(srv)
        assert [r for r in served if r["path"] != TCP] == [], served


# ---------------------------------------------------------------------------
# Reports of connections that fell back to TCP.
#
# uvloop drives them, but on a shrimpio socket that knows its path and why
# (transport/_fallback.py): each writes its line, with the byte counts the
# kernel kept (uvloop moved the bytes, not the socket layer).


#: What streams_echo_client.py sends (and gets back) on each connection.
_ECHO_BYTES = sum(len(b"conn 0 line %d\n" % i) for i in range(20)) + 1_000_000


def _assert_echo_counts(records: list[dict]) -> None:
    """The kernel's byte counts are the data, exactly, both ways: the SYN and
    the FINs (which take a sequence number each) are not bytes."""
    assert sorted((r["bytes_sent"], r["bytes_received"]) for r in records) \
        == [(_ECHO_BYTES, _ECHO_BYTES)] * 3, records


def test_fallback_client_connection_is_reported():
    with server("streams_echo_server.py", patched=False) as srv:
        out, client = run_client("streams_echo_client.py", [srv.port], patched=True)
        assert out == expected_streams_echo()
        assert_tcp(client, 3, "no shrimpio listener")
        _assert_echo_counts(client)


def test_fallback_server_connection_is_reported():
    with server("streams_echo_server.py", patched=True) as srv:
        out, _ = run_client("streams_echo_client.py", [srv.port], patched=False)
        assert out == expected_streams_echo()
        records = records_when_idle(srv)
        assert_tcp(records, 3, "peer is not shrimpio")
        _assert_echo_counts(records)


_RESETTING_CLIENT = """
import socket, struct, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"x" * 777)
got = 0
while got < 777:
    got += len(sock.recv(65536))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
sock.close()                 # a reset, no FIN
print("reset after", got)
"""


def test_fallback_server_connection_reset_is_counted(tmp_path):
    """A plain client that resets the connection (no FIN) after its data:
    the server's line counts the data alone.  (The server's echo task dies
    of the reset, which asyncio logs: its stderr is not checked here.)"""
    client = tmp_path / "resetting_client.py"
    client.write_text(_RESETTING_CLIENT)
    with program_runner.server("streams_echo_server.py", patched=True) as srv:
        out, _ = run_client(str(client), [srv.port], patched=False)
        assert out == "reset after 777\n"
        records = records_when_idle(srv)
        assert_tcp(records, 1, "peer is not shrimpio")
        assert (records[0]["bytes_sent"], records[0]["bytes_received"]) == (777, 777), records


# ---------------------------------------------------------------------------
# The asyncio examples of the README, as documented (few rounds).

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> str:
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not here (installed package without the source tree)")
    return str(path)


@pytest.mark.parametrize("client_flag", ["patched", "shrimpio.run"])
def test_example_asyncio_echo(client_flag):
    """``shrimpio run examples/asyncio_echo_server.py``; the client patched
    or with ``--shrimpio-run`` (no patch): both on shared memory."""
    client = _example("asyncio_echo_client.py")
    with server(_example("asyncio_echo_server.py"), patched=True) as srv:
        if client_flag == "patched":
            out, records = run_client(client, [srv.port, 200], patched=True)
        else:
            out, records = run_client(client, [srv.port, 200, "--shrimpio-run"], patched=False)
        assert re.fullmatch(r"200 round trips of 64 bytes, median [\d.]+ us "
                            r"\(shrimpio\.transport\._loop\.Loop\)\n", out), out
        assert len(records) == 1 and records[0]["path"] == SHM, records
        assert records[0]["bytes_sent"] == records[0]["bytes_received"] == 200 * 64, records
        assert_paired(records, server_records(srv, 1), SHM)


def test_example_aiohttp():
    pytest.importorskip("aiohttp")
    with server(_example("aiohttp_app.py"), patched=True) as srv:
        out, records = run_client(_example("aiohttp_client.py"), [srv.port, 200, 4], patched=True)
        assert re.fullmatch(r"'Hello, World!': 200 keep-alive requests, 4 in flight, \d+ requests/s\n",
                            out), out
        assert 1 <= len(records) <= 4, records          # the connector's limit
        assert_paired(records, server_records(srv, len(records)), SHM)
