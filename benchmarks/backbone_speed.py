"""Inference throughput: EfficientNet-Lite0 (pooled 1280-d) vs VGG16 (block5_pool) on this machine.

Why: choosing a default backbone for feature extraction trades accuracy against images/s; both
models run here in the same process, on the same random batch, through the same Keras call.

    .venv/bin/python benchmarks/backbone_speed.py --batches 5 --batch-size 16 --size 224
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import keras
import numpy as np

from tasks.backbones.efficientnet_lite import build_efficientnet_lite0


def _lite0(size: int) -> keras.Model:
    return build_efficientnet_lite0(input_shape=(size, size, 3), include_top=False)


def _vgg16(size: int) -> keras.Model:
    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))


BACKBONES: dict[str, Callable[[int], keras.Model]] = {
    "efficientnet_lite0 -> avg_pool": _lite0,
    "vgg16 -> block5_pool": _vgg16,
}


def images_per_second(model: keras.Model, batch: np.ndarray, batches: int) -> float:
    """Time `batches` forward passes after one warm-up pass (graph tracing is not throughput)."""
    model.predict_on_batch(batch)
    began = time.perf_counter()
    for _ in range(batches):
        model.predict_on_batch(batch)
    return batches * len(batch) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    batch = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, args.size, args.size, 3))
    batch = batch.astype(np.float32)
    print(
        f"batch {args.batch_size} x {args.size}x{args.size}, {args.batches} timed batches, "
        f"{os.cpu_count()} CPUs"
    )
    for name, build in BACKBONES.items():
        model = build(args.size)
        rate = images_per_second(model, batch, args.batches)
        print(
            f"{name:32s} {rate:8.1f} images/s  output {tuple(model.output.shape[1:])}  "
            f"{model.count_params() / 1e6:.1f}M params"
        )


if __name__ == "__main__":
    main()
