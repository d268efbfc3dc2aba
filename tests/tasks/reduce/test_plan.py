"""The memory plan: a pure function of shapes, so decisions for sizes this machine could never
fit are tested without allocating anything."""

from __future__ import annotations

import re

import pytest

from tasks.reduce._passes import CHAIN_WINDOW, SPLIT_EVERY
from tasks.reduce._randomized import POWER_ITERATIONS, RANDOMIZED_START, sketch_width
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
    sketch_columns,
    worker_peak_bytes,
    workers_from,
)
from tasks.reduce.plan import POWER_ITERATIONS as PLAN_POWER
from tasks.reduce.plan import RANDOMIZED_START as PLAN_START

BLOCK3 = 200_704


def test_60000_block3_rows_with_too_many_components_stop_with_advice_that_fits() -> None:
    shape = Shape(n=60_000, d=BLOCK3, rows=80_000)
    chosen = plan(shape, "auto", 0.8, 20_000, 24 * GiB, "test")
    assert not chosen.fits and min(chosen.estimates.values()) > 24 * GiB
    with pytest.raises(MemoryPlanError) as stopped:
        check(chosen, shape, 0.8, 20_000)
    message = str(stopped.value)
    assert "\n" not in message and "more than the 24.0 GiB" in message
    count = int(re.search(r"--components (\d+) or fewer with --pca-method incremental", message)[1])
    # the advice is the largest count that fits, and following it gives a plan that fits
    assert peak_bytes("incremental", shape, count, fixed=True) <= 24 * GiB
    assert peak_bytes("incremental", shape, count + 1, fixed=True) > 24 * GiB
    assert plan(shape, "auto", 0.8, count, 24 * GiB).fits


def test_auto_picks_the_fastest_estimate_that_fits() -> None:
    shape = Shape(n=60_000, d=BLOCK3, rows=80_000)
    small = plan(shape, "auto", 0.8, 500, 24 * GiB, cores=2)
    assert small.fitting == ("incremental", "randomized") and small.method == "incremental"
    big = plan(shape, "auto", 0.8, 500, 200 * GiB, cores=2)
    assert "gram" in big.fitting and big.method == "incremental"  # gram's n^3 eigh: 26 h
    assert big.seconds["gram"] > 10 * big.seconds["incremental"]
    narrow = Shape(n=9_957, d=1_280, rows=12_444)  # Lite0 avg_pool: the (d, d) side is small
    assert plan(narrow, "auto", 0.8, None, 2 * GiB, cores=2).method == "gram"


# The measured run (benchmarks/README.md, issue 17): 10,000 x 100,352 rows, 0.8 of the
# variance in 150 components; auto took gram (806 s), incremental took 103 s.
BLOCK4_10K = Shape(n=10_000, d=100_352, rows=10_000)
DEFAULT_LIMIT = int(0.8 * 23.5 * GiB)  # the default on the 24 GiB machine of those runs


def test_auto_picks_incremental_over_gram_at_10000_block4_rows() -> None:
    chosen = plan(BLOCK4_10K, "auto", 0.8, 150, DEFAULT_LIMIT, "test", cores=2)
    assert set(chosen.fitting) == {"gram", "incremental", "randomized"}
    assert chosen.method == "incremental"
    assert chosen.seconds["incremental"] < chosen.seconds["gram"] / 3
    line = chosen.describe(BLOCK4_10K)
    for name in ("gram", "incremental", "randomized"):  # every candidate's time and peak
        assert re.search(rf"{name} [\d,.]+ [sh], \d+\.\d GiB", line), line
    assert "\n" not in line


def test_a_variance_target_that_incremental_can_reach_is_not_refused() -> None:
    """40,000 block4_pool rows: incremental fitted them in 1.1 GB (0.8 in 154 components);
    the plan used to expect 0.4 n = 16,000 components and stop."""
    shape = Shape(n=40_000, d=100_352, rows=40_000)
    chosen = plan(shape, "auto", 0.8, None, DEFAULT_LIMIT, "test", cores=2)
    assert chosen.fits and chosen.method == "incremental"
    check(chosen, shape, 0.8, None)  # does not stop
    # the fit may grow its batch up to the cap, which fits; one more doubling would not
    assert peak_bytes("incremental", shape, chosen.cap, fixed=True) <= DEFAULT_LIMIT
    assert peak_bytes("incremental", shape, 2 * chosen.cap, fixed=True) > DEFAULT_LIMIT
    assert chosen.cap >= 8 * INCREMENTAL_START


MILLION = Shape(n=750_000, d=BLOCK3, rows=1_000_000)


def test_with_more_workers_auto_moves_to_randomized_whose_passes_divide() -> None:
    def chosen(count: int):
        workers = Workers(limit=24 * GiB, threads=2, count=count)
        return plan(MILLION, "auto", 0.8, 2_000, 64 * GiB, "test", workers, cores=2)

    one, sixteen = chosen(1), chosen(16)
    assert one.method == "incremental" and sixteen.method == "randomized"
    # incremental's chain is sequential: more workers barely help it
    assert sixteen.seconds["incremental"] > 0.9 * one.seconds["incremental"]
    assert sixteen.seconds["randomized"] < one.seconds["randomized"] / 8


def test_randomized_memory_here_does_not_grow_with_the_rows() -> None:
    small = Shape(n=25_000, d=25_088, rows=25_000)
    for n in (100_000, 750_000):
        big = Shape(n=n, d=25_088, rows=25_000)  # same rows projected: the fit's share only
        for peak in (peak_bytes, lambda *a: worker_peak_bytes(*a[:3], 1, a[3])):
            assert peak("randomized", big, 500, True) == peak("randomized", small, 500, True)


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
    assert (PLAN_START, PLAN_POWER) == (RANDOMIZED_START, POWER_ITERATIONS)
    for k in (1, 100, 2_000):
        assert sketch_columns(Shape(10**6, 10**6, 1), k) == sketch_width(k)


def test_covariance_that_does_not_fit_a_worker_is_not_chosen() -> None:
    # here it fits: without a cluster the exact covariance side is a candidate
    assert "gram" in plan(WIDE, "auto", 0.8, 200, 64 * GiB).fitting
    chosen = plan(WIDE, "auto", 0.8, 200, 64 * GiB, "test", SMALL_WORKERS)
    # a merge of three (d, d) float64 partial sums alone is 14 GiB: more than a 4 GiB worker
    assert chosen.worker_estimates["gram"] >= 3 * 8 * WIDE.d**2 > SMALL_WORKERS.limit
    assert "gram" not in chosen.fitting and chosen.fits
    assert chosen.worker_peak <= SMALL_WORKERS.limit
    line = chosen.describe(WIDE)
    assert re.search(r"gram [\d,.]+ s, \d+\.\d GiB, 1\d\.\d GiB per worker \(does not fit\)", line)
    assert "workers: 4.0 GiB (the smallest memory_limit of 2 workers" in line


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


def test_unlimited_workers_change_no_memory_decision_but_are_reported() -> None:
    unlimited = Workers(limit=0, threads=2, count=3)
    for components in (None, 200):
        alone = plan(WIDE, "auto", 0.8, components, 64 * GiB)
        with_workers = plan(WIDE, "auto", 0.8, components, 64 * GiB, "test", unlimited)
        assert (with_workers.fitting, with_workers.fits) == (alone.fitting, alone.fits)
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
