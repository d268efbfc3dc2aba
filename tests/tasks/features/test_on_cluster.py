"""The worker side of cluster extraction, called in this process: backbone cache, weights
check, and the idempotent unit task (a rerun after a worker loss writes nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.data.scan import scan
from tasks.errors import UserError
from tasks.features import on_cluster
from tasks.features.extract import (
    ExtractSettings,
    extract,
    plan_extraction,
    plan_units,
    resolve_backbone,
)
from tasks.features.store import FeatureStore
from tests.floats import assert_features_close

SMALL = ExtractSettings(
    backbone="vgg16",
    weights="none",
    layers=("block1_pool",),
    image_size=32,
    batch_size=4,
    chunk_mb=0.1,
)


def test_backbone_built_once_per_settings_and_weights_checked() -> None:
    identity = resolve_backbone(SMALL)[1].identity
    first = on_cluster.worker_backbone(SMALL, ["block1_pool"], identity, threads=1)
    again = on_cluster.worker_backbone(SMALL, ["block1_pool"], identity, threads=1)
    assert again is first and first.widths == [16 * 16 * 64]
    other = SMALL.model_copy(update={"image_size": 48})
    assert on_cluster.worker_backbone(other, ["block1_pool"], identity, 1) is not first
    assert len(on_cluster._BACKBONES) == 1  # one backbone per worker: the old one is dropped
    with pytest.raises(UserError, match="not the client's"):
        on_cluster.worker_backbone(SMALL, ["block2_pool"], "another-weights-file", 1)


def test_unit_task_fills_its_chunks_and_a_rerun_writes_nothing(
    image_tree: Path, tmp_path: Path
) -> None:
    manifest = scan(image_tree)
    reference = FeatureStore(str(tmp_path / "reference"))
    key = extract(manifest, reference, SMALL).feature_keys["block1_pool"]

    store = FeatureStore(str(tmp_path / "store"))
    plan = plan_extraction(manifest, SMALL)
    chunk_bytes = int(SMALL.chunk_mb * (1 << 20))
    array = store.create_feature_array(key, 24, 16 * 16 * 64, "float32", {}, chunk_bytes)
    units = plan_units(manifest, store, plan, [array], ["block1_pool"])
    assert len(units) == array.n_chunks > 1
    args = (store.location, SMALL, plan.weights.identity, ["block1_pool"], {"block1_pool": key})
    computed = [on_cluster.extract_unit(unit, *args, host_workers={}) for unit in units]
    assert computed == [len(unit.rows) for unit in units]
    assert_features_close(array.data[...], reference.feature_array(key).data[...])  # per unit

    builds = sum(on_cluster.BUILDS.values())
    array.data[units[0].start : units[0].stop] = 0  # a rerun would overwrite this
    assert on_cluster.extract_unit(units[0], *args, host_workers={}) == 0
    assert not array.data[units[0].start : units[0].stop].any()  # nothing written
    assert sum(on_cluster.BUILDS.values()) == builds
