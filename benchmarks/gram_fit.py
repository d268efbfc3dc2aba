"""Benchmark: the exact ("gram") PCA fit + projection under each scheduler and panel size.

* Scheduler: Dask's threads in this process, or a LocalCluster of one worker process, whose
  blocks must travel to this process (where the products run) over a socket.
* Panel size: the Gram matrix is built panel by panel, each panel held in memory while later
  rows stream past it, so the data is read about (panels + 1) / 2 times; bigger panels mean
  fewer passes for more memory.

Each combination runs in its own process (peak RSS is its own); the explained-variance ratios
must agree, the times and peaks differ.

    .venv/bin/python -m benchmarks.gram_fit --zarr STORE/features/KEY/x --rows 1000 \\
        --schedulers threads,cluster --panel-mb 256
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reduce import _peak_rss_mb


def child(zarr_path: str, rows: int, scheduler: str, panel_mb: int, out: str) -> None:
    """Fit + project the first `rows` rows; print one JSON line of figures."""
    import dask.array as da

    from tasks.cluster import dask_client
    from tasks.reduce.pca import ScaledPCA

    X = da.from_zarr(zarr_path)[:rows]
    panel_rows = max(1, (panel_mb << 20) // (4 * X.shape[1]))
    with dask_client(workers=1) if scheduler == "cluster" else contextlib.nullcontext():
        began = time.perf_counter()
        est = ScaledPCA(method="gram", batch_size=panel_rows).fit(X)
        fitted = time.perf_counter()
        est.project(X)
        projected = time.perf_counter()
    np.save(out, est.explained_variance_ratio_)
    print(
        json.dumps(
            {
                "scheduler": scheduler,
                "panel_mb": panel_mb,
                "panel_rows": panel_rows,
                "fit_s": round(fitted - began, 1),
                "project_s": round(projected - fitted, 1),
                "peak_mb": round(_peak_rss_mb()),
                "k": int(est.n_components_),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zarr", required=True, help="a (n, d) float Zarr array, e.g. stored block3_pool features"
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--schedulers", default="threads,cluster")
    parser.add_argument("--panel-mb", default="256")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scheduler, panel_mb = args.child.split(":")
        child(args.zarr, args.rows, scheduler, int(panel_mb), args.out)
        return
    ratios = {}
    combinations = itertools.product(args.schedulers.split(","), args.panel_mb.split(","))
    with tempfile.TemporaryDirectory(prefix="gram-fit-") as work:
        for scheduler, panel_mb in combinations:
            name, out = f"{scheduler}:{panel_mb}", Path(work) / f"{scheduler}-{panel_mb}.npy"
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.gram_fit",
                    "--zarr",
                    args.zarr,
                    "--rows",
                    str(args.rows),
                    "--child",
                    name,
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            print(done.stdout.strip().splitlines()[-1], flush=True)
            ratios[name] = np.load(out)
    first = next(iter(ratios.values()))
    for name, ratio in ratios.items():
        k = min(len(first), len(ratio))
        difference = np.abs(ratio[:k] - first[:k]).max()
        print(f"{name}: max |EVR difference| vs the first {difference:.1e}")


if __name__ == "__main__":
    main()
