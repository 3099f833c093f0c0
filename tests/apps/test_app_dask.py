"""App matrix: dask.distributed: a scheduler, a worker and a client, each a
process under ``shrimpio run``; a small computation; every comm on shared
memory."""

from __future__ import annotations

import pytest

from apprunner import Apps, appdata, assert_shm, free_port, need

pytestmark = [pytest.mark.apps]


@pytest.mark.timeout(90)
def test_dask_distributed(tmp_path):
    need("distributed")
    port = free_port()
    with Apps() as apps:
        sched = apps.start("scheduler", ["-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                         "--port", port, "--no-dashboard"])
        apps.wait_output(sched, r"Scheduler at:")
        worker = apps.start("worker", ["-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                                       "--no-nanny", "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1", "--local-directory", tmp_path])
        # The worker's registration: the first comm between two processes.
        apps.wait_output(sched, r"Register worker", timeout=20)
        out = apps.run("client", ["dask_client.py", port], timeout=40)
        client = apps.procs[-1]
        apps.stop(worker)
        apps.stop(sched)
        assert f"sum of squares {sum(x * x for x in range(20))}" in out, out
        assert f"blob 1000000 {appdata.digest(appdata.blob(1_000_000))}" in out, out
        assert "scattered 500000" in out and out.rstrip().endswith("done"), out
        assert_shm(sched, worker, client)
