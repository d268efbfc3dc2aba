"""Mixed-precision extraction: its own feature keys, float32 values stored, float32 keys kept.

Real extractions into a real Zarr store (VGG16 with random weights, 32 px images).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.backbones import precision
from tasks.backbones.registry import build_feature_model, get_spec, resolve_weights
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract, plan_extraction
from tasks.features.store import FeatureStore

LAYER = "block2_pool"
SMALL = ExtractSettings(
    backbone="vgg16",
    weights="none",
    layers=(LAYER,),
    image_size=32,
    batch_size=4,
    chunk_mb=0.05,
    precision="float32",
)
# The fields of a feature key before precision existed: a float32 key must hash only these,
# or every feature array stored until now would be recomputed.
FLOAT32_IDENTITY = {
    "manifest_key",
    "backbone",
    "weights",
    "layer",
    "image_size",
    "pooling",
    "dtype",
    "preprocess",
    "resize",
    "version",
}


def _with(**changes) -> ExtractSettings:
    return SMALL.model_copy(update=changes)


@pytest.fixture
def bf16_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the machine runs bfloat16 natively, whatever this one has."""
    monkeypatch.setattr(precision, "hardware", lambda: ("CPU", ("bfloat16",)))


def test_each_precision_has_its_own_key_and_float32_keeps_the_old_one(image_tree: Path) -> None:
    manifest = scan(image_tree)
    plans = {p: plan_extraction(manifest, _with(precision=p)) for p in precision.PRECISIONS}

    assert set(plans["float32"].identities[LAYER]) == FLOAT32_IDENTITY
    assert plans["float32"].key(LAYER) == plan_extraction(manifest, SMALL).key(LAYER)
    assert len({plan.key(LAYER) for plan in plans.values()}) == 3
    assert plans["bfloat16"].identities[LAYER]["precision"] == "bfloat16"


def test_auto_takes_the_native_precision_into_the_key(image_tree: Path, bf16_native) -> None:
    manifest = scan(image_tree)
    auto = plan_extraction(manifest, _with(precision="auto"))
    assert auto.key(LAYER) == plan_extraction(manifest, _with(precision="bfloat16")).key(LAYER)


def test_auto_is_the_default() -> None:
    assert ExtractSettings().precision == "auto"


def test_auto_keeps_depthwise_backbones_float32_on_a_cpu_only(
    image_tree: Path, monkeypatch: pytest.MonkeyPatch, bf16_native
) -> None:
    manifest = scan(image_tree)
    lite = _with(backbone="efficientnet-lite0", layers=("avg_pool",), precision="auto")
    assert "precision" not in plan_extraction(manifest, lite).identities["avg_pool"]
    assert plan_extraction(manifest, _with(precision="auto")).identities[LAYER]["precision"] == (
        "bfloat16"
    )
    assert precision.resolve_precision("bfloat16", depthwise=True) == "bfloat16"  # asked for

    monkeypatch.setattr(
        precision, "hardware", lambda: ("GPU (compute capability (8, 0))", ("bfloat16",))
    )
    assert precision.resolve_precision("auto", depthwise=True) == "bfloat16"


def test_auto_falls_back_to_float32_with_a_log_line(
    image_tree: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "hardware", lambda: ("CPU", ()))
    precision._note.cache_clear()
    manifest = scan(image_tree)
    with caplog.at_level(logging.INFO, logger="featurepipe.precision"):
        auto = plan_extraction(manifest, _with(precision="auto"))
    assert auto.key(LAYER) == plan_extraction(manifest, SMALL).key(LAYER)
    assert "precision auto: float32 (CPU runs no bfloat16 or float16 natively)" in caplog.messages


def test_explicit_precision_without_native_support_is_kept_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "hardware", lambda: ("CPU", ()))
    precision._note.cache_clear()
    with caplog.at_level(logging.INFO, logger="featurepipe.precision"):
        assert precision.resolve_precision("bfloat16") == "bfloat16"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "no native bfloat16" in caplog.messages[0]


def test_bfloat16_extraction_stores_float32_values_close_to_float32s(
    image_tree: Path, tmp_path: Path
) -> None:
    """bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); after the
    conv layers to block2 the features stay within 3 % of the largest float32 feature."""
    manifest = scan(image_tree)
    store = FeatureStore(str(tmp_path / "store"))
    values = {}
    for name in ("float32", "bfloat16"):
        key = extract(manifest, store, _with(precision=name)).feature_keys[LAYER]
        array = store.feature_array(key)
        assert array.data.dtype == np.float32
        values[name] = array.data[...]
    reference, mixed = values["float32"], values["bfloat16"]

    assert not np.array_equal(reference, mixed)  # it really ran in 16 bits
    assert np.abs(mixed - reference).max() <= 0.03 * np.abs(reference).max()
    assert np.corrcoef(reference.ravel(), mixed.ravel())[0, 1] > 0.999


def test_mixed_model_outputs_float32_and_leaves_the_policy_alone() -> None:
    spec = get_spec("vgg16")
    model = build_feature_model(
        spec, resolve_weights(spec, "none"), 32, [LAYER], pooling="avg", precision="bfloat16"
    )
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("block1_conv1").variable_dtype == "float32"
    assert [output.dtype for output in model.outputs] == ["float32"]
    assert keras.config.dtype_policy().name == "float32"  # later models (dense heads) stay float32


def test_native_precisions_from_hardware(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()

    assert precision.native_precisions({"avx512_bf16"}, None) == ["bfloat16"]
    assert precision.native_precisions({"amx_bf16", "amx_fp16"}, None) == ["bfloat16", "float16"]
    assert precision.native_precisions({"avx2"}, None) == []
    assert precision.native_precisions({"avx2"}, (8, 0)) == ["bfloat16", "float16"]
    assert precision.native_precisions({"avx512_bf16"}, (7, 5)) == ["float16"]
    assert precision.native_precisions({"avx512_bf16"}, (6, 1)) == []
