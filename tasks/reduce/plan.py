"""Memory planned, not discovered: the reduce stage's peak estimated from the shapes before
any fit, compared with the memory this process (and, on a cluster, each worker) may use, and the
PCA method chosen to fit.

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

On the workers (a distributed client is active: the passes run there, tasks/reduce/_passes.py),
the peak of ONE worker process with t threads (t tasks at once, each with its step block of
2 STEP: the rows as read and as scaled), P = panel rows = min(n, 1 GiB / 4 d), b as above,
w = 1.5 k + 10, and a merge holding SPLIT_EVERY + 1 = 3 partial sums (two inputs, one output):

    worker      = 1 GiB + max(fit, 4 k d + t 3 STEP (projection: the components on every
                  worker, a block and its projected rows per task))
    covariance  fit = t (2 STEP + 24 d^2): per task a merge of 3 (d, d) float64 partials (a
                  step's float32 product and its float64 copy, 12 d^2, is less); "gram" when
                  n >= d
    gram        fit = max(8 P d + 4 P^2 + t 3 STEP (the panel held as a future, once more while
                  it is concatenated, its self product, a block and its tile per task),
                  4 n k + t (2 STEP + 12 k d) (the weights on every worker, a merge of 3 (k, d)
                  partial components)); "gram" when n < d
    incremental fit = 16 b d + 4 b d (2 CHAIN_WINDOW + t) (an update's input state, its copied
                  (2b + 1) x d buffer and new directions; two windows of CHAIN_WINDOW batches
                  read ahead, as if on this one worker, and a raw copy of a batch per task)
    randomized  fit = 4 w d + t (3 STEP + 12 w d) (the basis on every worker; a merge of 3
                  (w, d) partials, a block and its product with the basis)

The worker limit is the smallest `memory_limit` the scheduler reports (0 = unlimited: no
check), t the largest thread count.

Rule for "auto": gram (exact, the fastest measured) when its estimate fits, else incremental
when it fits, else stop with one line naming a component count that would fit. "Fits" means
here and, on the worker path, on every worker. An explicitly chosen method that does not fit
stops the same way. The limit is `memory_limit` when given, else USABLE_SHARE of the smaller of
total RAM and the cgroup limit.
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
MERGE_HELD = 3  # = tasks.reduce._passes.SPLIT_EVERY + 1: a merge's inputs and its output
CHAIN_WINDOW = 4  # = tasks.reduce._passes.CHAIN_WINDOW (two windows of batches in flight)
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
class Workers:
    """What the scheduler says about the workers the passes will run on."""

    limit: int  # bytes of the smallest worker's memory_limit; 0 = unlimited
    threads: int  # the most threads one worker has (tasks it runs at once)
    count: int

    @property
    def detail(self) -> str:
        return f"the smallest memory_limit of {self.count} workers, {self.threads} threads at most"

    @property
    def source(self) -> str:
        return f"{_gib(self.limit) if self.limit else 'no limit'} ({self.detail})"


def workers_from(info: dict) -> Workers | None:
    """The workers in a `client.scheduler_info()` answer; None when it lists none."""
    workers = list(info.get("workers", {}).values())
    if not workers:
        return None
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    return Workers(
        min((x for x in limits if x), default=0),  # tasks may land on the smallest
        max(int(w.get("nthreads") or 1) for w in workers),
        len(workers),
    )


@dataclass(frozen=True)
class Plan:
    """The chosen method, its estimated peaks and the limits they were compared with."""

    requested: str
    method: str
    k: int  # components expected
    peak: int  # bytes, for `method`, in this process
    limit: int  # bytes
    limit_source: str
    fits: bool
    estimates: dict[str, int]
    workers: Workers | None = None  # None: no distributed client, the passes run here
    worker_estimates: dict[str, int] | None = None  # bytes per worker, by method

    @property
    def worker_peak(self) -> int | None:
        return None if self.worker_estimates is None else self.worker_estimates[self.method]

    def describe(self, shape: Shape) -> str:
        """One line for the log: what was chosen, by which rule, with the figures."""
        rule = (
            "rule: gram when it fits, else incremental, else stop"
            if self.requested == "auto"
            else "as requested"
        )
        on_workers = (
            ""
            if self.workers is None
            else f"; about {_gib(self.worker_peak)} per worker of {self.workers.source}"
        )
        return (
            f"PCA plan: {self.requested} -> {self.method} for {shape.n:,} x {shape.d:,} "
            f"training rows, about {_gib(self.peak)} expected (up to {self.k:,} components) of "
            f"{_gib(self.limit)} ({self.limit_source}){on_workers}; {rule}"
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


def sketch_columns(shape: Shape, k: int) -> int:
    """w: the randomized sketch's width for k components."""
    return min(int(1.5 * k) + 10, min(shape.n, shape.d))


def panel_rows(shape: Shape) -> int:
    """P: rows of one Gram panel (tasks/reduce/_gram.py's default, PANEL bytes)."""
    return min(shape.n, max(1, PANEL // (4 * shape.d)))


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
        width = sketch_columns(shape, k)
        return common + 4 * k * d + 12 * width * d + 16 * n * width
    raise ValueError(f"unknown PCA method {method!r}")


def worker_peak_bytes(method: str, shape: Shape, k: int, threads: int, fixed: bool = False) -> int:
    """Estimated peak of one worker process with `threads` threads running the passes of
    `method` (formulas in the module docstring)."""
    n, d, t = shape.n, shape.d, threads
    block = 2 * STEP
    if method == "gram" and n >= d:  # the covariance side (tasks/reduce/_covariance.py)
        fit = t * (block + MERGE_HELD * 8 * d * d)
    elif method == "gram":
        p = panel_rows(shape)
        tiles = 2 * 4 * p * d + 4 * p * p + t * (block + STEP)
        components = 4 * n * k + t * (block + MERGE_HELD * 4 * k * d)
        fit = max(tiles, components)
    elif method == "incremental":
        b = incremental_batch(n, k, fixed)
        fit = 16 * b * d + 4 * b * d * (2 * CHAIN_WINDOW + t)
    elif method == "randomized":
        w = sketch_columns(shape, k)
        fit = 4 * w * d + t * (block + STEP + MERGE_HELD * 4 * w * d)
    else:
        raise ValueError(f"unknown PCA method {method!r}")
    projection = 4 * k * d + t * (block + STEP)
    return OVERHEAD + max(fit, projection)


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


def _fits(
    method: str, shape: Shape, k: int, fixed: bool, limit: int, workers: Workers | None
) -> bool:
    """Whether `method` fits here and, when the passes run on workers, on each of them."""
    if peak_bytes(method, shape, k, fixed) > limit:
        return False
    if workers is None or not workers.limit:
        return True
    return worker_peak_bytes(method, shape, k, workers.threads, fixed) <= workers.limit


def plan(
    shape: Shape,
    method: str,
    variance: float,
    components: int | None,
    limit: int,
    limit_source: str = "the limit",
    workers: Workers | None = None,
) -> Plan:
    """Choose the method for `method` ("auto" or a name) and say whether it fits `limit` and
    the `workers` the passes run on (None: no distributed client, they run here).

    Never raises: `check` turns a plan that does not fit into the one-line error.
    """
    k = expected_components(shape, variance, components)
    fixed = components is not None
    candidates = AUTO_ORDER if method == "auto" else (method,)
    estimates = {name: peak_bytes(name, shape, k, fixed) for name in candidates}
    per_worker = (
        None
        if workers is None
        else {
            name: worker_peak_bytes(name, shape, k, workers.threads, fixed) for name in candidates
        }
    )
    fitting = [name for name in candidates if _fits(name, shape, k, fixed, limit, workers)]
    chosen = fitting[0] if fitting else candidates[-1]
    return Plan(
        method,
        chosen,
        k,
        estimates[chosen],
        limit,
        limit_source,
        bool(fitting),
        estimates,
        workers,
        per_worker,
    )


def largest_fitting_count(
    shape: Shape, limit: int, methods: tuple[str, ...], workers: Workers | None = None
) -> tuple[int, str]:
    """The most components (and the method) that fit `limit` (and the workers) with a fixed
    count; (0, "") if not even one does."""
    top = max(1, min(shape.n - 1, shape.d))
    best = (0, "")
    for method in methods:
        low, high = 0, top
        while low < high:  # peaks grow with k: bisect for the last count that fits
            mid = (low + high + 1) // 2
            if _fits(method, shape, mid, True, limit, workers):
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
    workers = plan_.workers if plan_.workers is not None and plan_.workers.limit else None
    needs = " and ".join(
        f"{_gib(v)} with {name}"
        + ("" if workers is None else f" ({_gib(plan_.worker_estimates[name])} per worker)")
        for name, v in plan_.estimates.items()
    )
    cut = (
        f"{components:,} components"
        if components is not None
        else f"variance {variance} (expecting up to {plan_.k:,} components)"
    )
    where, more = [], []
    if any(value > plan_.limit for value in plan_.estimates.values()):
        where.append(f"the {_gib(plan_.limit)} this process may use ({plan_.limit_source})")
        more.append("a larger --memory-limit")
    if workers is not None and any(v > workers.limit for v in plan_.worker_estimates.values()):
        where.append(f"the {_gib(workers.limit)} per worker ({workers.detail})")
        more.append("workers with more memory")
    count, method = largest_fitting_count(shape, plan_.limit, ("gram", "incremental"), workers)
    more = " or ".join(more)
    if count:
        flag = "" if method == "gram" else " with --pca-method incremental"
        advice = f"use --components {count} or fewer{flag}, or {more}"
    else:
        advice = (
            "not even one component fits: use a machine with more memory or fewer rows"
            if workers is None
            else "not even one component fits: use workers with more memory or fewer rows"
        )
    raise MemoryPlanError(
        f"PCA of {shape.n:,} x {shape.d:,} training rows at {cut} would need about {needs}, "
        f"more than {' or '.join(where)}; {advice}"
    )


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"
