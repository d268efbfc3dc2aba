"""Where PCA passes run: as task graphs next to the data (`OnWorkers`) they give the same fit
and projection as in this process (`Here`), and on a cluster no pass sends raw row blocks to
the client (measured from the bytes each pass logs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from tasks.cluster import dask_client
from tasks.reduce import _stream
from tasks.reduce._passes import OnWorkers, active, use
from tasks.reduce._progress import reporting
from tasks.reduce._randomized import POWER_ITERATIONS
from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA
from tests.tasks.reduce.test_pca import _features, _zarr

# (name, estimator, columns): gram in several panels, the covariance side on narrow rows
FITS = [
    ("gram", lambda: ScaledPCA(method="gram", batch_size=100), 3000),
    ("covariance", lambda: ScaledPCA(), 100),
    ("randomized", lambda: ScaledPCA(method="randomized"), 3000),
    ("incremental", lambda: ScaledIncrementalPCA(batch_size=128), 3000),
]


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module", autouse=True)
def _small_steps() -> Iterator[None]:
    """Steps of 3 chunks (96 rows), so every pass has several steps (folds merge in a tree,
    an odd count included) and gram's cross products span several blocks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_stream, "STEP_BYTES", 96 * 3000 * 4)
        yield


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[da.Array, np.ndarray]:
    """All 800 rows from Zarr, and 500 training rows picked by index (irregular chunks)."""
    raw, _ = _features(800, 3000, seed=3)
    X = _zarr(tmp_path_factory.mktemp("passes") / "x.zarr", raw)
    train = np.sort(np.random.default_rng(1).choice(len(raw), 500, replace=False))
    return X, train


def _fit_all(X: da.Array, train: np.ndarray) -> dict[str, tuple]:
    out = {}
    for name, make, columns in FITS:
        est = make().fit(X[train][:, :columns])
        out[name] = est, est.project(X[:, :columns])
    return out


def _assert_same(ours: dict[str, tuple], theirs: dict[str, tuple]) -> None:
    for name, (est, projected) in theirs.items():
        got, got_projected = ours[name]
        assert got.n_components_ == est.n_components_, name
        np.testing.assert_allclose(got.mean_, est.mean_, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(
            got.explained_variance_, est.explained_variance_, rtol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(got.components_, est.components_, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_projected, projected, atol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def here(rows: tuple[da.Array, np.ndarray]) -> dict[str, tuple]:
    with use("here"):
        return _fit_all(*rows)


def test_passes_as_task_graphs_equal_passes_here(
    rows: tuple[da.Array, np.ndarray], here: dict[str, tuple]
) -> None:
    """Without a cluster, the graph form of every pass (on Dask's threads) fits the same."""
    with use("workers"):
        assert isinstance(active(), OnWorkers) and active().client is None
        on_threads = _fit_all(*rows)
    _assert_same(on_threads, here)


def test_steps_must_be_contiguous(rows: tuple[da.Array, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        OnWorkers(None)._blocks(rows[0], [(0, 10), (20, 30)])


@pytest.mark.slow
def test_on_a_cluster_no_pass_sends_row_blocks_to_the_client(
    rows: tuple[da.Array, np.ndarray],
    here: dict[str, tuple],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Two worker processes: the passes run there (no backend choice made by the caller), the
    fits equal those made here, and every pass logs receiving at most half the bytes of the
    rows it covered (row blocks would be all of them: today's here-path under a cluster)."""
    reported: list[str] = []
    with (
        caplog.at_level(logging.DEBUG, logger="featurepipe.reduce"),
        dask_client(workers=2, threads_per_worker=1),
        reporting(lambda done, total, status: reported.append(status), 500, 1, 800),
    ):
        assert isinstance(active(), OnWorkers)
        on_cluster = _fit_all(*rows)
    _assert_same(on_cluster, here)
    # a fold's rows are counted as its leaves finish: several lines per power iteration
    assert sum("(power iteration)" in s for s in reported) > 2 * POWER_ITERATIONS
    passes = [r for r in caplog.records if getattr(r, "pca_data_bytes", 0) > 0]
    phases = {r.pca_phase for r in passes}
    assert {"cross products", "covariance products", "power iteration", "Ritz pass"} <= phases
    assert {"incremental batches", "components", "projection", "column statistics"} <= phases
    for record in passes:
        assert record.pca_client_bytes <= record.pca_data_bytes / 2, record.getMessage()
    received = sum(r.pca_client_bytes for r in passes)
    assert received < sum(r.pca_data_bytes for r in passes) / 5


def test_randomized_sends_the_client_nothing_that_grows_with_the_rows(
    rows: tuple[da.Array, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """As task graphs, every randomized pass returns one (w, d) sum and a scalar, for 200
    rows as for 800: the sketch's (n, w) rows never come to this process."""
    X, _ = rows
    received = {}
    for n in (200, 800):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="featurepipe.reduce"), use("workers"):
            ScaledPCA(method="randomized", n_components=20).fit(X[:n])
        passes = [r for r in caplog.records if r.pca_phase in ("power iteration", "Ritz pass")]
        assert len(passes) == 5
        received[n] = {r.pca_client_bytes for r in passes}
    width = 30  # sketch_width(20)
    assert received[200] == received[800] and max(received[800]) <= 4 * width * 3000 + 100
