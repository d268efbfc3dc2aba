"""Out-of-core min-max scaling + PCA to a variance target over row-chunked Dask arrays.

The in-memory notebook path (MinMaxScaler + PCA(0.8) on block3_pool features, 200,704 floats
per image) holds several copies of the (n, d) matrix and ran out of RAM. `ScaledPCA` instead
streams the rows of a Dask array (usually `dask.array.from_zarr` on the feature store, train rows
only) a few times and keeps only small or (k, d)-sized state, never the (n, d) matrix.

Three methods, all with scikit-learn's semantics (MinMaxScaler, then PCA with
``svd_solver="full"``; constant columns get range 1; the variance cut is
``searchsorted(cumsum(ratio), target, side="right") + 1``; components' signs are fixed like
``svd_flip(u_based_decision=False)``):

* ``"gram"`` (default, exact): the n x n Gram matrix of the centred, scaled rows, then ``eigh``.
  It gives the whole spectrum, so the variance cut is exact. Chosen by ``benchmarks/reduce.py``.
* ``"randomized"``: subspace iteration on the (d, d) covariance, streaming one pass per power
  iteration; the sketch grows until the cut is reached with room to spare.
* ``"incremental"``: an incremental SVD over batches of rows (two passes in all, memory
  independent of n); also the only method with `partial_fit`.

Every pass pulls row blocks with ``.compute()``, so the active scheduler (a distributed client
or Dask's default threads) reads, decompresses and scales the chunks; the products with those
blocks are accumulated in this process, where their memory is bounded and predictable.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import delayed
from scipy import linalg
from scipy.linalg import blas
from sklearn.base import BaseEstimator
from threadpoolctl import threadpool_limits

METHODS = ("gram", "randomized", "incremental")
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds of streaming
logger = logging.getLogger("featurepipe.reduce")
# "gram" default: rows held per panel (about 1,337 block3_pool rows). Fewer panels mean fewer
# passes over the data: 1 GiB panels fitted 1,000 block3_pool rows in 11.2 s vs 17.0 s with
# 256 MiB ones, at no higher peak RSS (benchmarks/gram_fit.py).
PANEL_BYTES = 1 << 30
STEP_BYTES = 32 * 2**20  # rows pulled per streaming step (input chunks are grouped up to this)
INCREMENTAL_BATCH = 256  # "incremental" default rows per update (and components kept)
RANDOMIZED_START = 128  # "randomized" first sketch width when only a variance target is known
OVERSAMPLE = 0.5  # randomized: sketch >= (1 + this) x the components its cut needs (+10)
POWER_ITERATIONS = 4  # passes of (Xc^T Xc) per randomized sketch (sklearn uses 4-7)
_CONSTANT_RANGE = 10 * np.finfo(np.float32).eps  # sklearn's _handle_zeros_in_scale on float32
_STATE_VERSION = 1


@dataclass(frozen=True)
class _Stats:
    """Per-column moments of the raw rows: merged exactly across `partial_fit` calls."""

    n: int
    data_min: np.ndarray
    data_max: np.ndarray
    mean: np.ndarray  # float64, raw units
    m2: np.ndarray | None  # float64 sum of squared deviations, raw units (incremental only)

    def merge(self, other: _Stats) -> _Stats:
        """Chan et al.'s pairwise update: exact, no catastrophic cancellation."""
        n = self.n + other.n
        delta = other.mean - self.mean
        return _Stats(
            n,
            np.minimum(self.data_min, other.data_min),
            np.maximum(self.data_max, other.data_max),
            self.mean + delta * (other.n / n),
            self.m2 + other.m2 + delta**2 * (self.n * other.n / n),
        )


def _inverse_range(data_min: np.ndarray, data_max: np.ndarray) -> np.ndarray:
    """1 / range per column, 1 for (near) constant columns, as MinMaxScaler does."""
    data_range = np.asarray(data_max, np.float64) - np.asarray(data_min, np.float64)
    data_range[data_range < _CONSTANT_RANGE] = 1.0
    return 1.0 / data_range


def _column_stats(X: da.Array, with_m2: bool) -> _Stats:
    """One pass over X for min, max, mean (and, costing ~2x, the variance) of every column.

    Only the incremental method needs the variance (to merge totals across calls); the others
    get the total variance exactly from their own passes (Gram trace, sum of squares).
    """
    parts = [X.min(axis=0), X.max(axis=0), X.mean(axis=0, dtype=np.float64)]
    if with_m2:
        parts.append(X.var(axis=0, dtype=np.float64))
    data_min, data_max, mean, *var = dask.compute(*parts)
    m2 = var[0] * X.shape[0] if with_m2 else None
    return _Stats(X.shape[0], data_min.astype(np.float64), data_max.astype(np.float64), mean, m2)


def _centre(block: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Scale a raw block and subtract the scaled mean, in float32 (affine = min, scale, mean)."""
    out = np.subtract(block, affine[0], dtype=np.float32)
    out *= affine[1]
    out -= affine[2]
    return out


def _project(block: np.ndarray, affine: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Transform one row block: centre, then project on the components."""
    return _centre(block, affine) @ components.T


def _lazy_rows(X: da.Array, affine: np.ndarray) -> da.Array:
    """The scaled (and centred) rows, lazily; the parameters are one shared graph key."""
    return X.map_blocks(_centre, affine=delayed(affine, pure=True), dtype=np.float32)


def _group(bounds: list[int], max_rows: int) -> list[int]:
    """Merge consecutive ranges given by `bounds` while they span at most max_rows rows."""
    out = [bounds[0]]
    for b in bounds[1:]:
        if len(out) > 1 and b - out[-2] <= max_rows:
            out[-1] = b
        else:
            out.append(b)
    return out


def _gram_plan(
    bounds: list[int], d: int, batch_size: int | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row steps (input chunks grouped up to STEP_BYTES, never more than a panel) and panels
    (groups of steps of at most `batch_size` rows, default PANEL_BYTES worth)."""
    panel_rows = batch_size or max(1, PANEL_BYTES // (4 * d))
    steps = _group(bounds, min(max(1, STEP_BYTES // (4 * d)), panel_rows))
    return _pairs(steps), _pairs(_group(steps, panel_rows))


def _stream_steps(X: da.Array) -> list[tuple[int, int]]:
    """Row ranges of whole input chunks, about STEP_BYTES each: one streaming pass's reads."""
    return _pairs(_group(_chunk_bounds(X), max(1, STEP_BYTES // (4 * X.shape[1]))))


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _chunk_bounds(X: da.Array) -> list[int]:
    return [0, *np.cumsum(X.chunks[0]).tolist()]


def _fetch(Xc: da.Array, a: int, b: int) -> np.ndarray:
    return np.asarray(Xc[a:b].compute(), dtype=np.float32)


def _stream(Xc: da.Array, steps: list[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, block) for each row range, computed by the active scheduler.

    The next block is read while the caller multiplies this one: I/O overlaps the products
    at the cost of one more block in memory.
    """
    if not steps:
        return
    last_report = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_fetch, Xc, *steps[0])
        for i, (a, b) in enumerate(steps):
            block = pending.result()
            if i + 1 < len(steps):
                pending = pool.submit(_fetch, Xc, *steps[i + 1])
            if time.monotonic() - last_report > PROGRESS_SECONDS:  # long passes show progress
                last_report = time.monotonic()
                logger.info("PCA pass: rows %d-%d of %d-%d read", a, b, steps[0][0], steps[-1][1])
            yield a, b, block


def _add_wt_x(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out += w.T @ x in place (out: Fortran-ordered float32), via BLAS's beta=1.

    Accumulating (k, d) results this way makes no (k, d) temporary and no extra pass over out
    (numpy's `out += w.T @ x` does both; by column slabs it was 2.7x slower).
    """
    result = blas.sgemm(1.0, w.T, x.T, beta=1.0, c=out, trans_b=1, overwrite_c=1)
    if result is not out:
        raise RuntimeError("accumulator must be a Fortran-ordered float32 array")


class _SharedBlasLimit:
    """A BLAS thread cap held for a whole fit, shared by concurrent fits in one process.

    The fit's products run next to threads that read and decompress the next chunk, and
    OpenBLAS's spinning threads fight them: on 2 shared cores a panel Gram P @ P.T took 1.6 s
    with 2 BLAS threads and 0.39 s with 1. threadpoolctl limits are process-wide, so the first
    user sets the cap and the last one restores the original limits. (Toggling the limit per
    Dask task instead was slower than no limit at all: 41 s vs 22 s for one transform.)
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


_blas_threads = _SharedBlasLimit()


def _client_blas_threads() -> int:
    """BLAS threads for products in this process: all cores but one left for reading."""
    return max(1, (os.cpu_count() or 2) - 1)


def _flip_signs(components: np.ndarray) -> None:
    """In place: each row's largest-magnitude entry positive (sklearn's svd_flip on Vt)."""
    rows = np.arange(components.shape[0])
    signs = np.sign(components[rows, np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1
    components *= signs[:, None].astype(components.dtype)


def _cut(ratio: np.ndarray, target: float) -> int:
    """sklearn PCA's rule: smallest k with cumulative ratio >= target (len+1 if never)."""
    return int(np.searchsorted(np.cumsum(ratio), target, side="right")) + 1


def _sketch_width(components: int) -> int:
    return components + max(10, int(OVERSAMPLE * components))


def _top_eigh(h: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest `keep` eigenpairs of a symmetric PSD matrix, descending, eigenvalues >= 0."""
    m = h.shape[0]
    if keep == 0:
        return np.zeros(0), np.zeros((m, 0))
    w, v = linalg.eigh(h, subset_by_index=[m - keep, m - 1], overwrite_a=True)
    return np.clip(w[::-1], 0.0, None), v[:, ::-1]


class ScaledPCA(BaseEstimator):
    """MinMaxScaler + PCA to a variance target, fitted out of core on a row-chunked Dask array.

    Parameters
    ----------
    variance : float in (0, 1]
        Keep the fewest components whose explained variance ratio sums to at least this
        (sklearn's ``PCA(n_components=variance)``). Ignored when `n_components` is set.
    n_components : int, optional
        Keep exactly this many components instead (at most min(n - 1, d)).
    method : {"gram", "randomized", "incremental"}
        "gram" (exact, the default: fastest and smallest in `benchmarks/reduce.py`).
        Memory, n rows and d columns, float32 k x d components always included:
        * gram: n x n float64 Gram matrix (about 3x that during ``eigh``) + one panel of
          `batch_size` rows x d float32. The Gram needs every pair of rows, so with p panels it
          reads the data (p + 1) / 2 times, plus one stats pass and one components pass (the last
          panel is reused). Column slabs would read everything once per slab (chunks hold all
          columns), twice the I/O of panels for the same memory.
        * randomized: about 3 x sketch width x d float32 (sketch >= 1.5 x the components);
          POWER_ITERATIONS + 1 passes per sketch, repeated with a doubled sketch when the
          cut does not fit.
        * incremental: about (2 x kept + batch_size) x d float32, nothing that grows with n;
          2 passes per `fit`/`partial_fit` call, approximate (truncation at each batch).
    batch_size : int, optional
        gram: rows per panel (default: what fits in PANEL_BYTES, at least one input chunk).
        incremental: rows per update, also the number of components kept between updates
        (default INCREMENTAL_BATCH; must be >= n_components). Ignored by randomized.
    random_state : int
        Seed of the randomized sketch.

    Attributes (learned)
    --------------------
    data_min_, data_max_ : (d,) float32 -- min-max scaling, as MinMaxScaler.
    mean_ : (d,) float64 -- column means of the scaled training rows.
    components_ : (n_components_, d) float32 -- unit rows, sign fixed.
    explained_variance_, explained_variance_ratio_ : (n_components_,) float64.
    cumulative_variance_ratio_ : float64 -- over every component the method knows (gram: the
        whole spectrum), for the explained-variance plot.
    total_variance_ : float -- exact total variance of the scaled rows (ddof=1).
    n_components_, n_samples_seen_, method_.
    """

    def __init__(
        self,
        variance: float = 0.8,
        n_components: int | None = None,
        method: str = "gram",
        batch_size: int | None = None,
        random_state: int = 0,
    ) -> None:
        self.variance = variance
        self.n_components = n_components
        self.method = method
        self.batch_size = batch_size
        self.random_state = random_state

    # ------------------------------------------------------------------ public API
    def fit(self, X: da.Array) -> ScaledPCA:
        """Fit on the training rows X (float32/float16, chunked along rows)."""
        X = self._validate(X, fitting=True)
        if self.method == "incremental":
            self._stats = None
            return self.partial_fit(X)
        self._set_scaling(_column_stats(X, with_m2=False))
        Xc = _lazy_rows(X, self._affine())
        with _blas_threads(_client_blas_threads()):
            if self.method == "gram":
                self._fit_gram(Xc)
            else:
                self._fit_randomized(Xc)
        self.method_ = self.method
        return self

    def partial_fit(self, X: da.Array) -> ScaledPCA:
        """Update an incremental fit with new rows X (method="incremental" only).

        Min-max semantics: like MinMaxScaler.partial_fit, data_min_/data_max_ widen to cover all
        rows seen, and the PCA describes every row scaled with the final range. Rows seen
        earlier survive only as their retained directions; those are rescaled exactly to the
        new range (centring absorbs the shift of the minimum), the truncated remainder cannot
        be. mean_ and the total variance stay exact (merged raw moments). Each call costs a
        stats pass and one streaming pass; rows go in batches of `batch_size` (>= n_components).

        Tolerance: with batch_size >= all rows nothing is truncated and two calls equal sklearn
        on the concatenation; in tests/tasks/reduce/test_pca.py (keeping 128 of 599 directions)
        two calls
        vs one fit differ by < 1e-4 in explained variance ratio and < 0.01 rad on the top-10
        subspace (measured 3e-6 and 1.4e-3).
        """
        if self.method != "incremental":
            raise ValueError(f"partial_fit needs method='incremental', not {self.method!r}")
        X = self._validate(X, fitting=False)
        self._incremental_batch()  # check batch_size before reading anything
        previous: _Stats | None = getattr(self, "_stats", None)
        new = _column_stats(X, with_m2=True)
        if previous is None:
            self._basis = np.zeros((0, X.shape[1]), np.float32)
            self._singular = np.zeros(0)
            self._set_scaling(new)
            ratio, running = None, np.zeros(X.shape[1])
        else:
            old_scale = self._scale
            self._set_scaling(previous.merge(new))
            self.__dict__.pop("components_", None)  # a view that would pin the old basis
            ratio = self._scale / old_scale
            running = (previous.mean - self._stats.data_min) * self._scale
        with _blas_threads(_client_blas_threads()):
            self._fit_incremental(_lazy_rows(X, self._affine(centre=False)), ratio, running)
        ev = self._singular**2 / (self.n_samples_seen_ - 1)
        self._finish(ev, n_available=len(ev))
        _flip_signs(self._basis)
        self.components_ = self._basis[: self.n_components_]
        self.method_ = "incremental"
        return self

    def transform(self, X: da.Array) -> da.Array:
        """Lazy (n, n_components_) float32 projection, chunked like X's rows.

        Each block is one BLAS product. On Dask's threaded scheduler compute it under
        ``threadpoolctl.threadpool_limits(1)`` (Dask runs blocks in parallel already): 800
        block3_pool rows took 2.2 s that way and 22-90 s with OpenBLAS's default threads on
        2 shared cores. Distributed workers start with one BLAS thread already.
        """
        self._check_rows(X)
        return X.rechunk({1: -1}).map_blocks(
            _project,
            affine=delayed(self._affine(), pure=True),
            components=delayed(self.components_, pure=True),
            chunks=(X.chunks[0], (self.n_components_,)),
            dtype=np.float32,
        )

    def project(self, X: da.Array) -> np.ndarray:
        """Every row of X projected: one (n, n_components_) float32 array in this process.

        The active scheduler reads and scales the blocks and this process multiplies them, as
        in the fit's passes, so the (k, d) components never enter a task graph. `transform`
        puts them in one: 1.45 GiB for 1,932 block3_pool components, shipped to the scheduler
        and a worker ("Sending large graph") on the full blood-cell dataset.
        """
        self._check_rows(X)
        Xc = _lazy_rows(X.rechunk({1: -1}), self._affine())
        steps = _stream_steps(Xc)
        out = np.empty((X.shape[0], self.n_components_), np.float32)
        with _blas_threads(_client_blas_threads()):
            for a, b, block in _stream(Xc, steps):
                np.matmul(block, self.components_.T, out=out[a:b])
        return out

    def _check_rows(self, X: da.Array) -> None:
        self._check_fitted()
        if X.ndim != 2 or X.shape[1] != self.components_.shape[1]:
            raise ValueError(f"expected (n, {self.components_.shape[1]}) rows, got {X.shape}")

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Learned arrays + JSON-able attributes, for the caller to store (e.g. in Zarr).

        The attributes hold the parameters, scalars and the cumulative explained-variance
        curve; the arrays hold everything of size d (and, for "incremental", what a later
        partial_fit resumes from)."""
        self._check_fitted()
        arrays = {
            "data_min": self.data_min_,
            "data_max": self.data_max_,
            "mean": self.mean_,
            "components": self.components_,
            "explained_variance": self.explained_variance_,
            "explained_variance_ratio": self.explained_variance_ratio_,
        }
        if self.method_ == "incremental":  # what a later partial_fit resumes from
            arrays |= {
                "basis_tail": self._basis[self.n_components_ :],
                "singular_values": self._singular,
                "raw_mean": self._stats.mean,
                "raw_m2": self._stats.m2,
            }
        attrs = {
            "version": _STATE_VERSION,
            "params": self.get_params(),
            "method_": self.method_,
            "n_components_": int(self.n_components_),
            "n_samples_seen_": int(self.n_samples_seen_),
            "total_variance_": float(self.total_variance_),
            # small (at most n values) and what the explained-variance plot reads
            "cumulative_variance_ratio": self.cumulative_variance_ratio_.tolist(),
        }
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, attrs

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], attrs: dict) -> ScaledPCA:
        """Rebuild a fitted estimator from `to_state` output (arrays may be Zarr arrays)."""
        if attrs.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported ScaledPCA state version {attrs.get('version')!r}")
        a = {k: np.asarray(v[...]) for k, v in arrays.items()}
        est = cls(**attrs["params"])
        est.data_min_ = a["data_min"].astype(np.float32)
        est.data_max_ = a["data_max"].astype(np.float32)
        est.mean_ = a["mean"]
        est.explained_variance_ = a["explained_variance"]
        est.explained_variance_ratio_ = a["explained_variance_ratio"]
        est.cumulative_variance_ratio_ = np.asarray(attrs["cumulative_variance_ratio"])
        est.method_ = attrs["method_"]
        est.n_components_ = attrs["n_components_"]
        est.n_samples_seen_ = attrs["n_samples_seen_"]
        est.total_variance_ = attrs["total_variance_"]
        est._scale = _inverse_range(a["data_min"], a["data_max"])
        if est.method_ == "incremental":
            est._basis = np.concatenate([a["components"], a["basis_tail"]]).astype(np.float32)
            est._singular = a["singular_values"]
            est._stats = _Stats(
                est.n_samples_seen_,
                a["data_min"].astype(np.float64),
                a["data_max"].astype(np.float64),
                a["raw_mean"],
                a["raw_m2"],
            )
            est.components_ = est._basis[: est.n_components_]
        else:
            est.components_ = a["components"].astype(np.float32)
        return est

    # ------------------------------------------------------------------ shared steps
    def _validate(self, X: da.Array, fitting: bool) -> da.Array:
        """Check parameters and X; return X with all columns in one chunk (rows stay)."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(X, da.Array) or X.ndim != 2:
            raise TypeError("X must be a 2-D dask.array.Array (rows = images)")
        if self.n_components is None and not 0 < self.variance <= 1:
            raise ValueError(f"variance must be in (0, 1], got {self.variance}")
        if fitting:
            limit = min(X.shape[0] - 1, X.shape[1])
            if self.n_components is not None and not 1 <= self.n_components <= limit:
                raise ValueError(f"n_components must be in [1, {limit}], got {self.n_components}")
        if X.shape[0] < 1 or (fitting and X.shape[0] < 2):
            raise ValueError(f"too few rows to fit: {X.shape[0]}")
        return X.rechunk({1: -1})

    def _set_scaling(self, stats: _Stats) -> None:
        self._stats = stats
        self._scale = _inverse_range(stats.data_min, stats.data_max)
        self.data_min_ = stats.data_min.astype(np.float32)
        self.data_max_ = stats.data_max.astype(np.float32)
        self.mean_ = (stats.mean - stats.data_min) * self._scale
        self.n_samples_seen_ = stats.n
        if stats.m2 is not None:
            self.total_variance_ = float(np.sum(stats.m2 * self._scale**2) / (stats.n - 1))

    def _affine(self, centre: bool = True) -> np.ndarray:
        mean = self.mean_ if centre else np.zeros_like(self.mean_)
        return np.stack([self.data_min_, self._scale, mean]).astype(np.float32)

    def _finish(self, explained_variance: np.ndarray, n_available: int) -> int:
        """Set the variance attributes and n_components_ from a (partial) spectrum."""
        ratio = explained_variance / self.total_variance_
        k = self.n_components or _cut(ratio, self.variance)
        if k > n_available:
            warnings.warn(
                f"ScaledPCA({self.method}) knows {n_available} components, fewer than the "
                f"{k} asked for (variance target {self.variance}): keeping {n_available}; "
                "raise batch_size (incremental)",
                RuntimeWarning,
                stacklevel=3,
            )
            k = n_available
        self.n_components_ = int(k)
        self.explained_variance_ = explained_variance[:k].copy()
        self.explained_variance_ratio_ = ratio[:k].copy()
        self.cumulative_variance_ratio_ = np.cumsum(ratio)
        return k

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise ValueError("ScaledPCA is not fitted yet")

    # ------------------------------------------------------------------ gram
    def _fit_gram(self, Xc: da.Array) -> None:
        """Exact: eigh of Xc Xc^T built panel by panel, then components = (U / s)^T Xc."""
        n, d = Xc.shape
        steps, panels = _gram_plan(_chunk_bounds(Xc), d, self.batch_size)
        gram = np.empty((n, n))
        panel = np.empty((0, d), np.float32)
        for pa, pb in panels:
            del panel
            panel = np.empty((pb - pa, d), np.float32)
            for a, b, block in _stream(Xc, [s for s in steps if pa <= s[0] < pb]):
                panel[a - pa : b - pa] = block
            gram[pa:pb, pa:pb] = panel @ panel.T
            for a, b, block in _stream(Xc, [s for s in steps if s[0] >= pb]):
                cross = panel @ block.T
                gram[pa:pb, a:b] = cross
                gram[a:b, pa:pb] = cross.T
        self.total_variance_ = float(np.trace(gram) / (n - 1))
        eigvals, eigvecs = _top_eigh(gram, min(n, d))
        del gram
        k = self._finish(eigvals / (n - 1), n_available=min(n - 1, d))
        # 1 / singular value; an exactly null direction (duplicate rows) gets a zero component
        inverse = np.zeros(k)
        nonzero = eigvals[:k] > eigvals[0] * 1e-12
        inverse[nonzero] = 1 / np.sqrt(eigvals[:k][nonzero])
        weights = (eigvecs[:, :k] * inverse).astype(np.float32)
        components = np.zeros((k, d), np.float32, order="F")
        _add_wt_x(components, weights[pa:pb], panel)  # the last panel is still in memory
        del panel
        for a, b, block in _stream(Xc, [s for s in steps if s[0] < pa]):
            _add_wt_x(components, weights[a:b], block)
        _flip_signs(components)
        self.components_ = components

    # ------------------------------------------------------------------ randomized
    def _fit_randomized(self, Xc: da.Array) -> None:
        """Subspace iteration on Xc^T Xc (one pass per iteration), growing the sketch until
        the cut fits inside it with room to spare.

        The Ritz values near the cut are underestimated when the sketch is barely wider than
        the cut (on a flat noise tail with 10 spare columns the cut came out 2 components
        late), hence the generous OVERSAMPLE."""
        n, d = Xc.shape
        limit = min(n, d)
        steps = _stream_steps(Xc)
        rng = np.random.default_rng(self.random_state)
        width = min(_sketch_width(self.n_components or RANDOMIZED_START), limit)
        basis = rng.standard_normal((width, d), dtype=np.float32)
        while True:
            for _ in range(POWER_ITERATIONS):
                acc = np.zeros((width, d), np.float32, order="F")
                for _a, _b, block in _stream(Xc, steps):
                    _add_wt_x(acc, block @ basis.T, block)
                del basis
                _, basis = linalg.rq(acc, mode="economic", overwrite_a=True)  # orthonormal rows
                del acc
            sketch, sum_squares = np.empty((n, width)), 0.0
            for a, b, block in _stream(Xc, steps):
                sketch[a:b] = block @ basis.T
                sum_squares += float(np.square(block).sum(dtype=np.float64))
            self.total_variance_ = sum_squares / (n - 1)
            _, s, wt = linalg.svd(sketch, full_matrices=False)
            basis = wt.astype(np.float32) @ basis
            ev = s**2 / (n - 1)
            needed = self.n_components or _cut(ev / self.total_variance_, self.variance)
            if _sketch_width(needed) <= width or width == limit:
                break
            grow = min(2 * width, limit) - width
            basis = np.concatenate([basis, rng.standard_normal((grow, d), dtype=np.float32)])
            width += grow
        k = self._finish(ev, n_available=width)
        components = np.ascontiguousarray(basis[:k])
        _flip_signs(components)
        self.components_ = components

    # ------------------------------------------------------------------ incremental
    def _incremental_batch(self) -> int:
        batch = self.batch_size or max(INCREMENTAL_BATCH, self.n_components or 0)
        if self.n_components is not None and batch < self.n_components:
            raise ValueError("batch_size must be >= n_components for method='incremental'")
        return batch

    def _fit_incremental(self, Xs: da.Array, ratio: np.ndarray | None, running: np.ndarray) -> None:
        """Stream scaled rows into one buffer [retained s_i v_i | batch | mean correction].

        `ratio` (new / old scale per column) rescales the retained rows of earlier calls: exact
        for what was kept, since the stacked rows need not be orthogonal. Chunks are copied
        straight into the buffer, so memory is the buffer + the new rows (about
        (2 keep + batch) x d float32) whatever n is.
        """
        n_seen = self.n_samples_seen_ - Xs.shape[0]
        batch = self._incremental_batch()
        keep = self.n_components or batch
        k = len(self._singular)
        buffer = np.empty((max(keep, k) + batch + 1, Xs.shape[1]), np.float32)
        buffer[:k] = self._basis
        buffer[:k] *= self._singular[:, None].astype(np.float32)
        if ratio is not None:
            buffer[:k] *= ratio.astype(np.float32)
        del self._basis
        filled = 0
        steps = _stream_steps(Xs)
        for _a, _b, block in _stream(Xs, steps):
            start = 0
            while start < len(block):
                take = min(batch - filled, len(block) - start)
                buffer[k + filled : k + filled + take] = block[start : start + take]
                filled, start = filled + take, start + take
                if filled == batch:
                    k, running, n_seen = _stack_update(buffer, k, filled, running, n_seen, keep)
                    filled = 0
        if filled:
            k, running, n_seen = _stack_update(buffer, k, filled, running, n_seen, keep)
        rows = buffer[:k]
        self._singular = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        self._basis = rows / self._singular[:, None].astype(np.float32)


def _stack_update(
    buffer: np.ndarray, k: int, b: int, running: np.ndarray, n_seen: int, keep: int
) -> tuple[int, np.ndarray, int]:
    """One Ross et al. / sklearn IncrementalPCA step on buffer[:k + b + 1], in place.

    Rows 0..k are the retained s_i v_i, rows k..k+b the new scaled batch; the SVD is done via
    the small Gram matrix of the stacked rows. Afterwards buffer[:new_k] holds the new s_i v_i.
    Returns (new_k, running mean of the scaled rows, rows seen).
    """
    batch = buffer[k : k + b]
    batch_mean = batch.mean(axis=0, dtype=np.float64)
    batch -= batch_mean.astype(np.float32)
    correction = math.sqrt(n_seen * b / (n_seen + b)) if n_seen else 0.0
    buffer[k + b] = (running - batch_mean) * correction
    rows = buffer[: k + b + 1]
    s2, u = _top_eigh((rows @ rows.T).astype(np.float64), min(keep, n_seen + b - 1, len(rows)))
    u = u[:, s2 > s2[0] * 1e-14] if len(s2) else u  # drop directions without variance
    new_rows = u.T.astype(np.float32) @ rows  # = s_i v_i
    buffer[: len(new_rows)] = new_rows
    return len(new_rows), (running * n_seen + batch_mean * b) / (n_seen + b), n_seen + b
