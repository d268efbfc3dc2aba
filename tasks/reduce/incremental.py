"""Incremental scaled PCA: rows in batches, memory independent of n, and `partial_fit`.

Each batch is stacked under the directions kept so far (as s_i v_i) and a mean-correction row,
and the stack's SVD (via its small Gram matrix) gives the new directions: Ross et al.'s update,
as in scikit-learn's IncrementalPCA. Truncating to `batch_size` directions after each batch
makes it approximate; with `batch_size` >= all rows it is exact.

The updates are a sequential chain (each needs the previous directions). Without a cluster
this process runs it on blocks Dask's threads read; on a cluster each update is a task that
takes the previous state (a future) and one batch read on the workers, so the rows never
come to this process, only the final directions do (`_passes.OnWorkers.chain`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import dask.array as da
import numpy as np

from tasks.reduce._base import ScaledPCABase
from tasks.reduce._linalg import Fit, flip_signs, top_eigh
from tasks.reduce._passes import active
from tasks.reduce._stats import ColumnStats, column_stats, lazy_rows
from tasks.reduce._stream import logger, product_threads, stream_steps

INCREMENTAL_BATCH = 256  # default rows per update (and components kept)


class ScaledIncrementalPCA(ScaledPCABase):
    """MinMaxScaler + incremental PCA to a variance target, out of core, updatable.

    Parameters
    ----------
    variance : float in (0, 1]
        Variance target of the cut (ignored when `n_components` is set).
    n_components : int, optional
        Keep exactly this many components instead.
    batch_size : int, optional
        Rows per update, also the number of directions kept between updates (default
        INCREMENTAL_BATCH, at least `n_components`).
    max_batch : int, optional
        The largest batch a variance target may grow it to (the memory plan's cap); it keeps
        what that batch knows and says so in one line.

    Memory: about (2 x kept + batch_size) x d float32, nothing that grows with n; two passes
    (column statistics, then the batches) per `fit` / `partial_fit` call.

    Attributes (learned): those of `ScaledPCA`, plus `singular_values_` and `retained_` (every
    direction kept between updates, of which `components_` are the first n_components_) and
    `stats_` (the raw column moments that a later `partial_fit` merges with).
    """

    fitted_methods = ("incremental",)

    def __init__(
        self,
        variance: float = 0.8,
        n_components: int | None = None,
        batch_size: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        self.variance = variance
        self.n_components = n_components
        self.batch_size = batch_size
        self.max_batch = max_batch

    def fit(self, X: da.Array, y: None = None) -> ScaledIncrementalPCA:
        """Fit from scratch on the training rows X; y is ignored.

        With a variance target and no `batch_size`, a fit whose kept directions explain less
        than the target is redone with twice the batch (a log line says so) until the target
        is met or the batch holds every row; otherwise a warning says what it reached.
        """
        batch = self._batch()
        top = min(self.max_batch or X.shape[0], X.shape[0])
        while True:
            needed = self._update(X, True, batch)
            met = needed <= self.n_components_
            if met or self.batch_size is not None or batch >= min(top, X.shape[0] - 1):
                break
            logger.info(
                "incremental PCA: %d directions explain %.4f of the variance, short of the %s "
                "target: fitting again with batch %d",
                self.n_components_,
                self.explained_variance_ratio_.sum(),
                self.variance,
                min(2 * batch, top),
            )
            batch = min(2 * batch, top)
        hint = "; the largest batch that fits memory" if batch == self.max_batch else ""
        self._warn_if_short(needed, hint=hint or "; raise batch_size")
        return self

    def partial_fit(self, X: da.Array, y: None = None) -> ScaledIncrementalPCA:
        """Update the fit with new rows X (the first call fits); y is ignored.

        Min-max semantics: like MinMaxScaler.partial_fit, data_min_/data_max_ widen to cover all
        rows seen, and the PCA describes every row scaled with the final range. Rows seen
        earlier survive only as their retained directions; those are rescaled exactly to the
        new range (centring absorbs the shift of the minimum), the truncated remainder cannot
        be. mean_ and the total variance stay exact (merged raw moments).

        Tolerance: with batch_size >= all rows nothing is truncated and two calls equal sklearn
        on the concatenation; in tests/tasks/reduce/test_pca.py (keeping 128 of 599 directions)
        two calls vs one fit differ by < 1e-4 in explained variance ratio and < 0.01 rad on the
        top-10 subspace.
        """
        first = not hasattr(self, "stats_")
        # a fit that grew its batch keeps that many directions: so do its updates
        batch = self._batch() if first else max(self._batch(), len(self.singular_values_))
        self._warn_if_short(self._update(X, first, batch), hint="; raise batch_size")
        return self

    def _update(self, X: da.Array, first: bool, batch: int) -> int:
        """One call's work: merge the column statistics, then stream X's rows in batches of
        `batch`; returns the components the cut asks for."""
        X = self._validate(X, fitting=first)
        keep = self.n_components or batch
        previous: ColumnStats | None = None if first else self.stats_
        new = column_stats(X, with_m2=True)
        stats = new if previous is None else previous.merge(new)
        old_scale = None if first else self.scale_
        self._set_scaling(stats)
        self.stats_ = stats
        total_variance = float(np.sum(stats.m2 * self.scale_**2) / (stats.n - 1))
        batch = min(batch, X.shape[0])  # no buffer rows that no row can fill
        keep = min(keep, stats.n)
        buffer, filled = self._start_buffer(X.shape[1], keep, batch, old_scale)
        if previous is None:
            running, n_seen = np.zeros(X.shape[1]), 0
        else:
            running, n_seen = (previous.mean - stats.data_min) * self.scale_, previous.n
        state = Directions(buffer, filled, running, n_seen)
        del buffer
        Xs = lazy_rows(X, self._affine(centre=False))
        step = partial(_batch_update, keep=keep)
        with product_threads():
            state = active().chain(
                Xs, stream_steps(Xs), batch, step, state, Directions.copy, "incremental batches"
            )
        rows = state.buffer[: state.k]
        singular = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        retained = rows / singular[:, None].astype(np.float32)
        del state, rows
        flip_signs(retained)
        explained = singular**2 / (stats.n - 1)
        k = min(self._needed(explained, total_variance), len(explained))
        needed = self._finish(Fit(explained, total_variance, retained[:k]))
        self.retained_, self.singular_values_ = retained, singular
        self.method_ = "incremental"
        return needed

    def _batch(self) -> int:
        batch = self.batch_size or max(INCREMENTAL_BATCH, self.n_components or 0)
        if self.n_components is not None and batch < self.n_components:
            raise ValueError("batch_size must be >= n_components for incremental PCA")
        return batch

    def _start_buffer(
        self, d: int, keep: int, batch: int, old_scale: np.ndarray | None
    ) -> tuple[np.ndarray, int]:
        """The update buffer [retained s_i v_i | batch | mean correction] and its filled rows.

        The retained rows of earlier calls are rescaled by new / old scale per column: exact
        for what was kept, since the stacked rows need not be orthogonal. The buffer then holds
        the only copy (the old `retained_` and its `components_` view are released), so memory
        stays the buffer + the new rows, about (2 keep + batch) x d float32, whatever n is.
        """
        r = 0 if old_scale is None else len(self.singular_values_)
        buffer = np.empty((max(keep, r) + batch + 1, d), np.float32)
        if old_scale is not None:
            buffer[:r] = self.retained_
            buffer[:r] *= self.singular_values_[:, None].astype(np.float32)
            buffer[:r] *= (self.scale_ / old_scale).astype(np.float32)
            del self.retained_, self.components_
        return buffer, r

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "basis_tail": self.retained_[self.n_components_ :],
            "singular_values": self.singular_values_,
            "raw_mean": self.stats_.mean,
            "raw_m2": self.stats_.m2,
        }

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.retained_ = np.concatenate([arrays["components"], arrays["basis_tail"]]).astype(
            np.float32
        )
        self.singular_values_ = arrays["singular_values"]
        self.stats_ = ColumnStats(
            self.n_samples_seen_,
            arrays["data_min"].astype(np.float64),
            arrays["data_max"].astype(np.float64),
            arrays["raw_mean"],
            arrays["raw_m2"],
        )
        self.components_ = self.retained_[: self.n_components_]


class Directions:
    """The state an update passes to the next: buffer[:k] holds the directions kept so far
    (as s_i v_i) and the rest of the buffer has room for one batch and the mean-correction
    row; `running` is the mean of the scaled rows seen, over `n_seen` rows.

    Pickled (to move between workers) without the unused room, and sized by its data."""

    def __init__(self, buffer: np.ndarray, k: int, running: np.ndarray, n_seen: int) -> None:
        self.buffer, self.k, self.running, self.n_seen = buffer, k, running, n_seen

    def copy(self) -> Directions:
        buffer = np.empty_like(self.buffer)
        buffer[: self.k] = self.buffer[: self.k]
        return Directions(buffer, self.k, self.running.copy(), self.n_seen)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "kept": self.buffer[: self.k],
            "rows": len(self.buffer),
            "running": self.running,
            "n_seen": self.n_seen,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        kept = state["kept"]
        self.buffer = np.empty((state["rows"], kept.shape[1]), np.float32)
        self.buffer[: len(kept)] = kept
        self.k, self.running, self.n_seen = len(kept), state["running"], state["n_seen"]

    def __sizeof__(self) -> int:
        return self.buffer[: self.k].nbytes + self.running.nbytes


def _batch_update(state: Directions, rows: np.ndarray, keep: int) -> Directions:
    """One update with the next batch of scaled rows, in place."""
    b = len(rows)
    state.buffer[state.k : state.k + b] = rows
    state.k, state.running, state.n_seen = _stack_update(
        state.buffer, state.k, b, state.running, state.n_seen, keep
    )
    return state


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
    s2, u = top_eigh((rows @ rows.T).astype(np.float64), min(keep, n_seen + b - 1, len(rows)))
    u = u[:, s2 > s2[0] * 1e-14] if len(s2) else u  # drop directions without variance
    new_rows = u.T.astype(np.float32) @ rows  # = s_i v_i
    buffer[: len(new_rows)] = new_rows
    return len(new_rows), (running * n_seen + batch_mean * b) / (n_seen + b), n_seen + b
