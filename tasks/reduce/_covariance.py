"""Exact PCA through the (d, d) covariance of the centred rows: the side to use when the rows
are at least as many as they are wide (d <= n), e.g. pooled features (1,280 wide) of
thousands of images, where an (n, n) Gram matrix would be the bigger and slower eigenproblem.

One pass accumulates Xc^T Xc (float32 products per block, summed in float64; on a cluster
each block's product is made on its worker and only the summed (d, d) matrix comes back);
the eigenvectors are the components directly, so no second pass is needed.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy.linalg import blas

from tasks.reduce._linalg import ChooseK, Fit, flip_signs, top_eigh
from tasks.reduce._passes import Passes
from tasks.reduce._stream import stream_steps, timed


def _scatter_add(acc: np.ndarray | None, block: np.ndarray, a: int, b: int) -> np.ndarray:
    """acc += the upper triangle of block^T block (syrk: half the multiply-adds)."""
    upper = blas.ssyrk(1.0, block, trans=1, lower=0)
    if acc is None:
        return upper.astype(np.float64)
    acc += upper
    return acc


def fit_covariance(Xc: da.Array, choose_k: ChooseK, passes: Passes) -> Fit:
    """eigh of Xc^T Xc, built by one fold over the row blocks."""
    n, d = Xc.shape
    scatter = passes.fold(Xc, stream_steps(Xc), _scatter_add, "covariance products")
    total_variance = float(np.trace(scatter) / (n - 1))
    with timed("eigh"):
        eigvals, eigvecs = top_eigh(scatter, d, lower=False)  # eigh reads the upper triangle only
    del scatter
    explained = eigvals / (n - 1)
    k = min(choose_k(explained, total_variance), n - 1, d)
    components = np.ascontiguousarray(eigvecs[:, :k].T, dtype=np.float32)
    flip_signs(components)
    return Fit(explained, total_variance, components)
