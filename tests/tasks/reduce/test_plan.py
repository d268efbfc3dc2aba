"""The memory plan: a pure function of shapes, so decisions for sizes this machine could never
fit are tested without allocating anything."""

from __future__ import annotations

import re

import pytest

from tasks.reduce.plan import (
    GiB,
    MemoryPlanError,
    Shape,
    check,
    memory_limit,
    peak_bytes,
    plan,
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
