"""Reduce stage over a real store: fixed component counts, and a grown dataset updates an
incremental PCA fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from tasks.classify.streamed import DEFAULT_OPTIONS, stored_rows
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tasks.reduce.plan import MemoryPlanError
from tasks.reduce.stage import (
    PcaSettings,
    cached_reduction,
    load_projected,
    planned,
    projected_chunks,
    reduce_cached,
)
from tests.conftest import write_image

SETTINGS = ExtractSettings(
    backbone="vgg16", weights="none", layers=("block2_pool",), image_size=32, pooling="avg"
)


def _tree(root: Path, per_class: int, start: int = 0) -> None:
    for label, tint in (("a", 0), ("b", 120)):
        for i in range(start, start + per_class):
            write_image(root / "train" / label / f"{i}.png", seed=i + tint, tint=tint)
        for i in range(4):
            write_image(root / "test" / label / f"t{i}.png", seed=900 + i + tint, tint=tint)


INCREMENTAL = PcaSettings(method="incremental", variance=0.9)


def _reduce(root: Path, store: FeatureStore, pca: PcaSettings = INCREMENTAL):
    manifest = scan(root)
    key = extract(manifest, store, SETTINGS).feature_keys["block2_pool"]
    train, _ = split_rows(manifest, "folder")
    return reduce_cached(store, key, train, pca)


def test_fixed_component_count_and_too_many_components(tmp_path: Path) -> None:
    data, store = tmp_path / "images", FeatureStore(str(tmp_path / "store"))
    _tree(data, per_class=6)  # 12 training rows: PCA gives at most 11 components
    by_variance = _reduce(data, store, PcaSettings(method="gram", variance=0.9))
    fixed = _reduce(data, store, PcaSettings(method="gram", variance=0.9, components=11))
    assert fixed.n_components == 11 and fixed.key != by_variance.key
    assert store.load_reduction(fixed.key)[0]["projected"].shape == (20, 11)
    assert dict(store.reductions())[fixed.key]["variance"] is None  # the count decided the cut
    with pytest.raises(
        UserError,
        match=r"--components 12 is more than PCA can give here: "
        r"at most 11 \(12 training images - 1, 128 features\)",
    ):
        _reduce(data, store, PcaSettings(method="gram", variance=0.9, components=12))


def test_grown_dataset_updates_the_incremental_fit(tmp_path: Path) -> None:
    data, store = tmp_path / "images", FeatureStore(str(tmp_path / "store"))
    _tree(data, per_class=10)
    first = _reduce(data, store)
    _tree(data, per_class=3, start=10)  # a scheduled run finds 6 new training images
    grown = _reduce(data, store)
    attrs = dict(store.reductions())[grown.key]
    assert attrs["updated_from"] == first.key and attrs["rows_added"] == 6

    fresh = _reduce(data, FeatureStore(str(tmp_path / "fresh")))
    assert "updated_from" not in dict(FeatureStore(str(tmp_path / "fresh")).reductions())[fresh.key]
    assert abs(grown.n_components - fresh.n_components) <= 1
    assert abs(grown.explained_variance - fresh.explained_variance) < 1e-3
    updated = store.load_reduction(grown.key)[0]["projected"]
    refit = FeatureStore(str(tmp_path / "fresh")).load_reduction(fresh.key)[0]["projected"]
    k = min(updated.shape[1], refit.shape[1], 3)  # leading components agree up to sign
    np.testing.assert_allclose(np.abs(updated[:, :k]), np.abs(refit[:, :k]), atol=1e-3)


def test_auto_finds_the_reduction_gram_made_under_the_same_key(tmp_path: Path) -> None:
    """Where auto chooses gram, a reduction stored with --pca-method gram keeps its key."""
    data, store = tmp_path / "images", FeatureStore(str(tmp_path / "store"))
    _tree(data, per_class=6)
    gram = _reduce(data, store, PcaSettings(method="gram", variance=0.9))
    manifest = scan(data)
    train, _ = split_rows(manifest, "folder")
    found = cached_reduction(store, gram.feature_key, train, PcaSettings(variance=0.9))
    assert found is not None and found.key == gram.key and found.method == "gram"
    auto = _reduce(data, store, PcaSettings(variance=0.9))
    assert auto.cached and auto.key == gram.key


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, str]:
    """80,000 x 200,704 float32 features (60 GB as numbers) that exist only as metadata and
    done flags: nothing may read or allocate them."""
    store = FeatureStore(str(tmp_path_factory.mktemp("huge") / "store"))
    array = store.create_feature_array("huge", 80_000, 200_704, "float32", {}, 2**30)
    array.group["done"][:] = True
    return store, "huge"


def test_a_reduction_that_cannot_fit_stops_before_reading(huge) -> None:
    store, key = huge
    train = np.arange(60_000)
    with pytest.raises(MemoryPlanError, match=r"^PCA of 60,000 x 200,704 training rows at 20,0"):
        reduce_cached(store, key, train, PcaSettings(components=20_000, memory_limit=24))
    assert not list(store.reductions())


def test_the_plan_picks_what_fits_for_60000_block3_rows(huge) -> None:
    store, key = huge
    train = np.arange(60_000)
    fixed = planned(store, key, train, PcaSettings(components=500, memory_limit=24))
    assert fixed[0].method == "incremental" and fixed[1].fits
    big = planned(store, key, train, PcaSettings(components=500, memory_limit=200))
    assert "gram" in big[1].fitting and big[0].method == "incremental"  # gram's eigh: hours
    small = planned(store, key, np.arange(1_000), PcaSettings(memory_limit=24))
    assert small[0].method == "gram" and small[1].peak < 24 * 2**30


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, str]:
    """30,000 x 25,088 (block5_pool wide, n >= d: PCA by the (d, d) covariance) as metadata
    and done flags only."""
    store = FeatureStore(str(tmp_path_factory.mktemp("wide") / "store"))
    array = store.create_feature_array("wide", 30_000, 25_088, "float32", {}, 2**30)
    array.group["done"][:] = True
    return store, "wide"


def test_workers_too_small_for_the_covariance_get_another_method_or_a_stop(wide) -> None:
    """The workers' memory_limit, as their scheduler reports it, decides with the plan."""
    store, key = wide
    train = np.arange(30_000)
    fixed = PcaSettings(components=200, memory_limit=64)
    alone = planned(store, key, train, fixed)
    assert "gram" in alone[1].fitting and alone[1].workers is None  # no client: as before
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            memory_limit="4GiB",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster),
    ):
        settings, chosen, _ = planned(store, key, train, fixed)
        assert chosen.workers.limit == 4 * 2**30 and chosen.workers.count == 2
        assert "gram" not in chosen.fitting and chosen.worker_peak <= 4 * 2**30
        with pytest.raises(MemoryPlanError, match=r"more than the 4\.0 GiB per worker"):
            reduce_cached(store, key, train, fixed.model_copy(update={"method": "gram"}))
    assert not list(store.reductions())


def test_projected_rows_are_stored_in_chunks_of_whole_rows(tmp_path: Path) -> None:
    """Chunks hold every component of their rows, one streamed-classifier slice of them: a
    pass of tasks/classify/streamed.py decompresses each chunk once."""
    store = FeatureStore(str(tmp_path / "store"))
    features = store.create_feature_array("synthetic", 12_000, 400, "float32", {}, 2**20)
    rng = np.random.default_rng(0)
    for index in range(features.n_chunks):
        rows = features.chunk_slice(index)
        features.write_chunk(index, rng.random((rows.stop - rows.start, 400), np.float32))
    pca = PcaSettings(method="gram", components=300)
    outcome = reduce_cached(store, "synthetic", np.arange(4_000), pca)
    array = store.root[f"reduced/{outcome.key}/projected"]
    rows, columns = array.chunks
    assert array.shape == (12_000, 300) and columns == 300  # all components in every chunk
    assert (rows, columns) == projected_chunks(12_000, 300) and rows < 12_000
    source = stored_rows(store, outcome.key, np.arange(12_000))
    assert source.slice_rows(DEFAULT_OPTIONS["buffer_mib"]) % rows == 0  # whole chunks a slice
    np.testing.assert_array_equal(load_projected(store, outcome.key)[0], array[...])
