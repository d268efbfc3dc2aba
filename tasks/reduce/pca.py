"""Out-of-core min-max scaling + PCA to a variance target over row-chunked Dask arrays.

The in-memory notebook path (MinMaxScaler + PCA(0.8) on block3_pool features, 200,704 floats
per image) holds several copies of the (n, d) matrix and ran out of RAM. These estimators
instead stream the rows of a Dask array (usually `dask.array.from_zarr` on the feature store,
train rows only) a few times and keep only small or (k, d)-sized state, never the (n, d)
matrix. Both follow scikit-learn's semantics (MinMaxScaler, then PCA with
``svd_solver="full"``; constant columns get range 1; the variance cut is
``searchsorted(cumsum(ratio), target, side="right") + 1``; components' signs are fixed like
``svd_flip(u_based_decision=False)``):

* `ScaledPCA`: exact ("gram") or randomized; one `fit` over all rows.
* `ScaledIncrementalPCA` (tasks/reduce/incremental.py): batches of rows, memory independent
  of n, and `partial_fit` to update a fit with new rows.

The algorithms live in private modules (_gram, _covariance, _randomized; _stats for the
scaling, _stream for the passes); this module only holds parameters and learned state.
"""

from __future__ import annotations

import dask.array as da

from tasks.reduce._base import ScaledPCABase
from tasks.reduce._covariance import fit_covariance
from tasks.reduce._gram import fit_gram
from tasks.reduce._passes import active
from tasks.reduce._randomized import fit_randomized
from tasks.reduce._stats import column_stats, lazy_rows
from tasks.reduce._stream import product_threads
from tasks.reduce.incremental import ScaledIncrementalPCA

METHODS = ("gram", "randomized")

__all__ = ["METHODS", "ScaledIncrementalPCA", "ScaledPCA", "ScaledPCABase"]


class ScaledPCA(ScaledPCABase):
    """MinMaxScaler + PCA to a variance target, fitted out of core on a row-chunked Dask array.

    Parameters
    ----------
    variance : float in (0, 1]
        Keep the fewest components whose explained variance ratio sums to at least this
        (sklearn's ``PCA(n_components=variance)``). Ignored when `n_components` is set.
    n_components : int, optional
        Keep exactly this many components instead (at most min(n - 1, d)).
    method : {"gram", "randomized"}
        "gram" (exact, the default): the whole spectrum, so the variance cut is exact. It
        solves the smaller side (`solver_`): the (n, n) Gram matrix when n < d, the (d, d)
        covariance when d <= n. Memory, n rows and d columns, float32 k x d components always
        included:
        * gram, n < d: n x n float64 Gram matrix (about 3x that during ``eigh``) + one panel
          of `batch_size` rows x d float32; (panels + 1) / 2 reads of the data plus a stats
          pass and a components pass.
        * gram, d <= n: d x d float64 covariance (about 3x that during ``eigh``) + one
          streaming step; a stats pass and one product pass.
        * randomized: about 3 x sketch width x d float32 (sketch >= 1.5 x the components);
          POWER_ITERATIONS + 1 passes per sketch, repeated with a doubled sketch when the
          cut does not fit.
    batch_size : int, optional
        gram: rows per panel (default: what fits in PANEL_BYTES, at least one input chunk).
        Ignored by randomized and by the covariance side.
    random_state : int
        Seed of the randomized sketch.
    max_width : int, optional
        randomized: the widest sketch it may grow to for a variance target (the memory plan's
        cap); it keeps what that sketch knows and says so in one line.

    Attributes (learned)
    --------------------
    data_min_, data_max_ : (d,) float32 -- min-max scaling, as MinMaxScaler.
    scale_ : (d,) float64 -- 1 / range per column (1 for constant columns).
    mean_ : (d,) float64 -- column means of the scaled training rows.
    components_ : (n_components_, d) float32 -- unit rows, sign fixed.
    explained_variance_, explained_variance_ratio_ : (n_components_,) float64.
    cumulative_variance_ratio_ : float64 -- over every component the method knows (gram: the
        whole spectrum), for the explained-variance plot.
    total_variance_ : float -- exact total variance of the scaled rows (ddof=1).
    n_components_, n_samples_seen_, method_.
    solver_ : "gram", "covariance" or "randomized" -- what this fit computed.
    """

    fitted_methods = METHODS

    def __init__(
        self,
        variance: float = 0.8,
        n_components: int | None = None,
        method: str = "gram",
        batch_size: int | None = None,
        random_state: int = 0,
        max_width: int | None = None,
    ) -> None:
        self.variance = variance
        self.n_components = n_components
        self.method = method
        self.batch_size = batch_size
        self.random_state = random_state
        self.max_width = max_width

    def fit(self, X: da.Array, y: None = None) -> ScaledPCA:
        """Fit on the training rows X (float32/float16, chunked along rows); y is ignored."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        X = self._validate(X, fitting=True)
        n, d = X.shape
        self.solver_ = self.method if self.method == "randomized" or n < d else "covariance"
        passes = active()  # on the workers when a distributed client is active
        with product_threads():
            if self.solver_ == "gram":  # reads its statistics with the first panel
                fit = fit_gram(X, self.batch_size, self._scaling, self._needed, passes)
            else:
                Xc = lazy_rows(X, self._scaling(column_stats(X, with_m2=False)))
                fit = (
                    fit_covariance(Xc, self._needed, passes)
                    if self.solver_ == "covariance"
                    else fit_randomized(
                        Xc,
                        self.n_components,
                        self.random_state,
                        self._needed,
                        passes,
                        self.max_width,
                    )
                )
        self._warn_if_short(self._finish(fit))
        self.method_ = self.method
        return self
