"""Benchmark: the reduce passes on 1 and 2 separate `dask worker` processes, measured.

Builds (or reuses) a synthetic float32 Zarr array (benchmarks/reduce.py's generator: low-rank
ReLU rows plus noise), starts `dask scheduler` and K `dask worker --nthreads 1 --no-nanny
--memory-limit M` processes, and fits + projects every row in a fresh client process. Prints
one JSON line per (method, K): wall seconds of the fit and of the projection, the client's
peak RSS (its VmHWM) and CPU seconds, each worker's peak RSS and CPU seconds (from /proc), the
bytes the client received (the passes' DEBUG records), components and explained variance, and
the plan's estimated time for the same shapes and workers.

    .venv/bin/python -m benchmarks.reduce_workers --rows 25000 --workers 1,2 \\
        --methods randomized,incremental --components 100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import run_child
from benchmarks.reduce import build

ROOT = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))

CLIENT = """
import json, logging, sys, time
from pathlib import Path
import dask.array as da
from distributed import Client
from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA

address, path, method, components = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
received = []

class Bytes(logging.Handler):
    def emit(self, record):
        if hasattr(record, "pca_client_bytes"):
            received.append((record.pca_phase, record.pca_client_bytes))

logger = logging.getLogger("featurepipe.reduce")
logger.setLevel(logging.DEBUG)
logger.addHandler(Bytes())
X = da.from_zarr(path)
with Client(address):
    began = time.perf_counter()
    if method == "incremental":
        est = ScaledIncrementalPCA(n_components=components)
    else:
        est = ScaledPCA(method=method, n_components=components)
    est.fit(X)
    fitted = time.perf_counter()
    est.project(X)
    done = time.perf_counter()
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
fit_bytes = sum(b for phase, b in received if phase != "projection")
print(json.dumps({
    "fit_s": fitted - began, "project_s": done - fitted,
    "client_peak_mib": int(hwm.split()[1]) / 1024, "client_cpu_s": time.process_time(),
    "client_fit_received_mib": fit_bytes / 2**20,
    "client_received_mib": sum(b for _, b in received) / 2**20,
    "k": int(est.n_components_), "explained": float(est.explained_variance_ratio_.sum()),
}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    hwm = int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm, cpu


def _wait_for(address: str, count: int) -> None:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(count, timeout=120)


def run(path: Path, method: str, workers: int, components: int, memory_limit: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    port = _port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": ROOT}
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
         ":0"], **quiet)  # fmt: skip
    started = []
    try:
        time.sleep(3)
        for _ in range(workers):
            started.append(
                subprocess.Popen(
                    [
                        DASK,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-nanny",
                        "--memory-limit",
                        memory_limit,
                    ],
                    **quiet,
                )  # fmt: skip
            )
        _wait_for(address, workers)
        before = [_proc(p.pid)[1] for p in started]
        result = run_child(CLIENT, address, str(path), method, str(components))
        after = [_proc(p.pid) for p in started]
        result["worker_peak_mib"] = [round(hwm) for hwm, _ in after]
        result["worker_cpu_s"] = [round(c - b, 1) for (_, c), b in zip(after, before, strict=True)]
        return result
    finally:
        for process in [*started, scheduler]:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25_000, help="rows of the synthetic array")
    parser.add_argument("--cols", type=int, default=25_088, help="features (block5_pool width)")
    parser.add_argument("--chunk", type=int, default=64, help="rows per Zarr chunk")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    parser.add_argument("--methods", default="randomized", help="PCA methods, comma-separated")
    parser.add_argument("--components", type=int, default=100, help="fixed component count")
    parser.add_argument("--memory-limit", default="4GiB", help="each worker's --memory-limit")
    parser.add_argument("--store", type=Path, default=None, help="Zarr path (kept; built once)")
    args = parser.parse_args()
    path = args.store or Path(f"/tmp/reduce-workers-{args.rows}x{args.cols}.zarr")
    if not path.exists():
        began = time.perf_counter()
        build(path, args.rows, args.cols, args.chunk)
        print(f"built {path} in {time.perf_counter() - began:.0f} s", flush=True)
    from tasks.reduce.plan import Lanes, Shape, Workers, estimated_seconds

    shape = Shape(args.rows, args.cols, args.rows)
    for method in args.methods.split(","):
        for count in (int(k) for k in args.workers.split(",")):
            lanes = Lanes.of(Workers(0, 1, count), os.cpu_count() or 1)
            result = run(path, method, count, args.components, args.memory_limit)
            result.update(
                method=method,
                workers=count,
                rows=args.rows,
                load=os.getloadavg()[0],
                estimate_s=estimated_seconds(method, shape, args.components, True, lanes),
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
