"""The reduce stage's time and memory model (tasks/reduce/plan.py, constants measured by
benchmarks/reduce_constants.py) evaluated for a large run on K workers: a table, not a run.

    .venv/bin/python -m benchmarks.reduce_model --rows 750000 --projected 1000000 \\
        --cols 200704 --components 2000 --workers 1,4,16,64 --threads 2
"""

from __future__ import annotations

import argparse

from tasks.reduce.plan import (
    GiB,
    Lanes,
    Shape,
    Workers,
    estimated_seconds,
    peak_bytes,
    plan,
    worker_peak_bytes,
)

METHODS = ("gram", "incremental", "randomized")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=750_000, help="training rows n")
    parser.add_argument("--projected", type=int, default=1_000_000, help="rows projected N")
    parser.add_argument("--cols", type=int, default=200_704, help="features d")
    parser.add_argument("--components", type=int, default=2_000, help="fixed k")
    parser.add_argument("--workers", default="1,4,16,64", help="K values, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="threads per worker")
    parser.add_argument("--worker-gib", type=float, default=24.0, help="each worker's limit")
    parser.add_argument("--client-gib", type=float, default=64.0, help="the client's limit")
    parser.add_argument("--cores", type=int, default=2, help="the client's cores")
    args = parser.parse_args()
    shape = Shape(args.rows, args.cols, args.projected)
    k = args.components
    print("client peak GiB (fit + projected rows):", end=" ")
    print(", ".join(f"{m} {peak_bytes(m, shape, k, True) / GiB:.1f}" for m in METHODS))
    print("worker peak GiB:", end=" ")
    print(
        ", ".join(
            f"{m} {worker_peak_bytes(m, shape, k, args.threads, True) / GiB:.1f}" for m in METHODS
        )
    )
    print("| K | " + " | ".join(f"{m} h" for m in METHODS) + " | auto |")
    print("|---:|" + "---:|" * (len(METHODS) + 1))
    for count in (int(x) for x in args.workers.split(",")):
        workers = Workers(int(args.worker_gib * GiB), args.threads, count)
        lanes = Lanes.of(workers, args.cores)
        hours = [estimated_seconds(m, shape, k, True, lanes) / 3600 for m in METHODS]
        chosen = plan(shape, "auto", 0.8, k, int(args.client_gib * GiB), "", workers, args.cores)
        print(f"| {count} | " + " | ".join(f"{h:,.1f}" for h in hours) + f" | {chosen.method} |")


if __name__ == "__main__":
    main()
