"""Benchmark: does incremental PCA meet its variance target? Exact (gram) vs incremental on the
same synthetic rows (benchmarks/reduce.py's generator), with the refit log lines shown.

    .venv/bin/python -m benchmarks.incremental_target --rows 6000 --cols 25088
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.reduce import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--cols", type=int, default=25088)
    parser.add_argument("--variance", type=float, default=0.8)
    parser.add_argument("--zarr", type=Path, help="array to open, or to create if missing")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, format="  log: %(message)s")
    logging.getLogger("featurepipe.reduce").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="incremental-target-") as work:
        compare(args, args.zarr or Path(work) / "features.zarr")


def compare(args: argparse.Namespace, path: Path) -> None:
    import dask.array as da

    from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA

    if not path.exists():
        build(path, args.rows, args.cols, 64)
    X = da.from_zarr(str(path))
    for name, est in (
        ("gram", ScaledPCA(variance=args.variance)),
        ("incremental", ScaledIncrementalPCA(variance=args.variance)),
    ):
        began, cpu = time.perf_counter(), time.process_time()
        est.fit(X)
        print(
            f"{name}: k = {est.n_components_}, explained {est.explained_variance_ratio_.sum():.4f}"
            f" (target {args.variance}), {time.perf_counter() - began:.1f} s wall, "
            f"{time.process_time() - cpu:.1f} s CPU",
            flush=True,
        )


if __name__ == "__main__":
    main()
