"""Decode one image file into an RGB array, or say why it cannot be used.

Pillow is the only decoder so scan-time checks and extraction-time decoding agree on which
files are usable.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Guard against decompression bombs: 100 megapixels is far above any photo we resize to 224.
MAX_PIXELS = 100_000_000
RESIZE_METHOD = "pil-bilinear"  # part of the feature key: changing it changes the features


class ImageError(UserError):
    """A file that cannot be used as an image; the message is the reason shown to users."""


def _open(path: Path) -> Image.Image:
    """Open with the bomb guard turned into an ordinary, explainable error."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image too large ({image.width}x{image.height} pixels)")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image too large: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError("not a readable image (unknown format or corrupt header)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt or truncated image: {error}") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16) to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0.0
        scale = 255.0 / peak if peak > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode, orient and resize one file to a (size, size, 3) float32 array in 0..255."""
    image = to_rgb(_open(Path(path)))
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def check_image(path: str | Path) -> str | None:
    """Return why the file cannot be used, or None if it decodes fully."""
    try:
        image = _open(Path(path))
        if min(image.size) < 1:
            return "empty image"
        to_rgb(image)
    except ImageError as error:
        return str(error)
    return None
