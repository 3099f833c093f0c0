"""ftplib client: ``ftp_client.py port``: STOR and RETR of a few MB
(passive mode), content compared."""

import ftplib
import io
import sys

from appdata import TIMEOUT, blob, digest

port = int(sys.argv[1])
data = blob(3_000_000)
with ftplib.FTP() as ftp:
    ftp.connect("127.0.0.1", port, timeout=TIMEOUT)
    ftp.login("user", "secret")
    ftp.storbinary("STOR upload.bin", io.BytesIO(data))
    print(f"stored {len(data)} {digest(data)}")
    assert "upload.bin" in ftp.nlst(), ftp.nlst()
    got = bytearray()
    ftp.retrbinary("RETR upload.bin", got.extend)
    assert bytes(got) == data, (len(got), digest(bytes(got)))
    print(f"retrieved {len(got)} {digest(bytes(got))}")
    ftp.quit()
print("done")
