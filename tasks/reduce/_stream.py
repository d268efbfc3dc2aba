"""Streaming passes over row-chunked Dask arrays: the backend of PCA passes without a
distributed client (`_passes.Here`), and the timing lines every pass logs.

A pass pulls row blocks with ``.compute()``, so Dask's threads read, decompress and scale
the chunks, while this process multiplies them: the memory of the products is bounded and
predictable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import dask.array as da
import numpy as np
from threadpoolctl import threadpool_limits

from tasks.reduce._progress import advance

STEP_BYTES = 32 * 2**20  # rows pulled per streaming step (input chunks are grouped up to this)
logger = logging.getLogger("featurepipe.reduce")


def group(bounds: list[int], max_rows: int) -> list[int]:
    """Merge consecutive ranges given by `bounds` while they span at most max_rows rows."""
    out = [bounds[0]]
    for b in bounds[1:]:
        if len(out) > 1 and b - out[-2] <= max_rows:
            out[-1] = b
        else:
            out.append(b)
    return out


def pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def chunk_bounds(X: da.Array) -> list[int]:
    return [0, *np.cumsum(X.chunks[0]).tolist()]


def step_rows(d: int) -> int:
    """Rows of width d in one streaming step."""
    return max(1, STEP_BYTES // (4 * d))


def stream_steps(X: da.Array) -> list[tuple[int, int]]:
    """Row ranges of whole input chunks, about STEP_BYTES each: one streaming pass's reads."""
    return pairs(group(chunk_bounds(X), step_rows(X.shape[1])))


def _fetch(Xc: da.Array, a: int, b: int) -> np.ndarray:
    return np.asarray(Xc[a:b].compute(), dtype=np.float32)


def log_phase(
    phase: str,
    seconds: float,
    cpu: float,
    waited: float = 0.0,
    rows: int = 0,
    client_bytes: int = 0,
    data_bytes: int = 0,
) -> None:
    """One DEBUG line per pass or dense step, with the figures as record attributes
    (`pca_phase`, `pca_seconds`, `pca_cpu`: CPU seconds of the whole process, `pca_waited`,
    `pca_rows`, `pca_client_bytes`: bytes this process received, `pca_data_bytes`: bytes of
    the scaled rows the pass covered) for benchmarks/reduce_profile.py and reduce_cluster.py."""
    figures = {
        "pca_phase": phase,
        "pca_seconds": seconds,
        "pca_cpu": cpu,
        "pca_waited": waited,
        "pca_rows": rows,
        "pca_client_bytes": client_bytes,
        "pca_data_bytes": data_bytes,
    }
    logger.debug(
        "PCA %s: %.2f s (%.2f s on reads), %d rows, %.1f MiB received for %.1f MiB of rows",
        phase,
        seconds,
        waited,
        rows,
        client_bytes / 2**20,
        data_bytes / 2**20,
        extra=figures,
    )


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Time a step that is not a streaming pass (statistics, eigh, a product)."""
    began, cpu = time.perf_counter(), time.process_time()
    yield
    log_phase(phase, time.perf_counter() - began, time.process_time() - cpu)


def stream(
    Xc: da.Array, steps: list[tuple[int, int]], phase: str = "pass"
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, block) for each row range, computed by the active scheduler.

    The next block is read while the caller multiplies this one: I/O overlaps the products
    at the cost of one more block in memory. The time spent waiting for blocks (reading,
    decompressing and scaling not hidden behind the products) is logged with the pass.
    """
    if not steps:
        return
    began = time.monotonic()
    cpu, waited, received = time.process_time(), 0.0, 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_fetch, Xc, *steps[0])
        for i, (a, b) in enumerate(steps):
            wait_began = time.monotonic()
            block = pending.result()
            waited += time.monotonic() - wait_began
            received += block.nbytes
            if i + 1 < len(steps):
                pending = pool.submit(_fetch, Xc, *steps[i + 1])
            yield a, b, block
            advance(b - a, phase)
    rows = sum(b - a for a, b in steps)
    data = rows * Xc.shape[1] * 4  # as float32, like the blocks received
    log_phase(
        phase, time.monotonic() - began, time.process_time() - cpu, waited, rows, received, data
    )


class _SharedBlasLimit:
    """A BLAS thread cap held for a whole fit, shared by concurrent fits in one process.

    The fit's products run next to threads that read and decompress the next chunk, and
    OpenBLAS's spinning threads fight them (measured in benchmarks/README.md). threadpoolctl
    limits are process-wide, so the first user sets the cap and the last one restores the
    original limits. (Toggling the limit per Dask task instead was slower than no limit.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limits: threadpool_limits | None = None

    @contextmanager
    def __call__(self, threads: int) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._limits = threadpool_limits(threads, user_api="blas")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._limits.restore_original_limits()


_blas_limit = _SharedBlasLimit()


def client_blas_threads() -> int:
    """BLAS threads for products in this process: all cores but one left for reading."""
    return max(1, (os.cpu_count() or 2) - 1)


@contextmanager
def product_threads() -> Iterator[None]:
    """The BLAS cap for this process's products during a fit or projection."""
    with _blas_limit(client_blas_threads()):
        yield
