"""Column statistics and min-max scaling of the raw rows (MinMaxScaler's semantics)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import delayed

from tasks.reduce._progress import advance
from tasks.reduce._stream import log_phase

_CONSTANT_RANGE = 10 * np.finfo(np.float32).eps  # sklearn's _handle_zeros_in_scale on float32


@dataclass(frozen=True)
class ColumnStats:
    """Per-column moments of the raw rows: merged exactly across `partial_fit` calls."""

    n: int
    data_min: np.ndarray
    data_max: np.ndarray
    mean: np.ndarray  # float64, raw units
    m2: np.ndarray | None  # float64 sum of squared deviations, raw units (incremental only)

    def merge(self, other: ColumnStats) -> ColumnStats:
        """Chan et al.'s pairwise update: exact, no catastrophic cancellation."""
        n = self.n + other.n
        delta = other.mean - self.mean
        return ColumnStats(
            n,
            np.minimum(self.data_min, other.data_min),
            np.maximum(self.data_max, other.data_max),
            self.mean + delta * (other.n / n),
            self.m2 + other.m2 + delta**2 * (self.n * other.n / n),
        )


class RunningStats:
    """min, max and mean of every column, accumulated block by block in this process: for a
    pass that reads the rows anyway (the Gram fit's first panel), instead of a pass of its own."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.data_min = np.full(d, np.inf)
        self.data_max = np.full(d, -np.inf)
        self.total = np.zeros(d)

    def add(self, block: np.ndarray) -> None:
        np.minimum(self.data_min, block.min(axis=0), out=self.data_min)
        np.maximum(self.data_max, block.max(axis=0), out=self.data_max)
        self.total += block.sum(axis=0, dtype=np.float64)
        self.n += len(block)

    def result(self) -> ColumnStats:
        return ColumnStats(self.n, self.data_min, self.data_max, self.total / self.n, None)


def inverse_range(data_min: np.ndarray, data_max: np.ndarray) -> np.ndarray:
    """1 / range per column, 1 for (near) constant columns, as MinMaxScaler does."""
    data_range = np.asarray(data_max, np.float64) - np.asarray(data_min, np.float64)
    data_range[data_range < _CONSTANT_RANGE] = 1.0
    return 1.0 / data_range


def column_stats(X: da.Array, with_m2: bool) -> ColumnStats:
    """One pass over X for min, max, mean (and, costing more, the variance) of every column.

    Only the incremental method needs the variance (to merge totals across calls); the others
    get the total variance exactly from their own passes (Gram trace, sum of squares).
    """
    parts = [X.min(axis=0), X.max(axis=0), X.mean(axis=0, dtype=np.float64)]
    if with_m2:
        parts.append(X.var(axis=0, dtype=np.float64))
    began, cpu = time.perf_counter(), time.process_time()
    results = dask.compute(*parts)  # tree reductions: only (d,) vectors reach this process
    data_min, data_max, mean, *var = results
    rows, d = X.shape
    log_phase(
        "column statistics",
        time.perf_counter() - began,
        time.process_time() - cpu,
        rows=rows,
        client_bytes=sum(r.nbytes for r in results),
        data_bytes=rows * d * 4,
    )
    advance(rows, "column statistics")
    m2 = var[0] * X.shape[0] if with_m2 else None
    return ColumnStats(
        X.shape[0], data_min.astype(np.float64), data_max.astype(np.float64), mean, m2
    )


def centre(block: np.ndarray, affine: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Scale a raw block and subtract the scaled mean, in float32 (affine = min, scale, mean);
    `out=block` does it in place."""
    out = np.subtract(block, affine[0], out=out, dtype=np.float32)
    out *= affine[1]
    out -= affine[2]
    return out


def project(block: np.ndarray, affine: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Transform one row block: centre, then project on the components."""
    return centre(block, affine) @ components.T


def lazy_rows(X: da.Array, affine: np.ndarray) -> da.Array:
    """The scaled (and centred) rows, lazily; the parameters are one shared graph key."""
    return X.map_blocks(centre, affine=delayed(affine, pure=True), dtype=np.float32)
