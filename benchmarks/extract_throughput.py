"""Images/s of the whole extract stage vs bare `model.predict` on preloaded tensors, one run.

The ratio says how much the pipeline (decode, resize, preprocess, write chunks, bookkeeping)
costs on top of the backbone itself; 1.0 means the backbone never waits. The second table
compares block3+block4+block5 in one pass with block5 alone.

    .venv/bin/python benchmarks/extract_throughput.py --images 160
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import image_folder, run_child

PIPELINE_CODE = """
import json, sys, time
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
data, store, layers, size, weights = sys.argv[1:6]
manifest = scan(data)
result = extract(manifest, FeatureStore(store), ExtractSettings(
    backbone="vgg16", weights=weights, layers=tuple(layers.split(",")), image_size=int(size)))
# extract() includes building the model: report it separately from the streaming rate
print(json.dumps({"images": result.images_computed, "seconds": result.seconds}))
"""

RAW_CODE = """
import json, sys, time
import numpy as np
from keras.applications.vgg16 import preprocess_input
from tasks.backbones.registry import build_feature_model, get_spec, resolve_weights
from tasks.data.scan import scan
from tasks.data.images import load_rgb
data, layers, size, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
manifest = scan(data)
began = time.perf_counter()
spec = get_spec("vgg16")
model = build_feature_model(spec, resolve_weights(spec, weights), size, layers.split(","))
build = time.perf_counter() - began
images = preprocess_input(np.stack([load_rgb(f"{manifest.root}/{r.path}", size)
                                    for r in manifest.records]))
began = time.perf_counter()
model.predict(images, batch_size=16, verbose=0)
print(json.dumps({"images": len(images), "seconds": time.perf_counter() - began,
                  "build_seconds": build}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="hed-vgg16")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp-bench-tp-"))
    data = image_folder(args.images, work)
    size, weights = str(args.image_size), args.weights
    print(f"{args.images} images, {args.image_size}px, VGG16 {weights}; work dir {work}")

    raw = run_child(RAW_CODE, str(data), "block5_pool", size, weights)
    pipe = run_child(PIPELINE_CODE, str(data), str(work / "store5"), "block5_pool", size, weights)
    raw_rate = raw["images"] / raw["seconds"]
    # extract() time includes building the model once; subtract the same build cost
    pipe_rate = pipe["images"] / max(pipe["seconds"] - raw["build_seconds"], 1e-9)
    print(f"block5_pool  model.predict on preloaded tensors: {raw_rate:6.2f} images/s")
    print(f"block5_pool  extract stage, JPEG files -> store:  {pipe_rate:6.2f} images/s")
    print(f"ratio pipeline / raw: {pipe_rate / raw_rate:.3f} (target >= 0.95)")

    multi = run_child(
        PIPELINE_CODE,
        str(data),
        str(work / "store345"),
        "block3_pool,block4_pool,block5_pool",
        size,
        weights,
    )
    print(
        f"block3+4+5 in one pass: {multi['seconds']:.1f} s vs block5 alone "
        f"{pipe['seconds']:.1f} s: ratio {multi['seconds'] / pipe['seconds']:.3f} "
        "(target <= 1.1)"
    )


if __name__ == "__main__":
    main()
