"""Memory planned, not discovered: the reduce stage's peak estimated from the shapes before
any fit, compared with the memory this process may use, and the PCA method chosen to fit.

A pure function of shapes and settings (nothing is read or allocated), so the decision for
60,000 x 200,704 rows can be tested on any machine.

Peak estimate in bytes (n training rows, N rows projected, d features, k components, m =
min(n, d), STEP = the streaming step, 32 MiB):

    common      = 1 GiB (interpreter, libraries, Dask) + 4 STEP (blocks in flight)
                  + 4 N k (the projected rows)
    gram        = common + 4 k d (components) + 16 m^2 (the float64 Gram or covariance matrix
                  and eigh's eigenvectors) + 4 P d (one panel of P rows when n < d, 1 GiB at
                  most)
    incremental = common + 12 b d (the (2b + 1) x d update buffer and the b x d directions it
                  returns; the k components are the first of those b), where b, the batch and
                  the directions kept, is max(256, k) for a fixed count, and for a variance
                  target the first of 256, 512, 1024, ... that holds k (the fit doubles it until
                  the target is met), never more than n
    randomized  = common + 4 k d + 12 w d + 16 n w (basis, accumulator and RQ workspace of
                  w = 1.5 k + 10 columns; the (n, w) float64 sketch and its SVD)

Expected k: the fixed count when `--components` is given; for a variance target,
min(n - 1, d, ceil(0.4 n)) up to 0.8 (the largest share measured here: 1,077 components for 0.8
of 2,700 block3_pool rows, 1,932 of 7,467; benchmarks/README.md) and min(n - 1, d) above 0.8
(no measurement: assume the worst).

Rule for "auto": gram (exact, the fastest measured) when its estimate fits, else incremental
when it fits, else stop with one line naming a component count that would fit. An explicitly
chosen method that does not fit stops the same way. The limit is `memory_limit` when given,
else USABLE_SHARE of the smaller of total RAM and the cgroup limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError

GiB = 2**30
OVERHEAD = GiB
STEP = 32 * 2**20
PANEL = GiB
INCREMENTAL_START = 256  # = tasks.reduce.incremental.INCREMENTAL_BATCH
USABLE_SHARE = 0.8  # of detected memory: the OS, page cache and other processes need some
K_SHARE = 0.4  # expected components per training row for variance targets up to 0.8
AUTO_ORDER = ("gram", "incremental")
CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


class MemoryPlanError(UserError):
    """No PCA method fits the memory this process may use."""


@dataclass(frozen=True)
class Shape:
    n: int  # training rows (the fit)
    d: int  # features
    rows: int  # every row projected afterwards (train + test)


@dataclass(frozen=True)
class Plan:
    """The chosen method, its estimated peak and the limit it was compared with."""

    requested: str
    method: str
    k: int  # components expected
    peak: int  # bytes, for `method`
    limit: int  # bytes
    limit_source: str
    fits: bool
    estimates: dict[str, int]

    def describe(self, shape: Shape) -> str:
        """One line for the log: what was chosen, by which rule, with the figures."""
        rule = (
            "rule: gram when it fits, else incremental, else stop"
            if self.requested == "auto"
            else "as requested"
        )
        return (
            f"PCA plan: {self.requested} -> {self.method} for {shape.n:,} x {shape.d:,} "
            f"training rows, about {_gib(self.peak)} expected (up to {self.k:,} components) of "
            f"{_gib(self.limit)} ({self.limit_source}); {rule}"
        )


def expected_components(shape: Shape, variance: float, components: int | None) -> int:
    """k the plan assumes (module docstring): the fixed count, else a share of the rows."""
    limit = max(1, min(shape.n - 1, shape.d))
    if components is not None:
        return min(components, limit)
    if variance <= 0.8:
        return min(limit, math.ceil(K_SHARE * shape.n))
    return limit


def incremental_batch(n: int, k: int, fixed: bool) -> int:
    """The batch (= directions kept) an incremental fit ends with for k components."""
    if fixed:
        batch = max(INCREMENTAL_START, k)
    else:
        batch = INCREMENTAL_START
        while batch < k:
            batch *= 2
    return min(batch, max(n, 1))


def peak_bytes(method: str, shape: Shape, k: int, fixed: bool = False) -> int:
    """Estimated peak of the reduce stage with `method` (formulas in the module docstring)."""
    n, d = shape.n, shape.d
    common = OVERHEAD + 4 * STEP + 4 * shape.rows * k
    if method == "gram":
        m = min(n, d)
        panel = min(n * d * 4, PANEL) if n < d else 0
        return common + 4 * k * d + 16 * m * m + panel
    if method == "incremental":
        return common + 12 * incremental_batch(n, k, fixed) * d
    if method == "randomized":
        width = min(int(1.5 * k) + 10, min(n, d))
        return common + 4 * k * d + 12 * width * d + 16 * n * width
    raise ValueError(f"unknown PCA method {method!r}")


def memory_limit(setting_gib: float | None = None) -> tuple[int, str]:
    """Bytes this process may plan for, and where that figure comes from."""
    if setting_gib is not None:
        return int(setting_gib * GiB), "--memory-limit"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    source = f"total RAM {_gib(total)}"
    for path in CGROUP_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < total:
            total, source = int(text), f"cgroup limit {_gib(int(text))}"
    return int(USABLE_SHARE * total), f"{USABLE_SHARE:.0%} of {source}"


def plan(
    shape: Shape,
    method: str,
    variance: float,
    components: int | None,
    limit: int,
    limit_source: str = "the limit",
) -> Plan:
    """Choose the method for `method` ("auto" or a name) and say whether it fits `limit`.

    Never raises: `check` turns a plan that does not fit into the one-line error.
    """
    k = expected_components(shape, variance, components)
    fixed = components is not None
    candidates = AUTO_ORDER if method == "auto" else (method,)
    estimates = {name: peak_bytes(name, shape, k, fixed) for name in candidates}
    fitting = [name for name in candidates if estimates[name] <= limit]
    chosen = fitting[0] if fitting else candidates[-1]
    return Plan(method, chosen, k, estimates[chosen], limit, limit_source, bool(fitting), estimates)


def largest_fitting_count(shape: Shape, limit: int, methods: tuple[str, ...]) -> tuple[int, str]:
    """The most components (and the method) that fit `limit` with a fixed count; (0, "") if
    not even one does."""
    top = max(1, min(shape.n - 1, shape.d))
    best = (0, "")
    for method in methods:
        low, high = 0, top
        while low < high:  # peak grows with k: bisect for the last count that fits
            mid = (low + high + 1) // 2
            if peak_bytes(method, shape, mid, fixed=True) <= limit:
                low = mid
            else:
                high = mid - 1
        if low > best[0]:
            best = (low, method)
    return best


def check(plan_: Plan, shape: Shape, variance: float, components: int | None) -> None:
    """Stop at once, with one line saying what would fit, when the plan does not fit."""
    if plan_.fits:
        return
    needs = " and ".join(f"{_gib(v)} with {name}" for name, v in plan_.estimates.items())
    cut = (
        f"{components:,} components"
        if components is not None
        else f"variance {variance} (expecting up to {plan_.k:,} components)"
    )
    count, method = largest_fitting_count(shape, plan_.limit, ("gram", "incremental"))
    if count:
        flag = "" if method == "gram" else " with --pca-method incremental"
        advice = f"use --components {count} or fewer{flag}, or a larger --memory-limit"
    else:
        advice = "not even one component fits: use a machine with more memory or fewer rows"
    raise MemoryPlanError(
        f"PCA of {shape.n:,} x {shape.d:,} training rows at {cut} would need about {needs}, "
        f"more than the {_gib(plan_.limit)} this process may use ({plan_.limit_source}); "
        f"{advice}"
    )


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"
