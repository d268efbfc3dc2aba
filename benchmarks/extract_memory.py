"""Peak RSS of extraction vs number of images: featurepipe's chunked store vs the naive way.

The naive way (the original notebook) keeps every feature row in one numpy array, so its
memory grows with the dataset; the store writes chunk by chunk, so it should stay flat.
Each measurement runs in a fresh process that reports its own peak RSS.

    .venv/bin/python benchmarks/extract_memory.py --sizes 200,400,800 --layer block3_pool
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import image_folder, run_child

STORE_CODE = """
import json, resource, sys, time
from tasks.data.scan import scan
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
data, store, layer, size, weights = sys.argv[1:6]
began = time.perf_counter()
result = extract(scan(data), FeatureStore(store), ExtractSettings(
    backbone="vgg16", weights=weights, layers=(layer,), image_size=int(size)))
print(json.dumps({"seconds": time.perf_counter() - began, "computed": result.images_computed,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

NAIVE_CODE = """
import json, resource, sys, time
import numpy as np
from keras.applications.vgg16 import preprocess_input
from tasks.backbones.registry import build_feature_model, get_spec, resolve_weights
from tasks.data.scan import scan
from tasks.data.images import load_rgb
data, layer, size, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
began = time.perf_counter()
manifest = scan(data)
spec = get_spec("vgg16")
model = build_feature_model(spec, resolve_weights(spec, weights), size, [layer])
rows = []
for start in range(0, len(manifest.records), 16):
    batch = np.stack([load_rgb(f"{manifest.root}/{r.path}", size)
                      for r in manifest.records[start:start + 16]])
    rows.append(np.asarray(model.predict_on_batch(preprocess_input(batch))))
features = np.concatenate(rows)  # the notebook's in-memory matrix
print(json.dumps({"seconds": time.perf_counter() - began, "computed": len(features),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,400,800")
    parser.add_argument("--layer", default="block3_pool")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="hed-vgg16")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp-bench-mem-"))
    print(f"layer {args.layer}, {args.image_size}px, weights {args.weights}; work dir {work}")
    print(
        f"{'images':>7} {'store peak MiB':>15} {'store s':>8} {'naive peak MiB':>15} {'naive s':>8}"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        data = image_folder(n, work)
        store = run_child(
            STORE_CODE,
            str(data),
            str(work / f"store-{n}"),
            args.layer,
            str(args.image_size),
            args.weights,
        )
        naive = {"peak_rss_mib": float("nan"), "seconds": float("nan")}
        if not args.skip_naive:
            naive = run_child(NAIVE_CODE, str(data), args.layer, str(args.image_size), args.weights)
        print(
            f"{n:>7} {store['peak_rss_mib']:>15.0f} {store['seconds']:>8.1f} "
            f"{naive['peak_rss_mib']:>15.0f} {naive['seconds']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
