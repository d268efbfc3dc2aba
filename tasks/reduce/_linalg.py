"""Small dense steps shared by the PCA algorithms: eigenpairs, the variance cut, signs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.linalg import blas


def add_wt_x(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out += w.T @ x in place (out: Fortran-ordered float32), via BLAS's beta=1.

    Accumulating (k, d) results this way makes no (k, d) temporary and no extra pass over out
    (numpy's `out += w.T @ x` does both, and was slower by column slabs).
    """
    result = blas.sgemm(1.0, w.T, x.T, beta=1.0, c=out, trans_b=1, overwrite_c=1)
    if result is not out:
        raise RuntimeError("accumulator must be a Fortran-ordered float32 array")


def flip_signs(components: np.ndarray) -> None:
    """In place: each row's largest-magnitude entry positive (sklearn's svd_flip on Vt)."""
    rows = np.arange(components.shape[0])
    signs = np.sign(components[rows, np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1
    components *= signs[:, None].astype(components.dtype)


def cut(ratio: np.ndarray, target: float) -> int:
    """sklearn PCA's rule: smallest k with cumulative ratio >= target (len+1 if never)."""
    return int(np.searchsorted(np.cumsum(ratio), target, side="right")) + 1


def top_eigh(h: np.ndarray, keep: int, lower: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Largest `keep` eigenpairs of a symmetric PSD matrix, descending, eigenvalues >= 0.

    Only the `lower` (else upper) triangle of h is read."""
    m = h.shape[0]
    if keep == 0:
        return np.zeros(0), np.zeros((m, 0))
    w, v = linalg.eigh(h, lower=lower, subset_by_index=[m - keep, m - 1], overwrite_a=True)
    return np.clip(w[::-1], 0.0, None), v[:, ::-1]


ChooseK = Callable[[np.ndarray, float], int]
"""(explained variance known so far, total variance) -> components the cut needs: the
estimator's rule (a fixed count or the variance target), applied by an algorithm once its
spectrum is known; the algorithm keeps at most what it has."""


@dataclass
class Fit:
    """What an algorithm learned from the centred rows: its spectrum and kept components."""

    explained_variance: np.ndarray  # every eigenvalue it knows, descending, ddof=1
    total_variance: float  # exact, of the scaled rows (ddof=1)
    components: np.ndarray  # (k, d) float32 unit rows, signs fixed
