"""dask.distributed client: ``dask_client.py scheduler_port``.  A small
computation on the cluster (one worker), results checked."""

import sys

from distributed import Client

from appdata import blob, digest


def square(x):
    return x * x


def make(n):
    from appdata import blob
    return blob(n)


with Client(f"tcp://127.0.0.1:{sys.argv[1]}", timeout=10) as client:
    client.wait_for_workers(1, timeout=20)
    futures = client.map(square, range(20))
    total = client.submit(sum, futures).result(timeout=20)
    assert total == sum(x * x for x in range(20)), total
    print(f"sum of squares {total}")
    data = client.submit(make, 1_000_000).result(timeout=20)
    assert data == blob(1_000_000), digest(data)
    print(f"blob {len(data)} {digest(data)}")
    big = client.scatter(blob(500_000))
    n = client.submit(len, big).result(timeout=20)
    assert n == 500_000, n
    print(f"scattered {n}")
print("done")
