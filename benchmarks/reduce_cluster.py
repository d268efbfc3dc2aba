"""Benchmark: where the PCA passes run, and what they send to the calling process.

Builds (or opens) a synthetic float32 Zarr array (benchmarks/reduce.py's generator), then fits
each method and projects every row four ways:

* here, threads: no cluster; Dask's threads read blocks and this process multiplies them
  (the path used without a distributed client);
* workers, threads: the same passes as task graphs on Dask's threads (what the cluster path
  costs on one machine);
* here, cluster: a 2-worker LocalCluster reads the blocks and ships them to this process
  (the cluster path before tasks/reduce/_passes.py);
* workers, cluster: the 2-worker LocalCluster runs the passes and returns small results.

Prints, per pass, the bytes this process received against the bytes of the rows the pass
covered (from tasks/reduce's DEBUG records), and each fit's wall time; the agreement of each
way with the first (largest difference of components and of projected rows).

    .venv/bin/python -m benchmarks.reduce_cluster --rows 2000 --cols 25088
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from benchmarks.reduce import build

WAYS = (("here", False), ("workers", False), ("here", True), ("workers", True))
WAY_NAMES = ["here-threads", "workers-threads", "here-cluster", "workers-cluster"]


class _Bytes(logging.Handler):
    """phase -> [passes, bytes received, bytes of rows] from tasks/reduce's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.phases: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "pca_client_bytes"):
            entry = self.phases[record.pca_phase]
            entry[0] += 1
            entry[1] += record.pca_client_bytes
            entry[2] += record.pca_data_bytes


def _estimator(method: str, variance: float):
    from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA

    if method == "incremental":
        return ScaledIncrementalPCA(variance=variance)
    return ScaledPCA(variance=variance, method=method)


def run(path: Path, methods: list[str], variance: float, ways: list[str]) -> None:
    import dask.array as da

    from tasks.cluster import dask_client
    from tasks.reduce._passes import use

    X = da.from_zarr(str(path))
    print(
        f"data: {X.shape} float32, {X.nbytes / 2**20:.0f} MiB, chunks of {X.chunks[0][0]} rows;"
        f" {os.cpu_count()} cores, load {os.getloadavg()}"
    )
    handler = _Bytes()
    logger = logging.getLogger("featurepipe.reduce")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind, on_cluster in (WAYS[WAY_NAMES.index(way)] for way in ways):
        cluster = dask_client(workers=2, threads_per_worker=1) if on_cluster else nullcontext()
        with cluster, use(kind):
            for method in methods:
                handler.phases.clear()
                began = time.perf_counter()
                est = _estimator(method, variance).fit(X)
                fitted = time.perf_counter() - began
                projected = est.project(X)
                total = time.perf_counter() - began
                way = f"{kind}, {'cluster' if on_cluster else 'threads'}"
                print(
                    f"\n{method} [{way}]: fit {fitted:.1f} s, fit + projection {total:.1f} s, "
                    f"k = {est.n_components_}, load {os.getloadavg()[0]:.2f}"
                )
                if method in first:
                    components, rows = first[method]
                    print(
                        f"  vs the first way: components within "
                        f"{np.abs(est.components_ - components).max():.2e}, projected rows within"
                        f" {np.abs(projected - rows).max():.2e}"
                    )
                else:
                    first[method] = est.components_, projected
                print(f"  {'pass':<34} {'count':>5} {'MiB received':>13} {'MiB of rows':>12}")
                for phase, (count, received, data) in handler.phases.items():
                    print(
                        f"  {phase:<34} {count:>5} {received / 2**20:>13.2f} {data / 2**20:>12.1f}"
                    )
    logger.removeHandler(handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--cols", type=int, default=25088)
    parser.add_argument("--chunk", type=int, default=64, help="rows per Zarr chunk")
    parser.add_argument("--zarr", type=Path, help="array to open, or to create if missing")
    parser.add_argument("--variance", type=float, default=0.8)
    parser.add_argument(
        "--methods", nargs="+", default=["gram", "randomized", "incremental"], help="PCA methods"
    )
    parser.add_argument(
        "--ways", nargs="+", choices=WAY_NAMES, default=WAY_NAMES, help="which ways, in order"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reduce-cluster-") as work:
        path = args.zarr or Path(work) / "features.zarr"
        if not path.exists():
            build(path, args.rows, args.cols, args.chunk)
        run(path, args.methods, args.variance, args.ways)


if __name__ == "__main__":
    main()
