"""The embedded demo dataset: scikit-learn's handwritten digits as PNG files in class folders.

Digits ship inside scikit-learn, so the demo and the tests need no network and no ../shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(folder: str | Path, per_class: int | None = None, upscale: int = 4) -> Path:
    """Write digits as <folder>/<digit>/digit_<index>.png once; later calls reuse the files.

    Each 8x8 image (values 0..16) becomes an 8-bit grayscale PNG upscaled `upscale` times.
    """
    folder = Path(folder)
    marker = folder.parent / f".{folder.name}.complete"  # outside the dataset: not an image
    if marker.exists() and marker.read_text() == f"{per_class}:{upscale}":
        return folder
    digits = load_digits()
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        pixels = np.kron(pixels, np.ones((upscale, upscale), dtype=np.uint8))
        target = folder / str(label) / f"digit_{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(target)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{per_class}:{upscale}")
    return folder
