"""Benchmark: out-of-core ScaledPCA (each method) vs in-memory MinMaxScaler + PCA(0.8).

Builds (or opens) a block3_pool-sized float32 Zarr array on disk, then runs every path in its
own subprocess so each one's peak RSS is its own (VmHWM of the child: ru_maxrss would include
the parent's RSS inherited across fork/exec), and prints wall and CPU time, peak RSS and
agreement with the in-memory sklearn result. No asserts: the figures choose ScaledPCA's
default method.

sklearn runs twice: with the default BLAS threads and with one. On 2 shared cores OpenBLAS's
threads spin against each other and the in-memory SVD was several times slower with 2 than
with 1; ScaledPCA caps its own BLAS threads (see tasks/reduce/pca.py), so the 1-thread row is
the fair baseline there.

    .venv/bin/python benchmarks/reduce.py --rows 800 --cols 200704
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SKLEARN = "sklearn-in-memory"
SKLEARN_1 = "sklearn-1-blas-thread"
METHODS = ("gram", "randomized", "incremental")


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM is reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def build(path: Path, rows: int, cols: int, chunk: int, seed: int = 0) -> None:
    """Synthetic ReLU features chunk by chunk: low-rank signal + noise, about half zeros.

    Only the (rank, cols) loadings and one chunk are in memory, so generation is bounded too.
    """
    import zarr

    rank = 96
    rng = np.random.default_rng(seed)
    loadings = rng.standard_normal((rank, cols), dtype=np.float32)
    spectrum = (np.arange(1, rank + 1, dtype=np.float32) ** -0.6) * 1.5
    bias = rng.normal(-0.6, 0.4, cols).astype(np.float32)
    column_gain = rng.gamma(2.0, 1.0, cols).astype(np.float32)  # columns of different ranges
    array = zarr.create_array(
        str(path), shape=(rows, cols), chunks=(chunk, cols), dtype="float32", overwrite=True
    )
    for start in range(0, rows, chunk):
        r = min(chunk, rows - start)
        crng = np.random.default_rng([seed, start])
        block = (crng.standard_normal((r, rank), dtype=np.float32) * spectrum) @ loadings
        block += 0.7 * crng.standard_normal((r, cols), dtype=np.float32)
        block += bias
        np.maximum(block, 0, out=block)
        block *= column_gain
        array[start : start + r] = block


def child(name: str, zarr_path: str, out: str, variance: float) -> None:
    """Run one path, save its results to `out` (.npz) and print one JSON line of figures."""
    import dask.array as da
    import zarr
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import MinMaxScaler
    from threadpoolctl import threadpool_limits

    from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA

    base_mb = _peak_rss_mb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if name in (SKLEARN, SKLEARN_1):
        with threadpool_limits(1 if name == SKLEARN_1 else None, user_api="blas"):
            X = zarr.open_array(zarr_path)[...]
            Xs = MinMaxScaler().fit_transform(X)
            del X
            pca = PCA(n_components=variance, svd_solver="full").fit(Xs)
            fit_s = time.perf_counter() - t0
            projected = pca.transform(Xs)
        components, ratio, k = pca.components_, pca.explained_variance_ratio_, pca.n_components_
    else:
        X = da.from_zarr(zarr_path)
        est = (
            ScaledIncrementalPCA(variance=variance)
            if name == "incremental"
            else ScaledPCA(variance=variance, method=name)
        ).fit(X)
        fit_s = time.perf_counter() - t0
        with threadpool_limits(1, user_api="blas"):  # as ScaledPCA.transform advises
            projected = est.transform(X).compute()
        components, ratio, k = est.components_, est.explained_variance_ratio_, est.n_components_
    total_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    peak_mb = _peak_rss_mb()
    np.savez(out, components=components, ratio=ratio, projected=projected)
    figures = {"fit_s": fit_s, "total_s": total_s, "cpu_s": cpu_s, "peak_mb": peak_mb}
    figures |= {"import_mb": base_mb, "k": int(k), "evr_sum": float(np.sum(ratio))}
    print(json.dumps(figures))


def agreement(ref: dict, res: dict) -> dict:
    """EVR, subspace and transform agreement over the components both kept.

    Near the cut the spectrum is a flat noise tail: those directions are barely defined, so
    the angle over all k is large even for tiny errors; the top-10 angle is the sharp one.
    """
    from scipy.linalg import subspace_angles

    k = min(len(ref["ratio"]), len(res["ratio"]))

    def angle(m: int) -> float:
        a, b = (x["components"][:m].T.astype(np.float64) for x in (ref, res))
        return float(subspace_angles(a, b).max())

    scale = np.abs(ref["projected"][:, :k]).max()
    return {
        "evr_diff": float(np.abs(ref["ratio"][:k] - res["ratio"][:k]).max()),
        "angle_top10": angle(min(k, 10)),
        "angle": angle(k),
        "transform_rel": float(np.abs(ref["projected"][:, :k] - res["projected"][:, :k]).max())
        / scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--cols", type=int, default=200704)
    parser.add_argument("--chunk", type=int, default=32, help="rows per Zarr chunk")
    parser.add_argument("--zarr", type=Path, help="array to open, or to create if missing")
    parser.add_argument("--variance", type=float, default=0.8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, str(args.zarr), args.out, args.variance)
        return

    with tempfile.TemporaryDirectory(prefix="reduce-bench-") as work:
        compare(args, Path(work))


def compare(args: argparse.Namespace, work: Path) -> None:
    """Build or open the array, run every path in a child process, print the table.

    `work` (removed afterwards) holds the children's results, and the array unless --zarr.
    """
    path = args.zarr or work / "features.zarr"
    if not path.exists():
        t = time.perf_counter()
        build(path, args.rows, args.cols, args.chunk)
        print(f"built {path} in {time.perf_counter() - t:.1f} s")
    import zarr

    array = zarr.open_array(str(path))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"data: {array.shape} {array.dtype}, chunks {array.chunks}, "
        f"{array.nbytes / 2**20:.0f} MiB in memory, {size / 2**20:.0f} MiB on disk"
    )
    print(f"load average before: {os.getloadavg()}")
    figures = {}
    for name in [SKLEARN, SKLEARN_1, *args.methods.split(",")]:
        cmd = [sys.executable, __file__, "--child", name, "--zarr", str(path)]
        cmd += ["--out", str(work / f"{name}.npz"), "--variance", str(args.variance)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"{name} failed:\n{proc.stderr[-3000:]}")
            continue
        figures[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {figures[name]}", flush=True)
    print(f"load average after: {os.getloadavg()}")

    print(f"\nvariance target {args.variance}; agreement vs {SKLEARN}; times include all I/O")
    header = (
        f"{'path':<22} {'fit s':>6} {'fit+transform s':>15} {'CPU s':>6} {'peak RSS MB':>11} "
        f"{'k':>4} {'max|dEVR|':>9} {'angle top10':>11} {'angle all k':>11} {'transform':>9}"
    )
    print(header)
    print("-" * len(header))
    ref = dict(np.load(work / f"{SKLEARN}.npz")) if SKLEARN in figures else None
    for name, f in figures.items():
        a = agreement(ref, dict(np.load(work / f"{name}.npz"))) if ref else {}
        print(
            f"{name:<22} {f['fit_s']:>6.1f} {f['total_s']:>15.1f} {f['cpu_s']:>6.1f} "
            f"{f['peak_mb']:>11.0f} {f['k']:>4} {a.get('evr_diff', np.nan):>9.1e} "
            f"{a.get('angle_top10', np.nan):>11.1e} {a.get('angle', np.nan):>11.1e} "
            f"{a.get('transform_rel', np.nan):>9.1e}"
        )
    print("(transform: max |difference| over the shared components / max |reference value|)")
    for base in (SKLEARN, SKLEARN_1):
        for name in [m for m in METHODS if m in figures and base in figures]:
            f, b = figures[name], figures[base]
            print(
                f"{name} vs {base}: peak RSS {f['peak_mb'] / b['peak_mb']:.2f}x, "
                f"fit+transform time {f['total_s'] / b['total_s']:.2f}x"
            )


if __name__ == "__main__":
    main()
