"""Extraction into a real Zarr store: read-back, cache hits, one-pass multi-layer, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.registry import BackboneError, build_feature_model, get_spec, resolve_weights
from tasks.data.images import load_rgb
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract, plan_extraction
from tasks.features.store import FeatureStore
from tests.conftest import write_image
from tests.floats import assert_features_close

SMALL = ExtractSettings(
    backbone="vgg16",
    weights="none",
    layers=("block2_pool",),
    image_size=32,
    batch_size=4,
    chunk_mb=0.05,
)


def _features(store: FeatureStore, key: str) -> np.ndarray:
    return store.feature_array(key).data[...]


def test_features_equal_direct_model_output(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    store = FeatureStore(str(tmp_path / "store"))
    result = extract(manifest, store, SMALL)
    assert (result.images_computed, result.images_cached) == (24, 0)
    stored = _features(store, result.feature_keys["block2_pool"])
    assert stored.shape == (24, 8 * 8 * 128)
    assert store.feature_array(result.feature_keys["block2_pool"]).n_chunks > 1

    spec = get_spec("vgg16")
    model = build_feature_model(
        spec, resolve_weights(spec, "none"), 32, ["block2_pool"], precision=SMALL.precision
    )
    from keras.applications.vgg16 import preprocess_input

    images = np.stack([load_rgb(image_tree / r.path, 32) for r in manifest.records])
    direct = np.asarray(model.predict(preprocess_input(images), verbose=0)).reshape(24, -1)
    assert_features_close(stored, direct)  # model.predict batches them differently

    again = extract(manifest, store, SMALL)
    assert (again.images_computed, again.images_cached) == (0, 24)


def test_changed_image_or_setting_changes_key(image_tree: Path) -> None:
    before = plan_extraction(scan(image_tree), SMALL).key("block2_pool")
    bigger = ExtractSettings(**{**SMALL.__dict__, "image_size": 48})
    assert plan_extraction(scan(image_tree), bigger).key("block2_pool") != before
    write_image(image_tree / "cats" / "img_00.png", seed=12345)
    assert plan_extraction(scan(image_tree), SMALL).key("block2_pool") != before


def test_several_layers_in_one_pass_equal_single_layers(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    together = FeatureStore(str(tmp_path / "together"))
    both = ExtractSettings(**{**SMALL.__dict__, "layers": ("block1_pool", "block2_pool")})
    keys = extract(manifest, together, both).feature_keys
    for layer in ("block1_pool", "block2_pool"):
        alone = FeatureStore(str(tmp_path / layer))
        single = ExtractSettings(**{**SMALL.__dict__, "layers": (layer,)})
        key = extract(manifest, alone, single).feature_keys[layer]
        assert key == keys[layer]
        np.testing.assert_array_equal(_features(alone, key), _features(together, keys[layer]))


def test_pooling_and_unknown_layer(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    store = FeatureStore(str(tmp_path / "store"))
    pooled = ExtractSettings(**{**SMALL.__dict__, "pooling": "avg"})
    key = extract(manifest, store, pooled).feature_keys["block2_pool"]
    assert store.feature_array(key).data.shape == (24, 128)
    wrong = ExtractSettings(**{**SMALL.__dict__, "layers": ("block9_pool",)})
    with pytest.raises(BackboneError, match="block5_pool"):
        extract(manifest, store, wrong)


RESUME_SCRIPT = """
import sys
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
settings = ExtractSettings(backbone="vgg16", weights="none", layers=("block2_pool",),
                           image_size=32, batch_size=2, chunk_mb=0.2)
result = extract(scan(sys.argv[1]), FeatureStore(sys.argv[2]), settings,
                 on_wait=lambda: print("waited", flush=True))
print("computed", result.images_computed)
"""


def _run_extract(data: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(data), str(store)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_resume_after_kill_gives_identical_features(tmp_path: Path) -> None:
    data = tmp_path / "images"
    for i in range(96):
        write_image(data / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"
    process = _run_extract(data, killed_store)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and process.poll() is None:
        store = FeatureStore(str(killed_store))
        arrays = list(store.feature_arrays())
        done = int(arrays[0].done_flags().sum()) if arrays else 0
        if done >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the extraction finished before it was killed"
    array = next(FeatureStore(str(killed_store)).feature_arrays())
    assert 0 < array.done_flags().sum() < array.n_chunks

    manifest = scan(data)
    settings = ExtractSettings(
        backbone="vgg16",
        weights="none",
        layers=("block2_pool",),
        image_size=32,
        batch_size=2,
        chunk_mb=0.2,
    )
    resumed = extract(manifest, FeatureStore(str(killed_store)), settings)
    assert 0 < resumed.images_computed < 96
    assert _run_extract(data, clean_store).wait() == 0
    key = resumed.feature_keys["block2_pool"]
    assert_features_close(
        _features(FeatureStore(str(killed_store)), key),
        _features(FeatureStore(str(clean_store)), key),
    )


def test_verify_finds_deleted_chunk_and_repair_recomputes(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    store = FeatureStore(str(tmp_path / "store"))
    key = extract(manifest, store, SMALL).feature_keys["block2_pool"]
    expected = _features(store, key)
    array = store.feature_array(key)
    assert array.verify() == []
    (tmp_path / "store" / "features" / key / "x" / "c" / "1" / "0").unlink()
    problems = array.verify()
    assert [(p.chunk, p.kind) for p in problems] == [(1, "no_data")]
    array.repair(problems)
    redo = extract(manifest, store, SMALL)
    assert redo.images_computed == array.chunk_rows
    np.testing.assert_array_equal(_features(store, key), expected)


@pytest.mark.slow
def test_two_processes_on_one_store_wait_and_share(tmp_path: Path) -> None:
    data = tmp_path / "images"
    for i in range(40):
        write_image(data / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    store = tmp_path / "store"
    processes = [_run_extract(data, store) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    computed = sorted(int(out.split("computed")[1]) for out in outputs)
    assert computed == [0, 40], outputs  # one did the work, the other waited and reused it
    array = next(FeatureStore(str(store)).feature_arrays())
    assert array.complete and array.verify() == []


def test_grown_dataset_computes_only_new_images(image_tree: Path, tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path / "store"))
    before = extract(scan(image_tree), store, SMALL)
    for i in range(3):
        write_image(image_tree / "cats" / f"new_{i}.png", seed=5000 + i)
    grown = scan(image_tree)
    after = extract(grown, store, SMALL)
    assert after.feature_keys != before.feature_keys  # a new manifest is a new array...
    assert (after.images_computed, after.images_cached) == (3, 24)  # ...that reuses old rows
    fresh = FeatureStore(str(tmp_path / "fresh"))
    key = after.feature_keys["block2_pool"]
    assert extract(grown, fresh, SMALL).images_computed == 27
    assert_features_close(_features(store, key), _features(fresh, key))  # other batches
