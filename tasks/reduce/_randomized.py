"""Randomized PCA: subspace iteration on Xc^T Xc, one streaming pass per power iteration,
growing the sketch until the variance cut fits inside it with room to spare.

Memory: about 3 x sketch width x d float32 plus an (n, sketch) float64 matrix; it never
forms an (n, n) or (d, d) matrix. POWER_ITERATIONS + 1 passes per sketch width; on a
cluster a power iteration returns one (w, d) sum and the sketch pass (b, w) rows per block.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import linalg

from tasks.reduce._linalg import ChooseK, Fit, add_wt_x, flip_signs
from tasks.reduce._passes import Passes
from tasks.reduce._stream import stream_steps

RANDOMIZED_START = 128  # first sketch width when only a variance target is known
OVERSAMPLE = 0.5  # sketch >= (1 + this) x the components its cut needs (+10)
POWER_ITERATIONS = 4  # passes of (Xc^T Xc) per sketch (sklearn uses 4-7)


def sketch_width(components: int) -> int:
    return components + max(10, int(OVERSAMPLE * components))


def _power_add(
    acc: np.ndarray | None, block: np.ndarray, a: int, b: int, basis: np.ndarray
) -> np.ndarray:
    """acc += (block basis^T)^T block: one block's share of Xc^T Xc basis^T, as (w, d) rows."""
    if acc is None:
        acc = np.zeros(basis.shape, np.float32, order="F")
    add_wt_x(acc, block @ basis.T, block)
    return acc


def _sketch_rows(block: np.ndarray, a: int, b: int, basis: np.ndarray) -> tuple[np.ndarray, float]:
    """The block's rows of the sketch, and its sum of squares (for the total variance)."""
    return block @ basis.T, float(np.square(block).sum(dtype=np.float64))


def fit_randomized(
    Xc: da.Array, n_components: int | None, random_state: int, choose_k: ChooseK, passes: Passes
) -> Fit:
    """Grow the sketch (doubling) until `choose_k`'s cut fits in it with OVERSAMPLE to spare.

    The Ritz values near the cut are underestimated when the sketch is barely wider than
    the cut (on a flat noise tail with 10 spare columns the cut came out 2 components
    late), hence the generous OVERSAMPLE."""
    n, d = Xc.shape
    limit = min(n, d)
    steps = stream_steps(Xc)
    rng = np.random.default_rng(random_state)
    width = min(sketch_width(n_components or RANDOMIZED_START), limit)
    basis = rng.standard_normal((width, d), dtype=np.float32)
    while True:
        for _ in range(POWER_ITERATIONS):
            acc = passes.fold(Xc, steps, _power_add, "power iteration", passes.share(basis))
            del basis
            _, basis = linalg.rq(acc, mode="economic", overwrite_a=True)  # orthonormal rows
            del acc
        sketch, sum_squares = np.empty((n, width)), 0.0
        shared = passes.share(basis)
        for a, b, (rows, squares) in passes.map(Xc, steps, _sketch_rows, "sketch", shared):
            sketch[a:b] = rows
            sum_squares += squares
        del shared
        total_variance = sum_squares / (n - 1)
        _, s, wt = linalg.svd(sketch, full_matrices=False)
        basis = wt.astype(np.float32) @ basis
        explained = s**2 / (n - 1)
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
