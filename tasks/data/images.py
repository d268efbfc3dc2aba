"""Decode one image file into an RGB array, or say why it cannot be used.

Pillow is the only decoder so scan-time checks and extraction-time decoding agree on which
files are usable: `check_image` and `load_rgb` share one decode path.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Guard against decompression bombs: 100 megapixels is far above any photo we resize to 224.
MAX_PIXELS = 100_000_000
# Below 8 pixels a side, upscaling to the CNN input gives little more than a flat colour; such
# files are usually tracking pixels or placeholders from a web scrape. 8x8 keeps sklearn's digits.
MIN_SIDE = 8
RESIZE_METHOD = "pil-bilinear"  # part of the feature key: changing it changes the features
# Modes to_rgb turns into true RGB; Pillow converts others (LAB, HSV) to wrong colours.
SUPPORTED_MODES = frozenset(
    {
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBX",
        "RGBa",
        "CMYK",
        "YCbCr",
        "I",
        "F",
        "I;16",
        "I;16L",
        "I;16B",
        "I;16N",
    }
)


class ImageError(UserError):
    """A file that cannot be used as an image; the message is the reason shown to users."""


def _sniff(head: bytes) -> str:
    """Name what a non-image file probably is, so the reason points at the real mistake."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML page, not an image (a failed or blocked download?)"
    if b"<svg" in text:
        return "an SVG drawing, not a bitmap image (export it to PNG)"
    if text.startswith(b"%pdf"):
        return "a PDF document, not an image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        return "a HEIC/HEIF photo, which Pillow cannot read (convert it to JPEG or PNG)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a readable image (unknown format or corrupt header)"
    return "a text file, not an image"


def is_url(location: str | Path) -> bool:
    """Whether a location names an object (s3://bucket/key, any fsspec URL), not a local path."""
    return "://" in str(location)


def _binary(source: str | Path | bytes) -> IO[bytes]:
    """A readable handle on the image's bytes: a local regular file, an fsspec URL (read
    whole: images are small and object stores prefer one request) or bytes already read."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if is_url(source):
        import fsspec

        with fsspec.open(str(source), "rb") as remote:
            return io.BytesIO(remote.read())
    info = os.stat(source)
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file (a device, pipe or socket)")
    return open(source, "rb")


def _open(source: str | Path | bytes) -> Image.Image:
    """Open, bomb-check and fully decode one image, turning every failure into an ImageError.

    The pixel count is checked from the header before load(), so a bomb is never allocated.
    Nothing global is changed (no warnings filters, no Image.MAX_IMAGE_PIXELS): extraction
    decodes in threads.
    """
    try:
        with _binary(source) as handle:
            head = handle.read(512)
            if not head:
                raise ImageError("empty file (0 bytes)")
            handle.seek(0)
            try:
                image = Image.open(handle)
            except UnidentifiedImageError as error:
                raise ImageError(_sniff(head)) from error
            with image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"image too large ({width}x{height} pixels; the limit is "
                        f"{MAX_PIXELS // 1_000_000} megapixels)"
                    )
                if min(width, height) < MIN_SIDE:
                    raise ImageError(
                        f"image too small ({width}x{height} pixels; featurepipe "
                        f"needs at least {MIN_SIDE}x{MIN_SIDE})"
                    )
                image.load()
                return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"image too large (over {MAX_PIXELS // 1_000_000} megapixels; "
            "possibly a decompression bomb)"
        ) from error
    except FileNotFoundError as error:
        raise ImageError("file not found (deleted or moved?)") from error
    except PermissionError as error:
        raise ImageError("cannot read the file: permission denied") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(
            f"corrupt or truncated image: {error} (re-download or re-export it)"
        ) from error


def _exif_oriented(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any supported mode to 8-bit RGB.

    Integer and float modes (16-bit PNG, I/F TIFF) are scaled by their peak when it exceeds 255:
    12-bit scientific images in 16-bit files would be nearly black under a fixed /257, and a
    plain convert() would clip them to white. Transparent pixels become white, not their
    (arbitrary) stored colour.
    """
    if image.mode not in SUPPORTED_MODES:
        raise ImageError(f"unsupported colour mode {image.mode} (convert the file to RGB)")
    image = _exif_oriented(image)
    if image.mode.startswith("I") or image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0)
        peak = array.max() if array.size else 0.0
        scale = 255.0 / peak if peak > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode, orient and resize one file (path or URL) to a (size, size, 3) float32 array in
    0..255."""
    resized = _open(path).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def check_image(path: str | Path | bytes) -> str | None:
    """Return why the file (path, URL, or its bytes) cannot be used, or None if it decodes
    fully."""
    try:
        _open(path)
    except ImageError as error:
        return str(error)
    return None
