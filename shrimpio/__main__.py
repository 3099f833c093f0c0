"""The ``shrimpio`` command.

    shrimpio pingpong [--quick] [--json] [--doorbells]
        VMMC put + notify round trip and 1 MiB put bandwidth between two
        processes pinned to two cores, beside a Unix socket and a minimal
        Cython spin loop, measured in the same run.

Later layers add ``run`` (an unmodified program over shrimpio), ``stat`` and
``bench``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shrimpio`` and ``python -m shrimpio``."""
    ap = argparse.ArgumentParser(prog="shrimpio", description="shared-memory communication for Python")
    sub = ap.add_subparsers(dest="command", required=True)
    from . import _bench

    pp = sub.add_parser("pingpong", help="VMMC round trip and bandwidth beside a Unix socket")
    _bench.add_arguments(pp)
    args = ap.parse_args(argv)
    if args.command == "pingpong":
        _bench.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
