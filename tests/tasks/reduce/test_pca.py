"""ScaledPCA vs in-memory MinMaxScaler + PCA(svd_solver="full") on a real Zarr array on disk.

Data: 1000 x 3000 float32 ReLU features (low rank + noise, ~60% zeros, one constant column)
in three classes, chunks of 32 rows; fits use the 600 train rows only, selected by index
like the pipeline does (so the Dask chunks are irregular).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from scipy.linalg import subspace_angles
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.preprocessing import MinMaxScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from tasks.cluster import dask_client
from tasks.reduce._gram import gram_plan
from tasks.reduce._stream import chunk_bounds
from tasks.reduce.pca import ScaledIncrementalPCA, ScaledPCA


@dataclass
class Data:
    X: da.Array  # all rows, from Zarr
    train: np.ndarray
    test: np.ndarray
    y: np.ndarray
    raw: np.ndarray  # the same rows in memory, for the reference only
    scaler: MinMaxScaler
    pca: PCA
    accuracy: float

    def ref_transform(self, rows: np.ndarray) -> np.ndarray:
        return self.pca.transform(self.scaler.transform(self.raw[rows]))


def _features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rank = 30
    y = rng.integers(0, 3, n)
    latent = rng.standard_normal((n, rank)) + 0.35 * rng.standard_normal((3, rank))[y]
    latent *= np.arange(1, rank + 1) ** -0.7
    X = latent @ rng.standard_normal((rank, d)) + 0.3 * rng.standard_normal((n, d))
    X = np.maximum(X + rng.normal(-0.3, 0.3, d), 0) * rng.gamma(2.0, 2.0, d)
    X[:, 5] = 2.5  # constant column: MinMaxScaler's range 1
    return X.astype(np.float32), y


def _zarr(path: Path, X: np.ndarray, chunk: int = 32) -> da.Array:
    array = zarr.create_array(str(path), shape=X.shape, chunks=(chunk, X.shape[1]), dtype=X.dtype)
    array[...] = X
    return da.from_zarr(str(path))


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """The sklearn reference PCA took 4.4 s with 2 BLAS threads on 2 shared cores, 0.2 s with 1."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    raw, y = _features(1000, 3000, seed=7)
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(len(raw), 600, replace=False))
    test = np.setdiff1d(np.arange(len(raw)), train)
    scaler = MinMaxScaler().fit(raw[train])
    pca = PCA(n_components=0.8, svd_solver="full").fit(scaler.transform(raw[train]))
    svc = SVC().fit(pca.transform(scaler.transform(raw[train])), y[train])
    accuracy = svc.score(pca.transform(scaler.transform(raw[test])), y[test])
    X = _zarr(tmp_path_factory.mktemp("features") / "x.zarr", raw)
    return Data(X, train, test, y, raw, scaler, pca, accuracy)


def _svc_accuracy(est: ScaledPCA, data: Data) -> float:
    train, test = dask.compute(est.transform(data.X[data.train]), est.transform(data.X[data.test]))
    return SVC().fit(train, data.y[data.train]).score(test, data.y[data.test])


def _estimator(method: str, **params) -> ScaledPCA | ScaledIncrementalPCA:
    if method == "incremental":
        return ScaledIncrementalPCA(**params)
    return ScaledPCA(method=method, **params)


def _max_angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(subspace_angles(a.T.astype(np.float64), b.T.astype(np.float64)).max())


@pytest.fixture(scope="module")
def gram(data: Data) -> ScaledPCA:
    return ScaledPCA(method="gram", batch_size=100).fit(data.X[data.train])


def test_gram_matches_sklearn(gram: ScaledPCA, data: Data) -> None:
    """Exact method, several panels (batch_size 100 < 600 rows): equal to sklearn."""
    ref, k = data.pca, data.pca.n_components_
    assert data.X[data.train].numblocks[0] > 6 and 10 < k < 100
    assert gram.solver_ == "gram" and gram.n_components_ == k
    np.testing.assert_array_equal(gram.data_min_, data.scaler.data_min_)
    np.testing.assert_array_equal(gram.data_max_, data.scaler.data_max_)
    np.testing.assert_allclose(gram.mean_, ref.mean_, atol=1e-6)
    np.testing.assert_allclose(
        gram.explained_variance_ratio_, ref.explained_variance_ratio_, atol=1e-5
    )
    np.testing.assert_allclose(gram.explained_variance_, ref.explained_variance_, rtol=1e-4)
    assert gram.cumulative_variance_ratio_[-1] == pytest.approx(1.0, abs=1e-6)
    assert _max_angle(gram.components_, ref.components_) < 1e-3
    np.testing.assert_allclose(np.linalg.norm(gram.components_, axis=1), 1.0, atol=1e-4)
    got = gram.transform(data.X[data.test])
    assert got.dtype == np.float32 and got.chunks[0] == data.X[data.test].chunks[0]
    expected = data.ref_transform(data.test)
    np.testing.assert_allclose(got.compute(), expected, atol=1e-3 * np.abs(expected).max())
    assert abs(_svc_accuracy(gram, data) - data.accuracy) <= 0.005


def test_covariance_side_matches_sklearn(data: Data, tmp_path: Path) -> None:
    """Narrow rows (d = 200 <= n = 600): the exact method solves the (d, d) covariance and
    agrees with sklearn as closely as the Gram side does on wide rows."""
    narrow = np.ascontiguousarray(data.raw[data.train][:, :200])
    X = _zarr(tmp_path / "narrow.zarr", narrow)
    est = ScaledPCA().fit(X)
    scaler = MinMaxScaler().fit(narrow)
    scaled = scaler.transform(narrow)
    ref = PCA(n_components=0.8, svd_solver="full").fit(scaled)
    assert est.solver_ == "covariance" and est.n_components_ == ref.n_components_ > 10
    np.testing.assert_allclose(est.mean_, ref.mean_, atol=1e-6)
    np.testing.assert_allclose(
        est.explained_variance_ratio_, ref.explained_variance_ratio_, atol=1e-5
    )
    np.testing.assert_allclose(est.explained_variance_, ref.explained_variance_, rtol=1e-4)
    assert est.cumulative_variance_ratio_[-1] == pytest.approx(1.0, abs=1e-6)
    assert _max_angle(est.components_, ref.components_) < 1e-3
    expected = ref.transform(scaled)
    np.testing.assert_allclose(est.project(X), expected, atol=1e-3 * np.abs(expected).max())
    for target in (0.3, 0.55, 0.9):  # the cut rule on the covariance spectrum
        expected_k = PCA(target, svd_solver="full").fit(scaled).n_components_
        assert ScaledPCA(variance=target).fit(X).n_components_ == expected_k


def test_gram_panel_plan(data: Data) -> None:
    """batch_size 100 really splits the 600 train rows into panels of whole steps (chunks);
    block3_pool rows get ~1 GiB panels."""
    steps, panels = gram_plan(chunk_bounds(data.X[data.train]), 3000, 100)
    assert len(panels) >= 6 and max(b - a for a, b in panels) <= 100
    assert panels[0][0] == 0 and panels[-1][1] == 600
    assert all(any(a <= s0 and s1 <= b for a, b in panels) for s0, s1 in steps)
    assert len(gram_plan(chunk_bounds(data.X[data.train]), 3000, None)[1]) == 1
    steps, panels = gram_plan(list(range(0, 3201, 32)), 200704, None)
    assert len(panels) == 3 and all(b - a == 32 for a, b in steps)


def test_gram_single_panel_and_cut_rule(gram: ScaledPCA, data: Data) -> None:
    """Default panel (all rows at once) gives the same fit; the variance cut is sklearn's."""
    one = ScaledPCA().fit(data.X[data.train])
    assert one.method_ == "gram" and one.n_components_ == gram.n_components_
    np.testing.assert_allclose(one.components_, gram.components_, atol=1e-5)
    scaled = data.scaler.transform(data.raw[data.train])
    for target in (0.3, 0.55, 0.9):
        expected = PCA(target, svd_solver="full").fit(scaled).n_components_
        assert ScaledPCA(variance=target).fit(data.X[data.train]).n_components_ == expected
    assert ScaledPCA(n_components=7).fit(data.X[data.train]).n_components_ == 7


@pytest.mark.parametrize("method", ["randomized", "incremental"])
def test_approximate_methods_match_sklearn(method: str, data: Data) -> None:
    """Non-exact methods: n_components within 1, EVR within 1e-3, same downstream accuracy."""
    ref, k = data.pca, data.pca.n_components_
    est = _estimator(method, batch_size=128).fit(data.X[data.train])
    assert est.method_ == method and abs(est.n_components_ - k) <= 1
    m = min(k, est.n_components_)
    np.testing.assert_allclose(
        est.explained_variance_ratio_[:m], ref.explained_variance_ratio_[:m], atol=1e-3
    )
    # the leading directions are well separated: they must agree closely
    assert _max_angle(est.components_[:10], ref.components_[:10]) < 1e-2
    assert abs(_svc_accuracy(est, data) - data.accuracy) <= 0.005


def test_randomized_grows_its_sketch_to_reach_the_cut(data: Data) -> None:
    """0.95 needs ~245 components, more than the first sketch (192 wide) holds: it must grow."""
    scaled = data.scaler.transform(data.raw[data.train])
    ref = PCA(0.95, svd_solver="full").fit(scaled)
    est = ScaledPCA(variance=0.95, method="randomized").fit(data.X[data.train])
    assert ref.n_components_ > 192 and abs(est.n_components_ - ref.n_components_) <= 1
    assert len(est.cumulative_variance_ratio_) > est.n_components_
    m = min(est.n_components_, ref.n_components_)
    np.testing.assert_allclose(
        est.explained_variance_ratio_[:m], ref.explained_variance_ratio_[:m], atol=1e-3
    )


def test_incremental_grows_its_batch_to_meet_the_variance_target(
    data: Data, caplog: pytest.LogCaptureFixture
) -> None:
    """0.97 needs more components than the default 256 directions kept: the fit doubles its
    batch until the kept directions reach the target; a fixed batch_size says what it reached."""
    X = data.X[data.train]
    scaled = data.scaler.transform(data.raw[data.train])
    ref = PCA(0.97, svd_solver="full").fit(scaled)
    assert ref.n_components_ > 256
    with caplog.at_level("INFO", logger="featurepipe.reduce"):
        est = ScaledIncrementalPCA(variance=0.97).fit(X)
    assert "fitting again with batch 512" in caplog.text
    assert est.explained_variance_ratio_.sum() >= 0.97
    assert abs(est.n_components_ - ref.n_components_) <= 1
    with pytest.warns(RuntimeWarning, match=r"keeping 256, which explain 0\.9[0-6]\d+ of the var"):
        short = ScaledIncrementalPCA(variance=0.97, batch_size=256).fit(X)
    assert short.n_components_ == 256 and short.explained_variance_ratio_.sum() < 0.97


def test_growth_stops_at_the_memory_plans_cap_and_says_what_it_reached(data: Data) -> None:
    """0.97 needs ~300 components: capped at a 256-row batch or a 200-wide sketch (the largest
    the memory plan lets fit), each fit keeps what it has and says so in one line."""
    X = data.X[data.train]
    with pytest.warns(RuntimeWarning, match=r"keeping 256, .* the largest batch that fits"):
        batch = ScaledIncrementalPCA(variance=0.97, max_batch=256).fit(X)
    assert batch.n_components_ == 256 and batch.explained_variance_ratio_.sum() < 0.97
    with pytest.warns(RuntimeWarning, match=r"keeping 200, which explain 0\.9[0-6]"):
        sketch = ScaledPCA(method="randomized", variance=0.97, max_width=200).fit(X)
    assert sketch.n_components_ == 200


def _halves(data: Data) -> tuple[np.ndarray, np.ndarray]:
    """Two train halves with different column ranges, so the second call widens min/max."""
    order = np.argsort(data.raw[data.train].sum(axis=1))
    half = len(order) // 2
    return np.sort(data.train[order[:half]]), np.sort(data.train[order[half:]])


def test_partial_fit_twice_is_exact_without_truncation(data: Data) -> None:
    """With batch_size >= rows nothing is truncated: two calls == sklearn on all train rows,
    which checks the min-max rescaling of the retained basis exactly."""
    low, high = _halves(data)
    est = ScaledIncrementalPCA(batch_size=600)
    est.partial_fit(data.X[low])
    assert est.n_samples_seen_ == len(low)
    assert np.any(est.data_max_ < data.scaler.data_max_)  # the second half widens the range
    est.partial_fit(data.X[high])
    ref = data.pca
    assert est.n_samples_seen_ == 600 and est.n_components_ == ref.n_components_
    np.testing.assert_array_equal(est.data_max_, data.scaler.data_max_)
    np.testing.assert_allclose(est.mean_, ref.mean_, atol=1e-6)
    np.testing.assert_allclose(
        est.explained_variance_ratio_, ref.explained_variance_ratio_, atol=1e-5
    )
    assert _max_angle(est.components_, ref.components_) < 1e-3


def test_partial_fit_twice_close_to_fit(data: Data) -> None:
    """With truncation (keep 128 of up to 599 directions) two calls vs one fit on the
    concatenation: same scaling, mean and total variance exactly; EVR within 1e-4 and the
    top-10 subspace within 0.01 rad (measured 3e-6 and 1.4e-3; the documented tolerance)."""
    low, high = _halves(data)
    both = np.concatenate([low, high])
    twice = ScaledIncrementalPCA(batch_size=128)
    twice.partial_fit(data.X[low]).partial_fit(data.X[high])
    once = ScaledIncrementalPCA(batch_size=128).fit(data.X[both])
    np.testing.assert_array_equal(twice.data_min_, once.data_min_)
    np.testing.assert_array_equal(twice.data_max_, once.data_max_)
    np.testing.assert_allclose(twice.mean_, once.mean_, atol=1e-9)
    assert twice.total_variance_ == pytest.approx(once.total_variance_, rel=1e-9)
    assert abs(twice.n_components_ - once.n_components_) <= 1
    m = min(twice.n_components_, once.n_components_)
    np.testing.assert_allclose(
        twice.explained_variance_ratio_[:m], once.explained_variance_ratio_[:m], atol=1e-4
    )
    assert _max_angle(twice.components_[:10], once.components_[:10]) < 1e-2


@pytest.mark.parametrize("method", ["gram", "incremental"])
def test_state_round_trip_through_zarr(method: str, data: Data, tmp_path: Path) -> None:
    est = _estimator(method, batch_size=128).fit(data.X[data.train[:400]])
    arrays, attrs = est.to_state()
    group = zarr.open_group(str(tmp_path / "state.zarr"), mode="w")
    for name, value in arrays.items():
        group.create_array(name, data=value)
    group.attrs.update(attrs)

    stored = zarr.open_group(str(tmp_path / "state.zarr"), mode="r")
    back = ScaledPCA.from_state({name: stored[name] for name in arrays}, dict(stored.attrs))
    assert type(back) is type(est) and back.get_params() == est.get_params()
    for name in ("n_components_", "n_samples_seen_", "method_", "total_variance_"):
        assert getattr(back, name) == getattr(est, name)
    for name in (
        "data_min_",
        "data_max_",
        "mean_",
        "components_",
        "explained_variance_ratio_",
        "cumulative_variance_ratio_",
    ):
        np.testing.assert_array_equal(getattr(back, name), getattr(est, name))
    rows = data.X[data.test]
    np.testing.assert_array_equal(back.transform(rows).compute(), est.transform(rows).compute())
    if method == "incremental":  # a restored fit resumes exactly like the original
        more = data.X[data.train[400:]]
        np.testing.assert_array_equal(
            back.partial_fit(more).components_, est.partial_fit(more).components_
        )


def test_states_stored_before_the_estimator_split_still_load(data: Data) -> None:
    """Reductions stored when one ScaledPCA carried every method (params with `method` and
    `random_state`) load as the estimator that fits that method."""
    est = ScaledIncrementalPCA(batch_size=128).fit(data.X[data.train[:400]])
    arrays, attrs = est.to_state()
    old = attrs | {"params": attrs["params"] | {"method": "incremental", "random_state": 0}}
    back = ScaledPCA.from_state(arrays, old)
    assert isinstance(back, ScaledIncrementalPCA) and back.get_params() == est.get_params()
    np.testing.assert_array_equal(back.components_, est.components_)


@pytest.mark.parametrize("method", ["gram", "randomized", "incremental"])
def test_estimators_are_shaped_like_sklearn(method: str, data: Data) -> None:
    """Constructors only store parameters (clone works), fit takes y and returns self,
    learned state appears only after fit."""
    est = _estimator(method, n_components=5)
    assert not any(name.endswith("_") for name in vars(est))
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    assert est.fit(data.X[data.train], data.y[data.train]) is est
    assert est.n_components_ == 5 and est.components_.shape == (5, 3000)
    assert not hasattr(copy, "components_")


@pytest.mark.slow
def test_under_local_cluster_with_two_processes(gram: ScaledPCA, data: Data) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dask_client(workers=2, threads_per_worker=1) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            est = ScaledPCA(method="gram", batch_size=100).fit(data.X[data.train])
            projected = est.transform(data.X[data.test]).compute()
            streamed = est.project(data.X[data.test])  # the components stay in this process
    assert not [w for w in caught if "already in use" in str(w.message)]  # no port clashes
    assert not [w for w in caught if "large graph" in str(w.message)]
    assert est.n_components_ == gram.n_components_
    np.testing.assert_allclose(est.components_, gram.components_, atol=1e-5)
    np.testing.assert_allclose(projected, gram.transform(data.X[data.test]).compute(), atol=1e-4)
    assert streamed.dtype == np.float32
    np.testing.assert_allclose(streamed, projected, rtol=1e-5, atol=1e-5)


def test_float16_features(data: Data, tmp_path: Path) -> None:
    half = data.raw[data.train].astype(np.float16)
    X = _zarr(tmp_path / "half.zarr", half)
    est = ScaledPCA().fit(X)
    scaled = MinMaxScaler().fit_transform(half.astype(np.float32))
    ref = PCA(0.8, svd_solver="full").fit(scaled)
    assert est.n_components_ == ref.n_components_
    assert est.transform(X).dtype == np.float32
    assert _max_angle(est.components_, ref.components_) < 1e-3


def test_errors(data: Data) -> None:
    X = data.X[data.train]
    assert not hasattr(ScaledPCA(), "partial_fit")  # only the incremental estimator updates
    with pytest.raises(ValueError, match="not fitted"):
        ScaledPCA().transform(X)
    with pytest.raises(ValueError, match="method must be one of"):
        ScaledPCA(method="tsqr").fit(X)
    with pytest.raises(ValueError, match="method must be one of"):
        ScaledPCA(method="incremental").fit(X)
    with pytest.raises(ValueError, match="variance"):
        ScaledPCA(variance=1.5).fit(X)
    with pytest.raises(ValueError, match="batch_size must be >= n_components"):
        ScaledIncrementalPCA(n_components=50, batch_size=20).fit(X)
    with pytest.raises(TypeError):
        ScaledPCA().fit(np.asarray(X))
    with pytest.warns(RuntimeWarning, match="fewer than"):  # keeps 20 < the 0.8 cut
        assert ScaledIncrementalPCA(batch_size=20).fit(X).n_components_ == 20
