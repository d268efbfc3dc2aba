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
from tasks.reduce._stats import ColumnStats, RunningStats, centre, lazy_rows
from tasks.reduce._stream import (
    chunk_bounds,
    group,
    pairs,
    step_rows,
    stream,
    timed,
)

PANEL_BYTES = 1 << 30  # default panel: fewer, bigger panels mean fewer passes over the data


def gram_plan(
    bounds: list[int], d: int, batch_size: int | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row steps (input chunks grouped up to STEP_BYTES, never more than a panel) and panels
    (groups of steps of at most `batch_size` rows, default PANEL_BYTES worth)."""
    panel_rows = batch_size or max(1, PANEL_BYTES // (4 * d))
    steps = group(bounds, min(step_rows(d), panel_rows))
    return pairs(steps), pairs(group(steps, panel_rows))


def fit_gram(
    X: da.Array,
    batch_size: int | None,
    scaling: Callable[[ColumnStats], np.ndarray],
    choose_k: ChooseK,
) -> Fit:
    """eigh of Xc Xc^T built panel by panel, then components = (U / s)^T Xc.

    The first pass reads the raw rows for the column statistics and keeps the first panel's
    rows, so that panel is not read twice (with one panel, the data is read once for the Gram
    matrix and the components). `scaling` turns the statistics into the affine parameters of
    `centre` (and sets the estimator's scaling attributes).
    """
    n, d = X.shape
    steps, panels = gram_plan(chunk_bounds(X), d, batch_size)
    pa, pb = panels[0]
    panel = np.empty((pb - pa, d), np.float32)
    stats = RunningStats(d)
    for a, b, block in stream(X, steps, "statistics + first panel read"):
        stats.add(block)
        if b <= pb:
            panel[a:b] = block
    affine = scaling(stats.result())
    centre(panel, affine, out=panel)
    Xc = lazy_rows(X, affine)
    gram = np.empty((n, n))
    for pa, pb in panels:
        if pa > 0:
            del panel
            panel = np.empty((pb - pa, d), np.float32)
            for a, b, block in stream(Xc, [s for s in steps if pa <= s[0] < pb], "panel read"):
                panel[a - pa : b - pa] = block
        with timed("panel product"):  # (OpenBLAS's syrk, half the multiply-adds, was no faster)
            gram[pa:pb, pa:pb] = panel @ panel.T
        for a, b, block in stream(Xc, [s for s in steps if s[0] >= pb], "cross products"):
            cross = panel @ block.T
            gram[pa:pb, a:b] = cross
            gram[a:b, pa:pb] = cross.T
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
    weights = (eigvecs[:, :k] * inverse).astype(np.float32)
    components = np.zeros((k, d), np.float32, order="F")
    with timed("components from the last panel"):
        add_wt_x(components, weights[pa:pb], panel)  # the last panel is still in memory
    del panel
    for a, b, block in stream(Xc, [s for s in steps if s[0] < pa], "components"):
        add_wt_x(components, weights[a:b], block)
    flip_signs(components)
    return Fit(explained, total_variance, components)
