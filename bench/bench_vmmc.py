"""VMMC benchmark; the implementation is ``shrimpio._bench`` (shared with
``python -m shrimpio pingpong``).

    python bench/bench_vmmc.py [--quick] [--json] [--doorbells]
"""

import argparse

from shrimpio import _bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=_bench.__doc__.splitlines()[0])
    _bench.add_arguments(ap)
    _bench.main(ap.parse_args())
