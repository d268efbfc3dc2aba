"""Benchmark: where an exact ("gram") PCA fit of wide rows spends its time, against the SGEMM
rate numpy reaches in the same process.

Builds (or opens) a synthetic block3_pool-wide float32 Zarr array (benchmarks/reduce.py's
generator: low rank + noise + ReLU zeros, zstd), then

* measures numpy's SGEMM rate on an (m, d) @ (d, m) product (m = min(rows, 512)) with the BLAS
  threads the fit uses,
* fits `ScaledPCA(method="gram")` and projects the rows, collecting the DEBUG timing lines of
  tasks/reduce (one per streaming pass or dense step: its seconds and the part of them spent
  waiting for blocks, i.e. reading, decompressing and scaling not hidden behind products),
* times bare passes over the same rows: file bytes only, read + decompress, read + decompress
  + scale,

and prints one table: phase, seconds, waits, multiply-adds and the fraction of the SGEMM rate
reached by the whole fit and by its products alone.

    .venv/bin/python -m benchmarks.reduce_profile --rows 1000 --cols 200704
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.reduce import _peak_rss_mb, build

# phases that multiply nothing
NOT_PRODUCTS = ("eigh", "column statistics", "panel read", "statistics + first panel read")


class _Phases(logging.Handler):
    """Collects tasks/reduce's timing records: phase -> [wall s, CPU s, waited s, count]."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.phases: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "pca_phase"):
            entry = self.phases[record.pca_phase]
            entry[0] += record.pca_seconds
            entry[1] += record.pca_cpu
            entry[2] += record.pca_waited
            entry[3] += 1


def sgemm_rate(d: int, m: int, threads: int) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of A @ A.T for a float32 (m, d) A, best of
    three, with `threads` BLAS threads. On a shared machine the CPU rate is the stable one."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((m, d), dtype=np.float32)
    wall = cpu = np.inf
    with threadpool_limits(threads, user_api="blas"):
        for _ in range(3):
            began, cpu0 = time.perf_counter(), time.process_time()
            a @ a.T
            wall = min(wall, time.perf_counter() - began)
            cpu = min(cpu, time.process_time() - cpu0)
    return 2 * m * m * d / wall, 2 * m * m * d / cpu


def bare_passes(path: Path, est) -> dict[str, float]:
    """CPU seconds of one pass over the rows: file bytes; + decompression; + scaling."""
    import dask.array as da

    from tasks.reduce._stats import lazy_rows
    from tasks.reduce._stream import stream, stream_steps

    began = time.process_time()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        file.read_bytes()
    out = {"file bytes (page cache)": time.process_time() - began}
    X = da.from_zarr(str(path))
    for name, rows in (
        ("read + decompress", X),
        ("read + decompress + scale", lazy_rows(X, est._affine())),
    ):
        began = time.process_time()
        for _ in stream(rows, stream_steps(rows)):
            pass
        out[name] = time.process_time() - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--cols", type=int, default=200704)
    parser.add_argument("--chunk", type=int, default=16, help="rows per Zarr chunk (as the store)")
    parser.add_argument("--zarr", type=Path, help="array to open, or to create if missing")
    parser.add_argument("--variance", type=float, default=0.8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reduce-profile-") as work:
        profile(args, args.zarr or Path(work) / "features.zarr")


def profile(args: argparse.Namespace, path: Path) -> None:
    import dask.array as da

    from tasks.reduce._gram import gram_plan
    from tasks.reduce._stream import chunk_bounds, client_blas_threads
    from tasks.reduce.pca import ScaledPCA

    if not path.exists():
        began = time.perf_counter()
        build(path, args.rows, args.cols, args.chunk)
        print(f"built {path} in {time.perf_counter() - began:.1f} s")
    X = da.from_zarr(str(path))
    n, d = X.shape
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"data: {X.shape} float32, chunks of {X.chunks[0][0]} rows, {X.nbytes / 2**20:.0f} MiB "
        f"in memory, {disk / 2**20:.0f} MiB on disk; {os.cpu_count()} cores, "
        f"{client_blas_threads()} BLAS thread(s) for products; load {os.getloadavg()}"
    )
    rate, cpu_rate = sgemm_rate(d, min(n, 512), client_blas_threads())
    all_cores = sgemm_rate(d, min(n, 512), os.cpu_count() or 1)[0]
    print(
        f"numpy SGEMM with the fit's {client_blas_threads()} BLAS thread(s): "
        f"{rate / 1e9:.1f} GFLOP per wall second, {cpu_rate / 1e9:.1f} per CPU second "
        f"(the references below); {all_cores / 1e9:.1f} per wall second with all cores"
    )

    handler = _Phases()
    logger = logging.getLogger("featurepipe.reduce")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    began, cpu0 = time.perf_counter(), time.process_time()
    est = ScaledPCA(variance=args.variance, method="gram").fit(X)
    fit_s, fit_cpu = time.perf_counter() - began, time.process_time() - cpu0
    fit_phases = dict(handler.phases)
    handler.phases.clear()
    began, cpu0 = time.perf_counter(), time.process_time()
    est.project(X)
    project_s, project_cpu = time.perf_counter() - began, time.process_time() - cpu0
    logger.removeHandler(handler)
    k = est.n_components_

    _, panels = gram_plan(chunk_bounds(X), d, None)
    # the multiply-adds a fit performs: each panel times itself (its Gram block, computed in
    # full) and every later row, then components = weights^T rows
    gram_macs = sum((b - a) * (n - a) * d for a, b in panels)
    fit_macs = gram_macs + k * n * d
    peak = _peak_rss_mb()
    print(
        f"\nfit: {fit_s:.1f} s wall, {fit_cpu:.1f} s CPU, k = {k}, {len(panels)} panel(s), "
        f"peak RSS {peak:.0f} MB"
    )
    print(f"{'phase':<34} {'count':>5} {'wall s':>7} {'CPU s':>7} {'on reads s':>10}")
    for phase, (seconds, cpu, waited, count) in fit_phases.items():
        print(f"{phase:<34} {count:>5} {seconds:>7.2f} {cpu:>7.2f} {waited:>10.2f}")
    flops = 2 * fit_macs
    products = [v for phase, v in fit_phases.items() if phase not in NOT_PRODUCTS]
    product_wall = sum(seconds - waited for seconds, _, waited, _ in products)
    product_cpu = sum(cpu for _, cpu, _, _ in products)
    print(
        f"fit: {fit_macs:.3g} multiply-adds; share of the SGEMM rate reached by the whole fit "
        f"{flops / fit_s / rate:.2f} (wall) / {flops / fit_cpu / cpu_rate:.2f} (CPU); by its "
        f"product phases alone {flops / product_wall / rate:.2f} / "
        f"{flops / product_cpu / cpu_rate:.2f}"
    )
    project_flops = 2 * n * k * d
    print(
        f"projection: {project_s:.1f} s wall, {project_cpu:.1f} s CPU for {n * k * d:.3g} "
        f"multiply-adds: {project_flops / project_s / rate:.2f} (wall) / "
        f"{project_flops / project_cpu / cpu_rate:.2f} (CPU) of SGEMM"
    )
    print("\none pass over the same rows, CPU seconds:")
    for name, seconds in bare_passes(path, est).items():
        print(f"  {name:<28} {seconds:>6.2f} s")


if __name__ == "__main__":
    main()
