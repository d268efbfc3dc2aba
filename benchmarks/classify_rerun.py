"""Classifier-only re-run vs a full pipeline run on the same images, in one process.

Both are the real Prefect flows (local mode); a trivial flow runs first so that neither timing
includes starting Prefect's local API. Target: the re-run costs at most 5% of the full run.

    .venv/bin/python -m benchmarks.classify_rerun --images 400
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import image_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--layer", default="block4_pool")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classifiers", default="svm,logreg")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow

    from flows.pipeline import classify_flow, pipeline_flow
    from flows.settings import PipelineSettings

    work = Path(tempfile.mkdtemp(prefix="fp-bench-rerun-"))
    data = image_folder(args.images, work)
    settings = PipelineSettings(
        data=data,
        store=str(work / "store"),
        runs=work / "runs",
        weights="hed-vgg16",
        layers=[args.layer],
        image_size=args.image_size,
        classifiers=args.classifiers.split(","),
    )
    flow(name="warm-up")(lambda: None)()

    began = time.perf_counter()
    full = pipeline_flow(settings)
    full_s = time.perf_counter() - began
    began = time.perf_counter()
    rerun = classify_flow(settings, [full["layers"][args.layer]["feature_key"]])
    rerun_s = time.perf_counter() - began
    print(f"{args.images} images, VGG16 hed-vgg16 {args.layer} {args.image_size}px; {work}")
    print(f"full pipeline run:      {full_s:7.1f} s  accuracy {full['accuracy']}")
    print(f"classifier-only re-run: {rerun_s:7.1f} s  accuracy {rerun['accuracy']}")
    print(f"ratio: {rerun_s / full_s:.3f} (target <= 0.05)")


if __name__ == "__main__":
    main()
