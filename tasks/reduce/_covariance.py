"""Exact PCA through the (d, d) covariance of the centred rows: the side to use when the rows
are at least as many as they are wide (d <= n), e.g. pooled features (1,280 wide) of
thousands of images, where an (n, n) Gram matrix would be the bigger and slower eigenproblem.

One streaming pass accumulates Xc^T Xc (float32 products per block, summed in float64); the
eigenvectors are the components directly, so no second pass is needed.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy.linalg import blas

from tasks.reduce._linalg import ChooseK, Fit, flip_signs, top_eigh
from tasks.reduce._stream import stream, stream_steps, timed


def fit_covariance(Xc: da.Array, choose_k: ChooseK) -> Fit:
    """eigh of Xc^T Xc (upper triangle built with syrk, half the multiply-adds of a product)."""
    n, d = Xc.shape
    scatter = np.zeros((d, d))
    for _a, _b, block in stream(Xc, stream_steps(Xc), "covariance products"):
        scatter += blas.ssyrk(1.0, block, trans=1, lower=0)  # upper triangle of block^T block
    total_variance = float(np.trace(scatter) / (n - 1))
    with timed("eigh"):
        eigvals, eigvecs = top_eigh(scatter, d, lower=False)  # eigh reads the upper triangle only
    del scatter
    explained = eigvals / (n - 1)
    k = min(choose_k(explained, total_variance), n - 1, d)
    components = np.ascontiguousarray(eigvecs[:, :k].T, dtype=np.float32)
    flip_signs(components)
    return Fit(explained, total_variance, components)
