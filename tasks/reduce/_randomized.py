"""Randomized PCA: subspace iteration on A = Xc^T Xc with the basis on the feature side, a
Rayleigh-Ritz step at the end, and a sketch that grows until the variance cut fits inside it.

Why no (n, w) sketch: with V the (w, d) orthonormal basis of the last power iteration, the
singular values and right vectors of the sketch Xc V^T are the eigenpairs of the (w, w) matrix
V A V^T (sketch^T sketch = V Xc^T Xc V^T), and A V^T is the same (w, d) sum every power
iteration already makes. So every pass is a fold of per-block (w, d) products, merged on the
workers where the blocks are read (it divides by K workers), and this process holds only (w, d)
and (w, w) arrays, whatever n is. A tall-skinny QR of the sketch gives the same subspace (the
Ritz vectors of span V); the squared singular values it needs lose only what lies below float
precision of the top one, far below any variance cut.

POWER_ITERATIONS + 1 passes per sketch width (plus the column statistics); a width that the cut
outgrows is doubled and iterated again from the basis found so far. `max_width` caps the growth
(the memory plan's limit): the fit then keeps what the widest sketch knows and says so in one
line (`ScaledPCABase._warn_if_short`).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import linalg

from tasks.reduce._linalg import ChooseK, Fit, add_wt_x, flip_signs, top_eigh
from tasks.reduce._passes import Passes
from tasks.reduce._stream import stream_steps

RANDOMIZED_START = 128  # first sketch width's components when only a variance target is known
OVERSAMPLE = 0.5  # sketch >= (1 + this) x the components its cut needs (+10)
POWER_ITERATIONS = 4  # passes of (Xc^T Xc) per sketch before the Ritz pass (sklearn uses 4-7)


def sketch_width(components: int) -> int:
    return components + max(10, int(OVERSAMPLE * components))


def _power_add(
    acc: tuple[np.ndarray, float] | None, block: np.ndarray, a: int, b: int, basis: np.ndarray
) -> tuple[np.ndarray, float]:
    """acc += ((block basis^T)^T block, the block's sum of squares): its share of A basis^T as
    (w, d) rows, and of the total variance."""
    if acc is None:
        acc = (np.zeros(basis.shape, np.float32, order="F"), 0.0)
    add_wt_x(acc[0], block @ basis.T, block)
    return acc[0], acc[1] + float(np.square(block).sum(dtype=np.float64))


def orthonormal_rows(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the row space of a (w, d) array: the QR of its (d, w)
    transpose (LAPACK's tall QR was 4-5x faster than the RQ of the wide array here)."""
    return linalg.qr(rows.T, mode="economic", overwrite_a=True)[0].T


def fit_randomized(
    Xc: da.Array,
    n_components: int | None,
    random_state: int,
    choose_k: ChooseK,
    passes: Passes,
    max_width: int | None = None,
) -> Fit:
    """Grow the sketch (doubling, at most `max_width`) until `choose_k`'s cut fits in it with
    OVERSAMPLE to spare.

    The Ritz values near the cut are underestimated when the sketch is barely wider than
    the cut (on a flat noise tail with 10 spare columns the cut came out 2 components
    late), hence the generous OVERSAMPLE."""
    n, d = Xc.shape
    limit = min(n, d, max_width or min(n, d))
    steps = stream_steps(Xc)
    rng = np.random.default_rng(random_state)
    width = min(sketch_width(n_components or RANDOMIZED_START), limit)
    basis = rng.standard_normal((width, d), dtype=np.float32)
    while True:
        for i in range(POWER_ITERATIONS + 1):
            ritz = i == POWER_ITERATIONS
            phase = "Ritz pass" if ritz else "power iteration"
            acc, sum_squares = passes.fold(Xc, steps, _power_add, phase, passes.share(basis))
            if not ritz:
                del basis
                basis = orthonormal_rows(acc)
                del acc
        # basis is orthonormal and acc = basis A: the Rayleigh quotient V A V^T, symmetrised
        quotient = (basis @ acc.T).astype(np.float64)
        del acc
        eigvals, rotation = top_eigh((quotient + quotient.T) / 2, width)
        basis = rotation.T.astype(np.float32) @ basis  # Ritz vectors, largest first
        total_variance = sum_squares / (n - 1)
        explained = eigvals / (n - 1)
        needed = choose_k(explained, total_variance)
        if sketch_width(needed) <= width or width == limit:
            break
        grow = min(2 * width, limit) - width
        basis = np.concatenate([basis, rng.standard_normal((grow, d), dtype=np.float32)])
        width += grow
    k = min(needed, width)
    components = np.ascontiguousarray(basis[:k])
    flip_signs(components)
    return Fit(explained, total_variance, components)
