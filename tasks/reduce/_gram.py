"""Exact PCA through the (n, n) Gram matrix of the centred rows: the side to use when the
rows are wider than they are many (n < d).

The Gram matrix needs every pair of rows, so it is built panel by panel: a panel of rows stays
in memory while the later rows stream past it, and the data is read (panels + 1) / 2 times,
plus one pass for the components (the last panel is reused; the first is read with the
column statistics). Column slabs would read
everything once per slab (chunks hold all columns), twice the I/O of panels for the same
memory.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np

from tasks.reduce._linalg import ChooseK, Fit, add_wt_x, flip_signs, top_eigh
from tasks.reduce._passes import Passes
from tasks.reduce._stats import ColumnStats, centre, lazy_rows
from tasks.reduce._stream import chunk_bounds, group, pairs, step_rows, timed

PANEL_BYTES = 1 << 30  # default panel: fewer, bigger panels mean fewer passes over the data


def gram_plan(
    bounds: list[int], d: int, batch_size: int | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row steps (input chunks grouped up to STEP_BYTES, never more than a panel) and panels
    (groups of steps of at most `batch_size` rows, default PANEL_BYTES worth)."""
    panel_rows = batch_size or max(1, PANEL_BYTES // (4 * d))
    steps = group(bounds, min(step_rows(d), panel_rows))
    return pairs(steps), pairs(group(steps, panel_rows))


def _self_product(panel: np.ndarray) -> np.ndarray:
    return panel @ panel.T  # (OpenBLAS's syrk, half the multiply-adds, was no faster)


def _cross(block: np.ndarray, a: int, b: int, panel: np.ndarray) -> np.ndarray:
    """The (panel rows, block rows) tile of the Gram matrix."""
    return panel @ block.T


def _weighted_add(
    acc: np.ndarray | None, block: np.ndarray, a: int, b: int, weights: np.ndarray
) -> np.ndarray:
    """acc += weights[a:b]^T block: rows a..b's share of the (k, d) components."""
    if acc is None:
        acc = np.zeros((weights.shape[1], block.shape[1]), np.float32, order="F")
    add_wt_x(acc, weights[a:b], block)
    return acc


def fit_gram(
    X: da.Array,
    batch_size: int | None,
    scaling: Callable[[ColumnStats], np.ndarray],
    choose_k: ChooseK,
    passes: Passes,
) -> Fit:
    """eigh of Xc Xc^T built panel by panel, then components = (U / s)^T Xc.

    Here (no cluster), the first pass reads the raw rows for the column statistics and keeps
    the first panel's rows, so that panel is not read twice (with one panel, the data is read
    once for the Gram matrix and the components). On a cluster each panel is held by a
    worker (`passes.rows`), the workers multiply it by every later block and only the
    (panel, block) tiles come back. `scaling` turns the statistics into the affine
    parameters of `centre` (and sets the estimator's scaling attributes).
    """
    n, d = X.shape
    steps, panels = gram_plan(chunk_bounds(X), d, batch_size)
    stats, panel = passes.statistics(X, steps, keep=panels[0][1])
    affine = scaling(stats)
    if panel is not None:
        centre(panel, affine, out=panel)
    Xc = lazy_rows(X, affine)
    gram = np.empty((n, n))
    for pa, pb in panels:
        if panel is None:
            panel = passes.rows(Xc, [s for s in steps if pa <= s[0] < pb], "panel read")
        gram[pa:pb, pa:pb] = passes.call("panel product", _self_product, panel)
        later = [s for s in steps if s[0] >= pb]
        for a, b, cross in passes.map(Xc, later, _cross, "cross products", panel):
            gram[pa:pb, a:b] = cross
            gram[a:b, pa:pb] = cross.T
        if pb < n:
            panel = None  # the last panel stays, for the components
    total_variance = float(np.trace(gram) / (n - 1))
    with timed("eigh"):
        eigvals, eigvecs = top_eigh(gram, min(n, d))
    del gram
    explained = eigvals / (n - 1)
    k = min(choose_k(explained, total_variance), n - 1, d)
    # 1 / singular value; an exactly null direction (duplicate rows) gets a zero component
    inverse = np.zeros(k)
    nonzero = eigvals[:k] > eigvals[0] * 1e-12
    inverse[nonzero] = 1 / np.sqrt(eigvals[:k][nonzero])
    weights = passes.share((eigvecs[:, :k] * inverse).astype(np.float32))
    last = passes.call(
        "components from the last panel", _weighted_add, None, panel, pa, pb, weights
    )
    del panel
    components = passes.fold(
        Xc, [s for s in steps if s[0] < pa], _weighted_add, "components", weights, start=last
    )
    flip_signs(components)
    return Fit(explained, total_variance, components)
