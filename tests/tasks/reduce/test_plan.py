"""The memory plan: a pure function of shapes, so decisions for sizes this machine could never
fit are tested without allocating anything."""

from __future__ import annotations

import re

import pytest

from tasks.reduce._passes import CHAIN_WINDOW, SPLIT_EVERY
from tasks.reduce.incremental import INCREMENTAL_BATCH
from tasks.reduce.plan import CHAIN_WINDOW as PLAN_CHAIN_WINDOW
from tasks.reduce.plan import (
    INCREMENTAL_START,
    MERGE_HELD,
    GiB,
    MemoryPlanError,
    Shape,
    Workers,
    check,
    memory_limit,
    peak_bytes,
    plan,
    worker_peak_bytes,
    workers_from,
)

BLOCK3 = 200_704


def test_60000_block3_rows_with_a_variance_target_stop_with_advice_that_fits() -> None:
    shape = Shape(n=60_000, d=BLOCK3, rows=80_000)
    chosen = plan(shape, "auto", 0.8, None, 24 * GiB, "test")
    assert not chosen.fits and chosen.estimates["gram"] > 24 * GiB
    with pytest.raises(MemoryPlanError) as stopped:
        check(chosen, shape, 0.8, None)
    message = str(stopped.value)
    assert "\n" not in message and "more than the 24.0 GiB" in message
    count = int(re.search(r"--components (\d+) or fewer with --pca-method incremental", message)[1])
    # the advice is the largest count that fits, and following it gives a plan that fits
    assert peak_bytes("incremental", shape, count, fixed=True) <= 24 * GiB
    assert peak_bytes("incremental", shape, count + 1, fixed=True) > 24 * GiB
    advised = plan(shape, "auto", 0.8, count, 24 * GiB)
    assert advised.fits and advised.method == "incremental"


def test_auto_picks_gram_when_it_fits_and_incremental_when_only_that_fits() -> None:
    shape = Shape(n=60_000, d=BLOCK3, rows=80_000)
    assert plan(shape, "auto", 0.8, 500, 24 * GiB).method == "incremental"
    assert plan(shape, "auto", 0.8, 500, 200 * GiB).method == "gram"
    narrow = Shape(n=9_957, d=1_280, rows=12_444)  # Lite0 avg_pool: the (d, d) side is small
    assert plan(narrow, "auto", 0.8, None, 2 * GiB).method == "gram"


@pytest.mark.parametrize("n", [1_000, 7_467, 20_000, 60_000, 250_000])
@pytest.mark.parametrize("limit_gib", [4, 24, 128])
def test_gram_is_never_chosen_where_its_matrix_does_not_fit(n: int, limit_gib: int) -> None:
    for d in (1_280, 25_088, BLOCK3):
        shape = Shape(n=n, d=d, rows=n)
        for components in (None, 50):
            chosen = plan(shape, "auto", 0.8, components, limit_gib * GiB)
            m = min(n, d)
            if chosen.method == "gram":
                assert chosen.fits and 8 * m * m < limit_gib * GiB
            if chosen.fits:
                assert chosen.peak <= limit_gib * GiB


def test_an_explicit_method_that_does_not_fit_stops() -> None:
    shape = Shape(n=60_000, d=BLOCK3, rows=60_000)
    chosen = plan(shape, "gram", 0.8, 100, 24 * GiB)
    assert chosen.method == "gram" and not chosen.fits
    with pytest.raises(MemoryPlanError, match=r"with --pca-method incremental"):
        check(chosen, shape, 0.8, 100)


def test_memory_limit_setting_and_detection() -> None:
    assert memory_limit(12.5) == (int(12.5 * GiB), "--memory-limit")
    detected, source = memory_limit()
    assert 0 < detected and ("RAM" in source or "cgroup" in source)


# ------------------------------------------------------------------ the workers' peak
WIDE = Shape(n=30_000, d=25_088, rows=40_000)  # block5_pool wide, n >= d: the covariance side
SMALL_WORKERS = Workers(limit=4 * GiB, threads=1, count=2)


def test_the_plan_uses_the_passes_constants() -> None:
    assert MERGE_HELD == SPLIT_EVERY + 1
    assert PLAN_CHAIN_WINDOW == CHAIN_WINDOW
    assert INCREMENTAL_START == INCREMENTAL_BATCH


def test_covariance_that_does_not_fit_a_worker_is_not_chosen() -> None:
    # here it fits: without a cluster auto picks the exact covariance side
    assert plan(WIDE, "auto", 0.8, 200, 64 * GiB).method == "gram"
    chosen = plan(WIDE, "auto", 0.8, 200, 64 * GiB, "test", SMALL_WORKERS)
    # a merge of three (d, d) float64 partial sums alone is 14 GiB: more than a 4 GiB worker
    assert chosen.worker_estimates["gram"] >= 3 * 8 * WIDE.d**2 > SMALL_WORKERS.limit
    assert chosen.method == "incremental" and chosen.fits
    assert chosen.worker_peak <= SMALL_WORKERS.limit
    assert re.search(r"about 1\.\d GiB per worker of 4\.0 GiB", chosen.describe(WIDE))


def test_a_method_too_big_for_the_workers_stops_with_advice_that_fits_them() -> None:
    chosen = plan(WIDE, "gram", 0.8, 200, 64 * GiB, "test", SMALL_WORKERS)
    assert not chosen.fits
    with pytest.raises(MemoryPlanError) as stopped:
        check(chosen, WIDE, 0.8, 200)
    message = str(stopped.value)
    assert "\n" not in message and "more than the 4.0 GiB per worker" in message
    assert "this process" not in message  # it fits here: only the workers are too small
    count = int(re.search(r"--components (\d+) or fewer with --pca-method incremental", message)[1])
    advised = plan(WIDE, "incremental", 0.8, count, 64 * GiB, "test", SMALL_WORKERS)
    assert advised.fits
    assert not plan(WIDE, "incremental", 0.8, count + 1, 64 * GiB, "test", SMALL_WORKERS).fits


def test_unlimited_workers_change_nothing_but_are_reported() -> None:
    unlimited = Workers(limit=0, threads=2, count=3)
    for components in (None, 200):
        alone = plan(WIDE, "auto", 0.8, components, 64 * GiB)
        with_workers = plan(WIDE, "auto", 0.8, components, 64 * GiB, "test", unlimited)
        assert (with_workers.method, with_workers.fits) == (alone.method, alone.fits)
        assert alone.worker_peak is None and with_workers.worker_peak > 0
    assert "no limit" in with_workers.describe(WIDE)


def test_workers_from_the_schedulers_answer() -> None:
    info = {
        "workers": {
            "a": {"memory_limit": 8 * GiB, "nthreads": 2},
            "b": {"memory_limit": 0, "nthreads": 4},  # unlimited
            "c": {"memory_limit": 6 * GiB, "nthreads": 1},
        }
    }
    assert workers_from(info) == Workers(limit=6 * GiB, threads=4, count=3)
    assert workers_from({"workers": {}}) is None


def test_worker_peaks_grow_with_threads_and_components() -> None:
    for method in ("gram", "incremental", "randomized"):
        for shape in (WIDE, Shape(n=9_957, d=BLOCK3, rows=12_444)):
            low = worker_peak_bytes(method, shape, 100, 1, fixed=True)
            assert worker_peak_bytes(method, shape, 100, 4, fixed=True) > low
            assert worker_peak_bytes(method, shape, 2_000, 1, fixed=True) >= low
