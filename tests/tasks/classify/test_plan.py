"""The classify stage's plan: handovers to sgd by row count and by memory, none below either,
and an svm estimate that covers what the grid really allocates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from tasks.classify.models import resolve_options
from tasks.classify.plan import (
    LIBSVM_CACHE,
    OVERHEAD,
    ClassifyPlanError,
    Shape,
    peak_bytes,
    plan_classifiers,
    svm_threads,
)
from tasks.classify.svm_grid import svm_grid_search

NAMES = ("svm", "logreg", "knn", "sgd")
OPTIONS = {name: resolve_options(name, None) for name in NAMES}
SHAPE = Shape(n=3000, t=1000, rows=4000, k=200, classes=4)
ROOMY = 2**50  # a limit nothing reaches


def test_svm_hands_over_above_the_row_threshold_only() -> None:
    above = plan_classifiers(["svm", "logreg"], SHAPE, OPTIONS, ROOMY, "test", svm_max_rows=2999)
    assert above.run == ["sgd", "logreg"]
    assert [h.classifier for h in above.handovers] == ["svm"]
    line = above.handovers[0].line()
    assert (
        line.startswith("svm hands over to sgd") and "3,000 training rows > --svm-max-rows" in line
    )
    at = plan_classifiers(["svm", "logreg"], SHAPE, OPTIONS, ROOMY, "test", svm_max_rows=3000)
    assert at.run == ["svm", "logreg"] and at.handovers == []
    assert at.in_memory == ["svm", "logreg"] and above.in_memory == ["logreg"]


def test_what_does_not_fit_hands_over_and_what_fits_stays() -> None:
    svm, logreg, sgd = (peak_bytes(name, SHAPE, OPTIONS[name]) for name in ("svm", "logreg", "sgd"))
    assert max(sgd, logreg) < svm
    limit = (max(sgd, logreg) + svm) // 2
    planned = plan_classifiers(["svm", "logreg"], SHAPE, OPTIONS, limit, "a test limit")
    assert planned.run == ["sgd", "logreg"]
    assert "planned >" in planned.handovers[0].reason
    assert "a test limit" in planned.handovers[0].reason


def test_several_handovers_run_sgd_once() -> None:
    big = Shape(n=30_000, t=10_000, rows=40_000, k=2_000, classes=4)
    limit = peak_bytes("sgd", big, OPTIONS["sgd"])  # only sgd fits
    planned = plan_classifiers(["svm", "sgd", "knn", "logreg"], big, OPTIONS, limit, "test")
    assert planned.run == ["sgd"]
    assert [h.classifier for h in planned.handovers] == ["svm", "knn", "logreg"]
    assert planned.in_memory == []


def test_stops_at_once_when_not_even_sgd_fits() -> None:
    limit = peak_bytes("sgd", SHAPE, OPTIONS["sgd"]) - 1
    with pytest.raises(ClassifyPlanError, match="even the streamed classifier needs about"):
        plan_classifiers(["svm"], SHAPE, OPTIONS, limit, "test")
    # a plan without a handover never needs sgd to fit
    assert plan_classifiers(["logreg"], SHAPE, OPTIONS, ROOMY, "test").run == ["logreg"]


def test_grid_threads_count_folds_times_distinct_kernels() -> None:
    # the notebook's grid: gamma auto and scale -> 2 kernels x 3 folds
    assert svm_threads(OPTIONS["svm"], cores=64) == 6
    assert svm_threads(OPTIONS["svm"], cores=2) == 2
    one_gamma = {**OPTIONS["svm"], "param_grid": {"C": [1, 10], "gamma": [0.1]}}
    assert svm_threads(one_gamma, cores=64) == 3


def test_svm_estimate_covers_the_grids_traced_peak() -> None:
    """numpy's allocations (tracemalloc sees them; libsvm's cache it does not) stay within the
    estimate's terms, and fill a good part of them: the formula is neither short nor loose."""
    rng = np.random.default_rng(0)
    n, k = 900, 40
    y = np.arange(n) % 4
    X = (rng.normal(size=(n, k)) + y[:, None]).astype(np.float32)
    opts = OPTIONS["svm"]
    folds = StratifiedKFold(n_splits=opts["cv_folds"], shuffle=True, random_state=0)
    tracemalloc.start()
    try:
        svm_grid_search(SVC(), opts["param_grid"], X, y, folds.split(X, y), n_jobs=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shape = Shape(n=n, t=0, rows=0, k=k, classes=4)  # the rows were not loaded by a stage
    threads = svm_threads(opts, cores=2)
    planned = peak_bytes("svm", shape, opts, cores=2) - OVERHEAD - threads * LIBSVM_CACHE
    assert 0.5 * planned < peak <= planned, (peak, planned)
    print(f"traced peak {peak:,} of {planned:,} planned bytes")
