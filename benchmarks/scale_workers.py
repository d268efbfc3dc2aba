"""Extraction images/s with 1 vs N Dask worker processes, and a worker that joins mid-run.

Extraction is one unpinned task per unit of whole chunks, so the scheduler balances the units
over the workers and hands some to a worker that joins late. Tasks per worker are counted from
the scheduler's task stream (`distributed.get_task_stream`). On one machine N workers share
its cores (each gets cores / N TensorFlow threads), so the gain is bounded by how well one
TensorFlow process already uses them; across machines throughput grows with the workers' cores.

    .venv/bin/python -m benchmarks.scale_workers --images 96 --workers 2 --join-after 20
    .venv/bin/python -m benchmarks.scale_workers --images 960 --workers 2 --warm

`--warm` times a cluster that is already up, as a long-running one is: every worker has
imported TensorFlow and built the backbone (one pinned warm-up task each) before the clock
starts, so the figure is the steady throughput rather than start-up plus throughput.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import image_folder


def _tasks_per_worker(stream) -> dict[str, int]:
    counts = Counter(t["worker"] for t in stream.data if t["key"].startswith("extract-unit"))
    return dict(sorted(counts.items()))


def _backbones_built() -> int:
    """Backbones this worker process built (1 each when warm-up and units share one)."""
    from tasks.features.on_cluster import BUILDS

    return sum(BUILDS.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layer", default="block5_pool")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--join-after", type=float, help="also: start with 1 worker, add a 2nd after this many s"
    )
    parser.add_argument(
        "--warm", action="store_true", help="build each worker's backbone before timing"
    )
    args = parser.parse_args()
    from distributed import get_task_stream

    from tasks.cluster import dask_client
    from tasks.data.scan import scan
    from tasks.features.extract import ExtractSettings, extract
    from tasks.features.on_cluster import warm_workers
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
    print(f"{args.images} images, VGG16 {args.layer} {args.image_size}px; {work}", flush=True)
    for workers in (1, args.workers):
        store = FeatureStore(str(work / f"store-{workers}"))
        with dask_client(workers=workers, threads_per_worker=1) as client:
            if args.warm:
                warm_workers(client, settings)
            with get_task_stream(client) as stream:
                began = time.perf_counter()
                result = extract(manifest, store, settings, client=client)
                seconds = time.perf_counter() - began
            builds = sorted(client.run(_backbones_built).values())
        started = "workers warm" if args.warm else "including each worker building its backbone"
        print(
            f"{workers} worker(s): {result.images_computed / seconds:6.2f} images/s "
            f"({seconds:.1f} s, {started}); "
            f"unit tasks per worker {_tasks_per_worker(stream)}; backbones built per worker "
            f"{builds}",
            flush=True,
        )
    if args.join_after is None:
        return
    store = FeatureStore(str(work / "store-join"))
    with dask_client(workers=1, threads_per_worker=1) as client:
        first = set(client.scheduler_info()["workers"])
        with get_task_stream(client) as stream:
            run = threading.Thread(
                target=lambda: extract(manifest, store, settings, client=client), daemon=True
            )
            run.start()
            time.sleep(args.join_after)
            client.cluster.scale(2)
            run.join()
        counts = _tasks_per_worker(stream)
    joined = {worker: n for worker, n in counts.items() if worker not in first}
    print(
        f"1 worker, a 2nd added after {args.join_after:.0f} s: unit tasks per worker {counts}; "
        f"the late worker ran {sum(joined.values())} of {sum(counts.values())}",
        flush=True,
    )


if __name__ == "__main__":
    main()
