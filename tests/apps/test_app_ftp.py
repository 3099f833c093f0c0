"""App matrix: pyftpdlib server + ftplib client (control and passive data
connections), STOR and RETR of a few MB, content compared on both sides."""

from __future__ import annotations

import pytest

from apprunner import Apps, appdata, assert_shm, need

pytestmark = [pytest.mark.apps]


@pytest.mark.timeout(60)
def test_pyftpdlib_server_ftplib_client(tmp_path):
    need("pyftpdlib")
    home = tmp_path / "ftproot"
    home.mkdir()
    with Apps() as apps:
        srv = apps.start("server", ["ftp_server.py", home])
        port = apps.wait_port(srv)
        out = apps.run("client", ["ftp_client.py", port])
        client = apps.procs[-1]
        apps.stop(srv)
        data = appdata.blob(3_000_000)
        assert f"retrieved {len(data)} {appdata.digest(data)}" in out, out
        assert (home / "upload.bin").read_bytes() == data
        # The control connection and the passive data connections of STOR,
        # NLST and RETR.
        assert_shm(srv, client, at_least=4)
