"""The roles a chaos process can play (``python -m shrimpio._chaos.proc ROLE JSON``)."""

from __future__ import annotations

from . import fdplay, hello, streams, vmmc

ROLES = {
    "server": streams.server,
    "client": streams.client,
    "hostile_hellos": hello.hostile_hellos,
    **vmmc.ROLES,
    **fdplay.ROLES,
}
