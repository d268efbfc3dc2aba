"""Benchmark: how the reduce stage scales with the rows. Synthetic block4_pool-wide rows are
written into a real feature store, then the real reduce stage (`reduce_cached`, the method
`auto` picks or one named) runs on them in a fresh process; one table row per size and
method: wall and CPU time, peak RSS of every process, components, explained variance and the
passes over the data the stage made (rows read / rows).

The rows are a low-rank signal (RANK directions with a 1/sqrt(i) spectrum) plus isotropic
noise, each column then given its own gain and offset (so min-max scaling matters). The noise
is about 12 % of the variance, so the 0.8 target falls inside the signal and the same k is
right at every n: time should then grow with n, and a bounded method's memory should not.
Rows are generated chunk by chunk from a seed (memory: the loadings and one chunk). Each store
is deleted after its size is measured (40,000 x 100,352 float32 is 16 GB). Wall time is the
stage's, starting the LocalCluster included when --workers is given; CPU s is the client's.

    .venv/bin/python -m benchmarks.scale_reduce --rows 10000,20000,40000 --methods incremental
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import run_child

BLOCK4 = 100_352  # VGG16 block4_pool at 224 px: 14 x 14 x 512
RANK = 256
NOISE = 0.9  # per-entry noise; the signal's per-column variance is sum(1 / i) over RANK, ~6.1
CLASSES = 4
KEY = "synthetic"
READ_PHASES = ("column statistics",)  # timed as one step, not streamed, but reads every row


def build_store(location: str, rows: int, cols: int, seed: int = 0) -> None:
    """A feature store holding `rows` synthetic rows (all done) under KEY, with a manifest
    (the stage's incremental path looks for earlier fits of the same images)."""
    from tasks.data.scan import ImageRecord, Manifest
    from tasks.features.store import FeatureStore

    records = [
        ImageRecord(
            f"class{i % CLASSES}/{i}.png",
            f"class{i % CLASSES}",
            "train",
            0,
            hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
        )
        for i in range(rows)
    ]
    store = FeatureStore(location)
    manifest = Manifest("synthetic", records, [f"class{c}" for c in range(CLASSES)])
    manifest_key = store.save_manifest(manifest)
    array = store.create_feature_array(
        KEY, rows, cols, "float32", {"manifest_key": manifest_key, "layer": "synthetic"}
    )
    rng = np.random.default_rng(seed)
    loadings = rng.standard_normal((RANK, cols), dtype=np.float32)
    spectrum = np.arange(1, RANK + 1, dtype=np.float32) ** -0.5
    gain = rng.gamma(2.0, 1.0, cols).astype(np.float32)
    offset = rng.normal(0.0, 2.0, cols).astype(np.float32)
    for index in range(array.n_chunks):
        rows_here = array.chunk_slice(index)
        r = rows_here.stop - rows_here.start
        crng = np.random.default_rng([seed, index])
        block = (crng.standard_normal((r, RANK), dtype=np.float32) * spectrum) @ loadings
        block += NOISE * crng.standard_normal((r, cols), dtype=np.float32)
        block *= gain
        block += offset
        array.write_chunk(index, block)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _process_figures() -> tuple[float, float]:
    """Peak RSS MB and CPU seconds of the process this runs in (sent to Dask workers too)."""
    return peak_rss_mb(), time.process_time()


class _Phases(logging.Handler):
    """Collects the fit's per-pass DEBUG records (tasks/reduce/_stream.py's `pca_*` extras)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.phases: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "pca_phase"):
            self.phases.append(
                {
                    "phase": record.pca_phase,
                    "s": round(record.pca_seconds, 2),
                    "rows": record.pca_rows,
                }
            )


def child(location: str, method: str, workers: int, memory_limit: float | None) -> None:
    """Run the reduce stage on the store's rows (all of them training rows), from scratch;
    print one JSON line.

    workers = 0: Dask's threads in this process (the stage's default); else a LocalCluster of
    that many worker processes, as `--workers N` gives."""
    import contextlib

    from tasks.cluster import dask_client
    from tasks.features.store import FeatureStore
    from tasks.reduce.stage import PcaSettings, reduce_cached

    phases = _Phases()
    logger = logging.getLogger("featurepipe.reduce")
    logger.addHandler(phases)
    logger.setLevel(logging.DEBUG)
    store = FeatureStore(location, "r+")
    for key, _ in list(store.reductions()):  # an earlier run's result would be a cache hit
        store.remove(key)
    rows = store.feature_array(KEY).data.shape[0]
    settings = PcaSettings(method=method, memory_limit=memory_limit)
    load = [os.getloadavg()[0]]
    began, cpu = time.perf_counter(), time.process_time()
    with dask_client(workers=workers) if workers else contextlib.nullcontext() as client:
        outcome = reduce_cached(store, KEY, np.arange(rows), settings)
        wall = time.perf_counter() - began
        remote = client.run(_process_figures) if client is not None else {}
    load.append(os.getloadavg()[0])
    plan = store.reduction_attrs(outcome.key)["memory_plan"]
    figures = {
        "method": outcome.method,
        "k": outcome.n_components,
        "explained": outcome.explained_variance,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu,
        "client_mb": peak_rss_mb(),
        "workers_mb": [mb for mb, _ in remote.values()],
        "workers_cpu_s": [s for _, s in remote.values()],
        "planned_gib": plan["estimated_peak_bytes"] / 2**30,
        "load": load,
        "phases": phases.phases,
    }
    print(json.dumps(figures))


def _auto_choice(location: str, memory_limit: float | None) -> str:
    """What `auto` resolves to for these rows (the plan only: nothing is read)."""
    from tasks.features.store import FeatureStore
    from tasks.reduce.stage import PcaSettings, planned

    store = FeatureStore(location, "r")
    rows = store.feature_array(KEY).data.shape[0]
    _, chosen, shape = planned(store, KEY, np.arange(rows), PcaSettings(memory_limit=memory_limit))
    return chosen.describe(shape)


def _passes(phases: list[dict], rows: int) -> float:
    """Passes over the data: rows read by the streamed phases (and the statistics) / rows."""
    return sum(rows if p["phase"] in READ_PHASES else p["rows"] for p in phases) / rows


def measure(args: argparse.Namespace, work: Path) -> None:
    header = (
        f"{'rows':>7} {'method':<18} {'wall s':>7} {'CPU s':>7} {'client MB':>9} "
        f"{'workers MB':>13} {'plan GiB':>8} {'k':>4} {'explained':>9} {'load':>9} "
        f"{'build s':>7} {'stored GB':>9} {'passes':>6}"
    )
    print(header, flush=True)
    for rows in args.rows:
        location = str(work / f"store-{rows}")
        began = time.perf_counter()
        build_store(location, rows, args.cols)
        built = time.perf_counter() - began
        stored = sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file()) / 1e9
        print(f"# {rows:,} rows: {_auto_choice(location, args.memory_limit)}", flush=True)
        for method in args.methods:
            code = "import sys; from benchmarks.scale_reduce import child; child(*sys.argv[1:3], "
            code += "int(sys.argv[3]), None if sys.argv[4] == 'none' else float(sys.argv[4]))"
            limit = str(args.memory_limit or "none")
            f = run_child(code, location, method, str(args.workers), limit)
            name = f["method"] if method == f["method"] else f"{method}->{f['method']}"
            workers = "/".join(f"{mb:.0f}" for mb in f["workers_mb"]) or "-"
            load = "/".join(f"{x:.1f}" for x in f["load"])
            print(
                f"{rows:>7} {name:<18} {f['wall_s']:>7.1f} {f['cpu_s']:>7.1f} "
                f"{f['client_mb']:>9.0f} {workers:>13} {f['planned_gib']:>8.1f} {f['k']:>4} "
                f"{f['explained']:>9.4f} {load:>9} {built:>7.0f} {stored:>9.2f} "
                f"{_passes(f['phases'], rows):>6.2f}",
                flush=True,
            )
            if args.verbose:
                print(f"#   phases: {json.dumps(f['phases'])}", flush=True)
        shutil.rmtree(location)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,20000,40000", help="sizes, comma-separated")
    parser.add_argument("--cols", type=int, default=BLOCK4)
    parser.add_argument("--methods", default="auto", help="auto, gram, incremental, randomized")
    parser.add_argument("--workers", type=int, default=0, help="0: Dask threads (the default)")
    parser.add_argument("--memory-limit", type=float, help="GiB, as the stage's --memory-limit")
    parser.add_argument("--work", type=Path, help="folder for the stores (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="print every pass's seconds")
    args = parser.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    args.methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="scale-reduce-", dir=args.work) as work:
        measure(args, Path(work))


if __name__ == "__main__":
    main()
