"""Sanity-check an ImageNet classifier on photos that ship inside scikit-image.

Why: a backbone with wrongly loaded weights or the wrong preprocessing still runs and still
produces features; classifying a few known photos offline shows whether it really sees.
Generic over the model and its preprocessing so every backbone can be checked the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.backbones.imagenet_classes import imagenet_class_names

__all__ = ["CHECK_PHOTOS", "check_photo_paths", "load_photo", "top5_on_photos"]

# Photos bundled in the scikit-image wheel (not fetched by its downloader), with their subject.
CHECK_PHOTOS: dict[str, str] = {
    "chelsea.png": "cat",
    "coffee.png": "cup of coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "astronaut.png": "astronaut",
}


def _skimage_data_dir() -> Path:
    """scikit-image's bundled data folder, read directly so nothing can trigger a download."""
    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed: pip install scikit-image")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def check_photo_paths() -> tuple[dict[str, Path], dict[str, str]]:
    """Split ``CHECK_PHOTOS`` into available paths and ``{name: reason}`` for skipped ones."""
    data_dir = _skimage_data_dir()
    found: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in CHECK_PHOTOS:
        path = data_dir / name
        if path.is_file():
            found[name] = path
        else:
            skipped[name] = f"not bundled in {data_dir} (scikit-image would download it)"
    return found, skipped


def load_photo(path: Path, size: int | tuple[int, int]) -> np.ndarray:
    """RGB uint8 photo, centre-cropped to a square then resized, so objects are not squashed."""
    height, width = (size, size) if isinstance(size, int) else size
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def top5_on_photos(
    model: Any, preprocess: Callable[[np.ndarray], Any], size: int | tuple[int, int]
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Top-5 ImageNet classes with probabilities for each available check photo.

    ``model`` maps a preprocessed batch to 1000 softmax probabilities (any Keras classifier);
    ``preprocess`` is its input function; ``size`` is its input height/width.
    """
    paths, _skipped = check_photo_paths()
    if not paths:
        return []
    batch = np.stack([load_photo(path, size) for path in paths.values()])
    probs = np.asarray(model.predict(preprocess(batch), verbose=0))
    names = imagenet_class_names()
    results = []
    for photo, row in zip(paths, probs, strict=True):
        best = np.argsort(row)[::-1][:5]
        results.append((photo, [(names[i], float(row[i])) for i in best]))
    return results
