"""Reduce stage over a real store: fixed component counts, and a grown dataset updates an
incremental PCA fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tasks.reduce.stage import PcaSettings, reduce_cached
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
