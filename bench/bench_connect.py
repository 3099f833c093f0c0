"""Connection set-up: connect + accept + 1-byte exchange + close, shrimpio
shared memory vs kernel TCP loopback vs a Unix socket, measured by
``shrimpio._bench_conn.bench_connect`` (two processes pinned to two cores).

The machine is noisy (a VM on a shared host), so the kinds are measured in
interleaved rounds, each run in a fresh interpreter, and the report gives the
median of the rounds' medians beside the pooled percentiles.  ``--tree DIR``
measures the ``shrimpio`` kind of another checkout as well (built in place),
labelled ``shrimpio@DIR``: a before/after comparison in the same run.

    python bench/bench_connect.py [--rounds 5] [-n 3000] [--tree ../old] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = ("import sys, json; sys.path.insert(0, sys.argv[1]);"
         "from shrimpio._bench_conn import bench_connect;"
         "print(json.dumps(bench_connect(sys.argv[2], int(sys.argv[3]))['samples']))")


def _pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))] / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=3000, help="connections per kind and round")
    ap.add_argument("--tree", action="append", default=[],
                    help="another checkout whose shrimpio kind to measure too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [(f"shrimpio@{t}", os.path.abspath(t), "shrimpio") for t in args.tree]
    runs += [(kind, HERE, kind) for kind in ("shrimpio", "tcp", "unix")]
    res: dict[str, list[list[int]]] = {label: [] for label, _, _ in runs}
    for _ in range(args.rounds):
        for label, tree, kind in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, tree, kind, str(args.n)],
                                 capture_output=True, text=True, check=True, cwd="/").stdout
            res[label].append(json.loads(out))
    table = {}
    for label, rounds in res.items():
        pooled = [v for r in rounds for v in r]
        table[label] = {"median_of_medians_us": statistics.median(
                            statistics.median(r) / 1000 for r in rounds),
                        "round_medians_us": [statistics.median(r) / 1000 for r in rounds],
                        "p50_us": _pct(pooled, 0.5), "p90_us": _pct(pooled, 0.9),
                        "p99_us": _pct(pooled, 0.99), "n": len(pooled)}
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'':24s}{'median*':>9s}{'p50':>9s}{'p90':>9s}{'p99':>9s}   round medians (us)")
    for label, t in table.items():
        print(f"{label:24s}{t['median_of_medians_us']:9.1f}{t['p50_us']:9.1f}{t['p90_us']:9.1f}"
              f"{t['p99_us']:9.1f}   " + " ".join(f"{m:.0f}" for m in t["round_medians_us"]))
    print("* median of the rounds' medians; p50/p90/p99 of all samples pooled")


if __name__ == "__main__":
    main()
