"""A Dask distributed client for the pipeline: an existing scheduler, or a private LocalCluster.

`tasks.reduce.pca` works under any active scheduler; this only decides which one is active.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster


@contextmanager
def dask_client(
    address: str | None = None, workers: int = 1, threads_per_worker: int | None = None
) -> Iterator[Client]:
    """Yield a Client (the default scheduler inside the block) and close it cleanly.

    With `address`, connect to that scheduler (its cluster stays up). Otherwise start a
    LocalCluster of `workers` processes (processes, not threads: numpy releases the GIL but
    zarr decoding and Python glue do not). Every port is chosen by the OS, so several
    pipelines (or tests) run side by side without clashes: ``dashboard_address=None`` still
    binds the scheduler's HTTP server to 8787 (and warns when it is taken), ``":0"`` does not.
    """
    if address is not None:
        with Client(address) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
