"""Flows that scale out from inside the run (tests/integration/test_dask.py): a
DaskTaskRunner on a LocalCluster of worker processes, and Coiled clusters and functions."""

import os
import sys
import time

from prefect import flow, task
from prefect_dask import DaskTaskRunner


@task
def square(i: int, pause: float) -> dict:
    time.sleep(pause)  # long enough that the scheduler spreads the tasks over both workers
    return {"value": i * i, "pid": os.getpid(), "prefix": sys.prefix}


@flow(
    persist_result=True,
    task_runner=DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 2,
            "processes": True,
            "threads_per_worker": 1,
            "dashboard_address": ":0",  # any free port: runs may share a machine
        }
    ),
)
def dask_squares(n: int = 6, pause: float = 0.5) -> dict:
    """Squares 0..n-1 on the Dask workers; returns where everything ran."""
    import dask
    import distributed
    import prefect_dask

    futures = square.map(range(n), pause=pause)
    done = [future.result() for future in futures]
    return {
        "squares": [each["value"] for each in done],
        "task_pids": sorted({each["pid"] for each in done}),
        "task_prefixes": sorted({each["prefix"] for each in done}),
        "flow_pid": os.getpid(),
        "prefix": sys.prefix,
        "modules": {m.__name__: m.__file__ for m in (dask, distributed, prefect_dask)},
    }


@flow
def coiled_cluster() -> None:
    """Asks Coiled for a cluster; the API it reaches is whatever DASK_COILED__SERVER says."""
    import coiled

    with coiled.Cluster(n_workers=1, name="rvm-test", software="rvm-test-senv"):
        pass


@flow
def coiled_function() -> int:
    """Calls a @coiled.function, which starts its cluster on the first call."""
    import coiled

    @coiled.function(n_workers=1)
    def double(x: int) -> int:
        return 2 * x

    return double(21)
