"""What every scaled PCA estimator shares: parameters of the cut, min-max scaling, the
variance attributes, projection, and storage (`to_state` / `from_state`)."""

from __future__ import annotations

import warnings
from typing import ClassVar

import dask.array as da
import numpy as np
from dask.delayed import delayed
from sklearn.base import BaseEstimator

from tasks.reduce._linalg import Fit, cut
from tasks.reduce._passes import active
from tasks.reduce._stats import ColumnStats, inverse_range, lazy_rows, project
from tasks.reduce._stream import product_threads, stream_steps

STATE_VERSION = 1


def _rows(block: np.ndarray, a: int, b: int, components: np.ndarray) -> np.ndarray:
    """One scaled, centred block projected on the components."""
    return block @ components.T


class ScaledPCABase(BaseEstimator):
    """Shared by `ScaledPCA` and `ScaledIncrementalPCA`; not an estimator on its own.

    Subclasses name the `method_` values they fit in `fitted_methods`; `from_state` uses that
    to rebuild whichever estimator a stored state came from.
    """

    fitted_methods: ClassVar[tuple[str, ...]] = ()
    _kinds: ClassVar[dict[str, type[ScaledPCABase]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for method in cls.fitted_methods:
            ScaledPCABase._kinds[method] = cls

    # ------------------------------------------------------------------ projection
    def transform(self, X: da.Array) -> da.Array:
        """Lazy (n, n_components_) float32 projection, chunked like X's rows.

        Each block is one BLAS product. On Dask's threaded scheduler compute it under
        ``threadpoolctl.threadpool_limits(1)``: Dask runs blocks in parallel already, and
        OpenBLAS's own threads on top of that were many times slower (benchmarks/README.md).
        Distributed workers start with one BLAS thread already.
        """
        self._check_rows(X)
        return X.rechunk({1: -1}).map_blocks(
            project,
            affine=delayed(self._affine(), pure=True),
            components=delayed(self.components_, pure=True),
            chunks=(X.chunks[0], (self.n_components_,)),
            dtype=np.float32,
        )

    def project(self, X: da.Array) -> np.ndarray:
        """Every row of X projected: one (n, n_components_) float32 array in this process.

        Runs like the fit's passes: on a cluster the workers project their blocks and send
        back (b, k) rows; the (k, d) components are scattered to them once, never put in a
        task graph (`transform` puts them in one: gigabytes for wide features, "Sending large
        graph"). Without a cluster this process multiplies the blocks Dask's threads read.
        """
        self._check_rows(X)
        Xc = lazy_rows(X.rechunk({1: -1}), self._affine())
        out = np.empty((X.shape[0], self.n_components_), np.float32)
        passes = active()
        components = passes.share(self.components_)
        with product_threads():
            for a, b, rows in passes.map(Xc, stream_steps(Xc), _rows, "projection", components):
                out[a:b] = rows
        return out

    # ------------------------------------------------------------------ storage
    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Learned arrays + JSON-able attributes, for the caller to store (e.g. in Zarr).

        The attributes hold the parameters, scalars and the cumulative explained-variance
        curve; the arrays hold everything of size d (and whatever a later `partial_fit`
        resumes from)."""
        self._check_fitted()
        arrays = {
            "data_min": self.data_min_,
            "data_max": self.data_max_,
            "mean": self.mean_,
            "components": self.components_,
            "explained_variance": self.explained_variance_,
            "explained_variance_ratio": self.explained_variance_ratio_,
            **self._state_arrays(),
        }
        attrs = {
            "version": STATE_VERSION,
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
    def from_state(cls, arrays: dict[str, np.ndarray], attrs: dict) -> ScaledPCABase:
        """Rebuild a fitted estimator from `to_state` output (arrays may be Zarr arrays).

        Returns the estimator class that fitted it (`ScaledIncrementalPCA` for
        method_ "incremental", else `ScaledPCA`), whichever class this is called on."""
        if attrs.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported ScaledPCA state version {attrs.get('version')!r}")
        import tasks.reduce.pca  # noqa: F401  (defines, and so registers, every kind)

        kind = ScaledPCABase._kinds[attrs["method_"]]
        a = {k: np.asarray(v[...]) for k, v in arrays.items()}
        names = kind._get_param_names()  # states written before the split carry more params
        est = kind(**{k: v for k, v in attrs["params"].items() if k in names})
        est.data_min_ = a["data_min"].astype(np.float32)
        est.data_max_ = a["data_max"].astype(np.float32)
        est.scale_ = inverse_range(a["data_min"], a["data_max"])
        est.mean_ = a["mean"]
        est.explained_variance_ = a["explained_variance"]
        est.explained_variance_ratio_ = a["explained_variance_ratio"]
        est.cumulative_variance_ratio_ = np.asarray(attrs["cumulative_variance_ratio"])
        est.method_ = attrs["method_"]
        est.n_components_ = attrs["n_components_"]
        est.n_samples_seen_ = attrs["n_samples_seen_"]
        est.total_variance_ = attrs["total_variance_"]
        est._restore(a)
        return est

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """Extra arrays a subclass needs to resume from a stored state."""
        return {}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Set the components (and a subclass's extra state) from stored arrays."""
        self.components_ = arrays["components"].astype(np.float32)

    # ------------------------------------------------------------------ shared steps
    def _validate(self, X: da.Array, fitting: bool) -> da.Array:
        """Check parameters and X; return X with all columns in one chunk (rows stay)."""
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

    def _set_scaling(self, stats: ColumnStats) -> None:
        self.scale_ = inverse_range(stats.data_min, stats.data_max)
        self.data_min_ = stats.data_min.astype(np.float32)
        self.data_max_ = stats.data_max.astype(np.float32)
        self.mean_ = (stats.mean - stats.data_min) * self.scale_
        self.n_samples_seen_ = stats.n

    def _scaling(self, stats: ColumnStats) -> np.ndarray:
        """Set the scaling attributes from `stats`; return the affine parameters of `centre`."""
        self._set_scaling(stats)
        return self._affine()

    def _affine(self, centre: bool = True) -> np.ndarray:
        mean = self.mean_ if centre else np.zeros_like(self.mean_)
        return np.stack([self.data_min_, self.scale_, mean]).astype(np.float32)

    def _needed(self, explained_variance: np.ndarray, total_variance: float) -> int:
        """Components the cut asks for: the fixed count, or sklearn's variance rule."""
        return self.n_components or cut(explained_variance / total_variance, self.variance)

    def _finish(self, fit: Fit) -> int:
        """Set the learned attributes from an algorithm's result; return the components the
        cut asked for (more than n_components_ when the algorithm knew fewer)."""
        ratio = fit.explained_variance / fit.total_variance
        k = len(fit.components)
        self.n_components_ = k
        self.total_variance_ = fit.total_variance
        self.explained_variance_ = fit.explained_variance[:k].copy()
        self.explained_variance_ratio_ = ratio[:k].copy()
        self.cumulative_variance_ratio_ = np.cumsum(ratio)
        self.components_ = fit.components
        return self._needed(fit.explained_variance, fit.total_variance)

    def _warn_if_short(self, needed: int, hint: str = "") -> None:
        """One line when the cut asked for more components than the fit knows: what it kept
        and the share of the variance those explain."""
        if needed > self.n_components_:
            warnings.warn(
                f"{type(self).__name__} knows {self.n_components_} components, fewer than the "
                f"{needed} asked for (variance target {self.variance}): keeping "
                f"{self.n_components_}, which explain {self.explained_variance_ratio_.sum():.4f}"
                f" of the variance{hint}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_rows(self, X: da.Array) -> None:
        self._check_fitted()
        if X.ndim != 2 or X.shape[1] != self.components_.shape[1]:
            raise ValueError(f"expected (n, {self.components_.shape[1]}) rows, got {X.shape}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise ValueError(f"{type(self).__name__} is not fitted yet")
