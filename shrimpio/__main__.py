"""The ``shrimpio`` command (also ``python -m shrimpio``).

    shrimpio run prog.py [args...]      run an unmodified program over shrimpio
    shrimpio run -m module [args...]    the same for ``python -m module``
    shrimpio pingpong [--quick] [--json] [--doorbells]
        VMMC put + notify round trip and 1 MiB put bandwidth between two
        processes pinned to two cores, beside a Unix socket and a minimal
        Cython spin loop, measured in the same run.
    shrimpio bench-socket [--quick] [--json]
        blocking 64-byte round trip and 1 MiB bandwidth: shrimpio over shared
        memory beside kernel TCP loopback and a Unix socket, same code.
    shrimpio bench-asyncio [--quick] [--json]
        asyncio: streams 64-byte round trip, 10-client 1 KiB echo (Protocol
        and streams servers), aiohttp hello world; the shrimpio loop over
        shared memory beside uvloop over TCP loopback, same code.
    shrimpio bench [--quick] [--json] [--plot FILE.png] [--rows KEY,...]
        all of the above in one run, plus connect+accept time and the CPU
        of an idle connected pair, beside TCP, Unix sockets, uvloop and
        pyzmq; a table with ratios and the project's goals (docs/bench.md).
    shrimpio stat [--json] [--watch SECONDS] [--no-sweep]
        every shrimpio listener and connection of this user on this host,
        live: pid and program, addresses, path, bytes each way, ring fill,
        who waits (docs/stat.md).
    shrimpio chaos [--minutes N] [--seed S] [--scenario NAME] [--fuzz-seconds N] [--keep]
        the chaos suite (docs/chaos.md): rounds of hostile, killed and
        fd-starved peers in real processes against every API, checked for
        crashes, hangs, spins, leaks and data errors; then coverage-guided
        fuzzing of the peer-input parsers (needs atheris); prints the counts.
"""

from __future__ import annotations

import argparse
import os
import sys


def _run(argv: list[str]) -> int:
    """Replace this process with ``python prog args`` patched from its first
    import on (and its Python children too)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: shrimpio run prog.py [args...] | shrimpio run -m module [args...]")
        return 0 if argv else 2
    if argv[0] == "-m":
        if len(argv) < 2:
            print("shrimpio run: -m needs a module name", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", argv[1], *argv[2:]]
    else:
        if not os.path.exists(argv[0]):
            print(f"shrimpio run: {argv[0]}: no such file", file=sys.stderr)
            return 2
        cmd = [sys.executable, argv[0], *argv[1:]]
    from .patch import child_environment  # importing patch also patches us: harmless, we exec
    env = dict(os.environ)
    child_environment(env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return 127   # not reached


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shrimpio`` and ``python -m shrimpio``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":        # everything after 'run' belongs to the program
        return _run(argv[1:])
    ap = argparse.ArgumentParser(prog="shrimpio", description="shared-memory communication for Python")
    sub = ap.add_subparsers(dest="command", required=True)
    from .bench import runner
    from .bench.rows import aio, sockets, vmmc

    sub.add_parser("run", help="run an unmodified program (prog.py or -m module) over shrimpio")
    pp = sub.add_parser("pingpong", help="VMMC round trip and bandwidth beside a Unix socket")
    vmmc.add_arguments(pp)
    bs = sub.add_parser("bench-socket", help="blocking sockets: shrimpio vs TCP vs Unix socket")
    sockets.add_arguments(bs)
    ba = sub.add_parser("bench-asyncio", help="asyncio: shrimpio loop vs uvloop over TCP")
    aio.add_arguments(ba)
    bm = sub.add_parser("bench", help="the whole benchmark matrix, with peers and goals")
    runner.add_arguments(bm)
    from . import _stat
    st = sub.add_parser("stat", help="list this user's shrimpio listeners and connections")
    _stat.add_arguments(st)
    from . import _chaos
    ch = sub.add_parser("chaos", help="chaos and fuzz suite: hostile, dying and fd-starved peers")
    _chaos.add_arguments(ch)
    args = ap.parse_args(argv)
    if args.command == "stat":
        return _stat.main(args)
    if args.command == "chaos":
        return _chaos.main(args)
    if args.command == "bench":
        return runner.main(args)
    if args.command == "pingpong":
        vmmc.main(args)
    elif args.command == "bench-socket":
        sockets.main(args)
    elif args.command == "bench-asyncio":
        aio.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
