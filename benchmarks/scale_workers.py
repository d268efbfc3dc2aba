"""Extraction images/s with 1 vs N Dask worker processes (each owns whole chunks), one run.

On one machine N workers share its cores, so the gain is bounded by how well one TensorFlow
process already uses them; across machines, throughput grows with the workers' total cores.

    .venv/bin/python -m benchmarks.scale_workers --images 96 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import image_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layer", default="block5_pool")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    from tasks.cluster import dask_client
    from tasks.data.scan import scan
    from tasks.features.extract import ExtractSettings, extract
    from tasks.features.store import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="fp-bench-workers-"))
    manifest = scan(image_folder(args.images, work))
    settings = ExtractSettings(
        backbone="vgg16",
        weights="hed-vgg16",
        layers=(args.layer,),
        image_size=args.image_size,
        chunk_mb=1.0,
    )
    print(f"{args.images} images, VGG16 {args.layer} {args.image_size}px; {work}")
    for workers in (1, args.workers):
        store = FeatureStore(str(work / f"store-{workers}"))
        with dask_client(workers=workers, threads_per_worker=1) as client:
            began = time.perf_counter()
            result = extract(manifest, store, settings, client=client)
            seconds = time.perf_counter() - began
        print(
            f"{workers} worker(s): {result.images_computed / seconds:6.2f} images/s "
            f"({seconds:.1f} s including each worker building its backbone)",
            flush=True,
        )


if __name__ == "__main__":
    main()
