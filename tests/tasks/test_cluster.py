"""Scaling out: extraction over a real Dask LocalCluster, and the store on a real S3 API."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from distributed import get_task_stream

from tasks.cluster import dask_client
from tasks.data.scan import scan
from tasks.features import on_cluster
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tests.conftest import write_image
from tests.floats import assert_features_close
from tests.s3 import s3_endpoint  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

SETTINGS = ExtractSettings(
    backbone="vgg16",
    weights="none",
    layers=("block1_pool", "block2_pool"),
    image_size=32,
    batch_size=4,
    chunk_mb=0.1,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "images"
    for i in range(40):
        write_image(root / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    return root


def test_two_workers_produce_the_same_store_as_one(images: Path, tmp_path: Path) -> None:
    manifest = scan(images)
    single = FeatureStore(str(tmp_path / "one"))
    keys = extract(manifest, single, SETTINGS).feature_keys
    double = FeatureStore(str(tmp_path / "two"))
    seen: list[tuple[int, int]] = []
    with (
        dask_client(workers=2, threads_per_worker=1) as client,
        get_task_stream(client) as stream,
    ):
        on_cluster.warm_workers(client, SETTINGS)  # what the units build, built ahead
        warmed = client.run(lambda: sum(on_cluster.BUILDS.values()))
        result = extract(manifest, double, SETTINGS, lambda *p: seen.append(p), client=client)
        builds = client.run(lambda: sum(on_cluster.BUILDS.values()))
    assert result.images_computed == 40 and result.feature_keys == keys
    # one task per unit of whole chunks (not one per worker), spread by the scheduler; each
    # worker kept the backbone it warmed up with for all its tasks; progress moved once per
    # finished unit
    tasks = Counter(t["worker"] for t in stream.data if t["key"].startswith("extract-unit"))
    units = min(double.feature_array(key).n_chunks for key in keys.values())  # widest chunks
    assert sum(tasks.values()) == units > 2 and len(tasks) == 2
    assert list(warmed.values()) == [1, 1] and list(builds.values()) == [1, 1]
    assert len(seen) == units and seen[-1] == (40, 40)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})
    for key in keys.values():
        assert double.feature_array(key).complete
        double_features = double.feature_array(key).data[...]
        assert_features_close(double_features, single.feature_array(key).data[...])


@pytest.mark.usefixtures("s3_endpoint")
def test_store_on_s3_matches_local(images: Path, tmp_path: Path) -> None:
    manifest = scan(images)
    local = FeatureStore(str(tmp_path / "local"))
    keys = extract(manifest, local, SETTINGS).feature_keys
    remote = FeatureStore("s3://features/store")
    first = extract(manifest, remote, SETTINGS)
    assert first.images_computed == 40
    again = extract(manifest, FeatureStore("s3://features/store"), SETTINGS)
    assert again.images_computed == 0
    for key in keys.values():
        array = remote.feature_array(key)
        assert array.verify() == []
        np.testing.assert_array_equal(array.data[...], local.feature_array(key).data[...])
    assert remote.load_manifest(manifest.key).key == manifest.key
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
