"""Images/s of the whole extract stage vs bare `model.predict` on preloaded tensors, one run.

The ratio says how much the pipeline (decode, resize, preprocess, write chunks, bookkeeping)
costs on top of the backbone itself; 1.0 means the backbone never waits. The second table
compares block3+block4+block5 in one pass with block5 alone. The third compares float32 with
a mixed precision (default: what `auto` picks here) at block3_pool, both ways, in one run.

    .venv/bin/python -m benchmarks.extract_throughput --images 160
    .venv/bin/python -m benchmarks.extract_throughput --images 160 --only precision
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
data, store, layers, size, weights, precision, backbone = sys.argv[1:8]
manifest = scan(data)
result = extract(manifest, FeatureStore(store), ExtractSettings(
    backbone=backbone, weights=weights, layers=tuple(layers.split(",")), image_size=int(size),
    precision=precision))
# extract() includes building the model: report it separately from the streaming rate
print(json.dumps({"images": result.images_computed, "seconds": result.seconds}))
"""

RAW_CODE = """
import json, sys, time
import numpy as np
from tasks.backbones.registry import (build_feature_model, get_spec, load_preprocess,
                                     resolve_weights)
from tasks.data.scan import scan
from tasks.data.images import load_rgb
data, layers, size, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
precision, backbone = sys.argv[5], sys.argv[6]
manifest = scan(data)
began = time.perf_counter()
spec = get_spec(backbone)
preprocess_input = load_preprocess(spec)
model = build_feature_model(spec, resolve_weights(spec, weights), size, layers.split(","),
                            precision=precision)
build = time.perf_counter() - began
images = preprocess_input(np.stack([load_rgb(f"{manifest.root}/{r.path}", size)
                                    for r in manifest.records]))
began = time.perf_counter()
model.predict(images, batch_size=16, verbose=0)
print(json.dumps({"images": len(images), "seconds": time.perf_counter() - began,
                  "build_seconds": build}))
"""


def rates(
    data: Path, store: Path, layer: str, size: str, weights: str, precision: str, backbone: str
):
    """Images/s of bare model.predict and of the whole extract stage, each in a fresh process."""
    raw = run_child(RAW_CODE, str(data), layer, size, weights, precision, backbone)
    pipe = run_child(
        PIPELINE_CODE, str(data), str(store), layer, size, weights, precision, backbone
    )
    # extract() time includes building the model once; subtract the same build cost
    pipe_rate = pipe["images"] / max(pipe["seconds"] - raw["build_seconds"], 1e-9)
    return raw["images"] / raw["seconds"], pipe_rate, pipe["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="hed-vgg16")
    parser.add_argument("--precision", default="auto", help="compared with float32 (mixed)")
    parser.add_argument("--only", choices=("pipeline", "precision"), help="one section only")
    parser.add_argument(
        "--backbone", default="vgg16", help="precision section only (pipeline: VGG16)"
    )
    parser.add_argument("--layer", default="block3_pool", help="precision section only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp-bench-tp-"))
    data = image_folder(args.images, work)
    size, weights = str(args.image_size), args.weights
    print(f"{args.images} images, {args.image_size}px, VGG16 {weights}; work dir {work}")

    if args.only != "precision":
        raw_rate, pipe_rate, block5_s = rates(
            data, work / "store5", "block5_pool", size, weights, "float32", "vgg16"
        )
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
            "float32",
            "vgg16",
        )
        print(
            f"block3+4+5 in one pass: {multi['seconds']:.1f} s vs block5 alone "
            f"{block5_s:.1f} s: ratio {multi['seconds'] / block5_s:.3f} (target <= 1.1)"
        )

    if args.only != "pipeline":
        from tasks.backbones.precision import hardware, resolve_precision

        backbone, layer = args.backbone, args.layer
        mixed = resolve_precision(args.precision)
        print(f"precision {args.precision} -> {mixed} on this {hardware()[0]}")
        if mixed == "float32":
            return
        figures = {
            name: rates(data, work / f"store-{name}", layer, size, weights, name, backbone)
            for name in ("float32", mixed)
        }
        for name, (raw_rate, pipe_rate, _) in figures.items():
            print(
                f"{backbone} {layer} {name:>8}: model.predict {raw_rate:6.2f} images/s, "
                f"extract stage {pipe_rate:6.2f} images/s"
            )
        (raw32, pipe32, _), (raw16, pipe16, _) = figures["float32"], figures[mixed]
        print(
            f"{mixed} / float32: model.predict {raw16 / raw32:.2f}x, "
            f"extract stage {pipe16 / pipe32:.2f}x (target >= 1.8)"
        )


if __name__ == "__main__":
    main()
