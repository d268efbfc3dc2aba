"""Shared benchmark helpers: pick images (blood cells if present, else generated), measure RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BLOOD_CELLS = Path(__file__).resolve().parents[1] / "../shared/data/blood-cells/TRAIN"


def image_folder(n_images: int, work: Path) -> Path:
    """A class-folder tree with n_images: a symlinked subset of the blood cells when present,
    else generated 320x240 JPEGs (same size as the blood cells)."""
    folder = work / f"images-{n_images}"
    if folder.exists():
        return folder
    classes = (
        sorted(p for p in BLOOD_CELLS.resolve().iterdir() if p.is_dir())
        if BLOOD_CELLS.exists()
        else []
    )
    per_class = -(-n_images // max(len(classes), 4))
    made = 0
    for c in range(max(len(classes), 4)):
        label = classes[c].name if classes else f"class{c}"
        target = folder / label
        target.mkdir(parents=True, exist_ok=True)
        sources = sorted(classes[c].glob("*.jp*g"))[:per_class] if classes else range(per_class)
        for i, source in enumerate(sources):
            if made >= n_images:
                break
            if classes:
                (target / source.name).symlink_to(source)
            else:
                rng = np.random.default_rng(i * 10 + c)
                pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / f"{i}.jpg", quality=90)
            made += 1
    return folder


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python (so peaks don't mix); it prints one JSON line last."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])
