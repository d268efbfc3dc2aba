"""The decoded-input cache: every image of a manifest decoded and resized once, as uint8.

Decoding a JPEG costs about as much as a small backbone's forward pass, and fine-tuning reads
every image once per epoch and again in every seed's run; the cache pays it once per dataset
and size. One .npy file per (manifest key, size, decoder version), memory-mapped when read,
written under a temporary name and renamed when complete, so a killed fill is never read.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tasks.data.images import load_rgb
from tasks.data.scan import Manifest

DECODER = "pillow-bilinear-1"  # changes when load_rgb's output would change
CACHE_DIR = ".input-cache"  # beside the run folders: shared by every run and seed

logger = logging.getLogger(__name__)


def cache_path(folder: Path, manifest: Manifest, image_size: int) -> Path:
    return Path(folder) / f"{manifest.key}-{image_size}px-{DECODER}.npy"


def decoded_inputs(
    folder: Path, manifest: Manifest, image_size: int, workers: int | None = None
) -> np.ndarray:
    """The (images, size, size, 3) uint8 array of every manifest row, memory-mapped read-only;
    decoded into `folder` first if it is not there yet (Pillow releases the GIL, so threads
    decode in parallel)."""
    path = cache_path(folder, manifest, image_size)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        shape = (len(manifest.records), image_size, image_size, 3)
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        paths = manifest.paths()
        step = max(1, len(paths) // 10)

        def fill(row: int) -> None:
            # load_rgb gives 0..255 floats of whole numbers: uint8 holds them exactly
            array[row] = load_rgb(paths[row], image_size).astype(np.uint8)
            if (row + 1) % step == 0:
                logger.info("input cache: %d/%d images decoded", row + 1, len(paths))

        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(fill, range(len(paths))))
        array.flush()
        del array
        os.replace(partial, path)
        logger.info("input cache: %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return np.load(path, mmap_mode="r")
