"""Benchmark: the RBF SVM grid vs the streamed sgd classifier as the training rows grow.

For each n, synthetic rows shaped like PCA output (benchmarks.svm_grid.rows: four overlapping
classes) are saved as a reduction in a Zarr store; then, each in a fresh process reporting its
own peak RSS, the svm grid and logreg fit the rows loaded whole (as the classify stage does)
and sgd fits them streamed from the store. Prints time, peak RSS, the plan's estimate and test
accuracy per n, then power laws fitted to the svm times (log-log least squares: the grid's fit
alone, and load + fit + predict) and the latter's extrapolation with the planned memory, from
which SVM_MAX_ROWS was chosen.

    .venv/bin/python -m benchmarks.classify_scale --rows 1000,2000,4000,8000 --cols 1930
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import run_child

PREPARE = """
import sys
from benchmarks.svm_grid import rows
from tasks.features.store import FeatureStore
location, n_rows, n_cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
X, y = rows(n_rows, n_cols, 0)
FeatureStore(location).save_reduction("bench", {"projected": X, "labels": y}, {})
print("{}")
"""

FIT = """
import json, resource, sys, time
import numpy as np
from tasks.classify import plan
from tasks.classify.models import resolve_options, train_and_evaluate, train_and_evaluate_streamed
from tasks.classify.streamed import stored_rows
from tasks.features.store import FeatureStore
from tasks.reduce.stage import load_projected
location, name, test_share = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = FeatureStore(location)
y = store.load_reduction("bench", names=lambda a: a == "labels")[0]["labels"]
rows = np.random.default_rng(0).permutation(len(y))
n_test = int(test_share * len(y))
train, test = np.sort(rows[n_test:]), np.sort(rows[:n_test])
names = ["a", "b", "c", "d"]
began = time.perf_counter()
if name == "sgd":
    train_rows, test_rows = stored_rows(store, "bench", train), stored_rows(store, "bench", test)
    result = train_and_evaluate_streamed(train_rows, y[train], test_rows, y[test], names)
else:
    X, _ = load_projected(store, "bench")
    result = train_and_evaluate(name, X[train], y[train], X[test], y[test], names)
seconds = time.perf_counter() - began
array = store.root["reduced/bench/projected"]
chunk_bytes = 4 * array.chunks[0] * array.chunks[1]
shape = plan.Shape(len(train), len(test), len(y), array.shape[1], 4, chunk_bytes)
print(json.dumps({
    "classifier": name,
    "n_train": len(train),
    "seconds": round(seconds, 1),
    "fit_seconds": round(result.fit_seconds, 1),
    "predict_seconds": round(result.predict_seconds, 1),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "planned_mib": plan.peak_bytes(name, shape, resolve_options(name, None)) // 2**20,
    "planned_above_common_mib": (
        plan.peak_bytes(name, shape, resolve_options(name, None)) - plan.OVERHEAD
    ) // 2**20,
    "accuracy": round(result.metrics["accuracy"], 3),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,4000,8000", help="training rows, comma list")
    parser.add_argument("--cols", type=int, default=1930, help="components (1,930: blood cells)")
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--classifiers", default="svm,logreg,sgd")
    parser.add_argument("--extrapolate", default="16000,32000,64000,128000")
    args = parser.parse_args()

    from tasks.classify import plan
    from tasks.classify.models import resolve_options

    sizes = [int(v) for v in args.rows.split(",")]
    svm_times, svm_fit_times = [], []
    with tempfile.TemporaryDirectory(prefix="classify-scale-") as work:
        for n in sizes:
            location = str(Path(work) / f"store-{n}")
            total = round(n / (1 - args.test_share))
            run_child(PREPARE, location, str(total), str(args.cols))
            for name in args.classifiers.split(","):
                figures = run_child(FIT, location, name, str(args.test_share))
                print(json.dumps(figures), flush=True)
                if name == "svm":
                    svm_times.append(figures["seconds"])
                    svm_fit_times.append(figures["fit_seconds"])
    if len(svm_times) >= 2:
        measured = np.log(sizes[: len(svm_times)])
        fit_slope = np.polyfit(measured, np.log(svm_fit_times), 1)[0]
        slope, intercept = np.polyfit(measured, np.log(svm_times), 1)
        print(f"svm grid fit seconds ~ n^{fit_slope:.2f}")
        print(f"svm load + fit + predict seconds ~ {np.exp(intercept):.3g} * n^{slope:.2f}")
        options = resolve_options("svm", None)
        for n in (int(v) for v in args.extrapolate.split(",")):
            t = round(n * args.test_share / (1 - args.test_share))
            shape = plan.Shape(n, t, n + t, args.cols, 4)
            print(
                json.dumps(
                    {
                        "n_train": n,
                        "svm_seconds_extrapolated": round(float(np.exp(intercept) * n**slope)),
                        "svm_planned_gib": round(plan.peak_bytes("svm", shape, options) / 2**30, 1),
                    }
                )
            )


if __name__ == "__main__":
    main()
