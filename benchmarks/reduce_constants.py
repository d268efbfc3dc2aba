"""Benchmark: the constants of the reduce stage's time model (tasks/reduce/plan.py), measured
on one thread, as one Dask worker started with `--nthreads 1` runs them.

* GFLOP/s of the fold products (a step block times a (w, d) basis, and the sum back);
* seconds per m^3 of `top_eigh` on an (m, m) float64 matrix (all eigenpairs);
* seconds per w^2 d of the (w, d) RQ that orthonormalises the randomized basis;
* GB/s of float32 rows read from a zstd Zarr store, decompressed and scaled.

    .venv/bin/python -m benchmarks.reduce_constants --cols 25088
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.reduce import build
from tasks.reduce._linalg import add_wt_x, top_eigh
from tasks.reduce._randomized import orthonormal_rows
from tasks.reduce._stats import centre
from tasks.reduce._stream import step_rows


def _best(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs (other work shares these cores)."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cols", type=int, default=25_088, help="features d")
    parser.add_argument("--width", type=int, default=256, help="basis rows w")
    parser.add_argument("--eigh", type=int, default=2_000, help="m of the eigh timed")
    args = parser.parse_args()
    d, w = args.cols, args.width
    rng = np.random.default_rng(0)
    block = rng.standard_normal((step_rows(d), d), dtype=np.float32)
    basis = rng.standard_normal((w, d), dtype=np.float32)
    acc = np.zeros((w, d), np.float32, order="F")
    with threadpool_limits(1):
        seconds = _best(lambda: add_wt_x(acc, block @ basis.T, block))
        print(f"fold product: {4 * len(block) * d * w / seconds / 1e9:.1f} GFLOP/s")
        m = args.eigh
        h = rng.standard_normal((m, m))
        h = h @ h.T
        seconds = _best(lambda: top_eigh(h.copy(), m), repeat=1)
        print(f"eigh: {seconds / m**3:.3e} s per m^3 ({seconds:.1f} s at m = {m})")
        seconds = _best(lambda: orthonormal_rows(basis.copy()), repeat=1)
        print(f"rq: {seconds / (w * w * d):.3e} s per w^2 d ({seconds:.2f} s)")
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
        import zarr

        path = Path(tmp) / "x.zarr"
        rows = 4 * step_rows(d)
        build(path, rows, d, chunk=64)
        array = zarr.open_array(str(path))
        affine = np.stack([np.zeros(d), np.ones(d), np.zeros(d)]).astype(np.float32)
        seconds = _best(lambda: centre(array[...], affine))
        print(f"read: {rows * d * 4 / seconds / 1e9:.2f} GB/s of float32 rows (zstd, chunk 64)")


if __name__ == "__main__":
    main()
