"""Cost of the near-copy stages on stored rows: reading them as unit rows, the groups of
`--group-by near-copies`, and the per-run check of the test rows against the training rows.

Rows are either a stored feature array (`--store` and `--key`, e.g. blood-cell features) or
generated into a Zarr store with the store's own chunking: `--photos` random positive rows
(like ReLU features) with `--rows / --photos` jittered copies each.

    nice -n 10 .venv/bin/python -m benchmarks.near_copies --rows 10000 --width 1280
    nice -n 10 .venv/bin/python -m benchmarks.near_copies --store STORE --key KEY
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from tasks.features.near_copies import DEFAULT_THRESHOLD, leak_check, near_copy_groups, unit_rows
from tasks.features.store import FeatureStore


def _generated(rows: int, width: int, photos: int, work: Path):
    """A stored (rows, width) float32 array of `photos` photos and their jittered copies."""
    store = FeatureStore(str(work / "store"))
    array = store.create_feature_array("generated", rows, width, "float32", {})
    rng = np.random.default_rng(0)
    base = rng.random((photos, width), dtype=np.float32)
    for index in range(array.n_chunks):
        span = array.chunk_slice(index)
        photo = np.arange(span.start, span.stop) % photos
        jitter = 0.1 * rng.random((len(photo), width), dtype=np.float32)
        array.write_chunk(index, base[photo] + jitter)
    return array.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--store", help="an existing feature store (with --key)")
    parser.add_argument("--key", help="a feature key (or unique prefix) in --store")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args()
    if args.store:
        store = FeatureStore(args.store, mode="r")
        features = store.feature_array(store.find(args.key)[1]).data
    else:
        work = Path(tempfile.mkdtemp(prefix="fp-bench-near-copies-"))
        features = _generated(args.rows, args.width, args.photos, work)
    began = time.perf_counter()
    rows = unit_rows(features)
    read = time.perf_counter()
    found = near_copy_groups(rows, args.threshold)
    grouped = time.perf_counter()
    order = np.random.default_rng(0).permutation(len(rows))
    test, train = np.sort(order[: len(rows) // 4]), np.sort(order[len(rows) // 4 :])
    check = leak_check(rows, train, test, args.threshold)
    checked = time.perf_counter()
    print(
        json.dumps(
            {
                "shape": list(features.shape),
                "unit_rows_s": round(read - began, 2),
                "groups_s": round(grouped - read, 2),
                "check_s": round(checked - grouped, 2),
                "threshold": args.threshold,
                "n_groups": found.n_groups,
                "largest_share": round(found.largest_share, 4),
                "random_split_share": round(check.share, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
