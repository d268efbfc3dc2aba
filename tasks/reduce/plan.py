"""The reduce stage planned before any fit: each PCA method's time and peak memory estimated
from the shapes, the number of workers and the memory limits, and the method chosen.

A pure function of shapes and settings (nothing is read or allocated), so the decision for
1,000,000 x 200,704 rows on 64 workers can be tested on any machine.

Peak estimate in bytes (n training rows, N rows projected, d features, k components, m =
min(n, d), STEP = the streaming step, 32 MiB):

    common      = 1 GiB (interpreter, libraries, Dask) + 4 STEP (blocks in flight)
                  + 4 N k (the projected rows)
    gram        = common + 4 k d (components) + 16 m^2 (the float64 Gram or covariance matrix
                  and eigh's eigenvectors) + 4 P d (one panel of P rows when n < d, 1 GiB at
                  most)
    incremental = common + 12 b d (the (2b + 1) x d update buffer and the b x d directions it
                  returns; the k components are the first of those b), b the batch (=
                  directions kept): max(256, k) for a fixed count, never more than n
    randomized  = common + 4 k d + 12 w d (basis, its (w, d) sum A V and the QR's copy, w =
                  k + max(10, k / 2) sketch columns); nothing grows with n (the sketch's
                  Gram is the (w, w) Rayleigh quotient, tasks/reduce/_randomized.py)

Variance targets. k is not known before the fit. Incremental and randomized grow their batch
or sketch by doubling until the cut fits, so their memory is planned at their first size (batch
256, sketch 192) and the fit is told the largest size that fits (`Plan.cap`): it stops growing
there and says in one line what share of the variance it reached. For gram, and for every
method's time, k is EXPECTED: min(n - 1, d, K_COEF n^K_EXP) up to a 0.8 target, fitted to the
blood cells' block3_pool counts (1,077 components for 0.8 of 2,700 rows, 1,932 of 7,467;
benchmarks/README.md), and min(n - 1, d) above 0.8 (no measurement: assume the worst).

Time estimate in seconds, from constants measured on one thread (benchmarks/reduce_constants.py,
benchmarks/README.md): FLOPS (float32 products), EIGH (s per m^3), QR (s per w^2 d), READ
(bytes/s of rows read, decompressed and scaled). One read R = 4 n d / (READ L) with L lanes
(threads) reading; products spread over L lanes unless sequential:

    gram        n < d: (2 + (panels + 1) / 2) R + n^2 d / (FLOPS L) + EIGH n^3 / C
                       + 2 n k d / (FLOPS L);  n >= d: 2 R + n d^2 / (FLOPS L) + EIGH d^3 / C
    incremental R + sum over the batches b it tries (256, 512, ... up to the one holding k):
                  R + 12 n b d / (FLOPS S) + (n / b) EIGH (2b + 1)^3 / S
    randomized  R + sum over the sketch widths w it tries (192, 384, ...; one for a fixed
                  count): (POWER_ITERATIONS + 1) (R + 4 n d w / (FLOPS L))
                  + (POWER_ITERATIONS QR w^2 d + 2 w^2 d / FLOPS + EIGH w^3) / C

Lanes: without a cluster (Dask threads here) L = the cores reading and cores - 1 multiplying
(one left to read), S = C = cores - 1; on K workers of t threads L = K t, the incremental chain
runs one task at a time (S = 1), and the dense steps (eigh, QR) run here (C = cores - 1).
The projection costs every method the same and is left out.

On the workers (a distributed client is active: the passes run there, tasks/reduce/_passes.py),
the peak of ONE worker process with t threads (t tasks at once, each with its step block of
2 STEP: the rows as read and as scaled), P = panel rows = min(n, 1 GiB / 4 d), b and w as
above, and a merge holding SPLIT_EVERY + 1 = 3 partial sums (two inputs, one output):

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

Rule for "auto": the method with the smallest time estimate among those whose memory fits
(here and, on the worker path, on every worker), the first of gram (exact), incremental,
randomized among those within TIE_SECONDS of the smallest; if none fits, stop with one line naming a
component count that would fit. An explicitly chosen method that does not fit stops the same
way. The limit is `memory_limit` when given, else USABLE_SHARE of the smaller of total RAM and
the cgroup limit.
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
K_COEF, K_EXP = 11.6, 0.57  # expected k = K_COEF n^K_EXP for targets up to 0.8 (docstring)
AUTO_CANDIDATES = ("gram", "incremental", "randomized")  # exact first: it wins near-ties
TIE_SECONDS = 10.0  # estimates closer than this are a tie (the model is not that precise)
RANDOMIZED_START = 128  # = tasks.reduce._randomized.RANDOMIZED_START
POWER_ITERATIONS = 4  # = tasks.reduce._randomized.POWER_ITERATIONS
# Time model constants, one thread, measured by benchmarks/reduce_constants.py (the figures
# and the machine are in benchmarks/README.md, "Reduce time model")
FLOPS = 51e9  # float32 FLOP/s of a fold product (a step block times a (w, d) basis)
EIGH = 3.6e-10  # seconds per m^3 of top_eigh, every eigenpair of an (m, m) float64 matrix
QR = 1.6e-10  # seconds per w^2 d of the QR that orthonormalises a (w, d) basis
READ = 0.24e9  # bytes/s of float32 rows read from zstd Zarr, decompressed and scaled
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
    seconds: dict[str, float] | None = None  # estimated time, by method
    fitting: tuple[str, ...] | None = None  # the candidates whose memory fits
    cap: int | None = None  # for `method`: the largest batch or sketch that fits (growth)
    pass_counts: dict[str, int] | None = None  # expected passes over the rows, by method

    @property
    def passes(self) -> int:
        """The fit's expected passes over the training rows (`planned_passes`)."""
        return self.pass_counts[self.method]

    @property
    def worker_peak(self) -> int | None:
        return None if self.worker_estimates is None else self.worker_estimates[self.method]

    def describe(self, shape: Shape) -> str:
        """One line for the log: what was chosen, by which rule, with every candidate's
        estimated time and peak (here, and per worker on a cluster)."""
        rule = (
            "rule: the fastest estimate that fits, else stop"
            if self.requested == "auto"
            else "as requested"
        )
        where = (
            "here (Dask threads)"
            if self.workers is None
            else f"{_many(self.workers.count, 'worker')} x {_many(self.workers.threads, 'thread')}"
        )
        candidates = []
        for name, peak in self.estimates.items():
            per_worker = (
                ""
                if self.worker_estimates is None
                else f", {_gib(self.worker_estimates[name])} per worker"
            )
            fits = "" if self.fitting is None or name in self.fitting else " (does not fit)"
            time_ = "" if self.seconds is None else f"{_duration(self.seconds[name])}, "
            candidates.append(f"{name} {time_}{_gib(peak)}{per_worker}{fits}")
        of_workers = "" if self.workers is None else f"; workers: {self.workers.source}"
        return (
            f"PCA plan: {self.requested} -> {self.method} for {shape.n:,} x {shape.d:,} "
            f"training rows, {where}, up to {self.k:,} components expected; "
            f"{'; '.join(candidates)}; limit {_gib(self.limit)} ({self.limit_source})"
            f"{of_workers}; {rule}"
        )


def expected_components(shape: Shape, variance: float, components: int | None) -> int:
    """k the plan assumes (module docstring): the fixed count, else a share of the rows."""
    limit = max(1, min(shape.n - 1, shape.d))
    if components is not None:
        return min(components, limit)
    if variance <= 0.8:
        return min(limit, math.ceil(K_COEF * shape.n**K_EXP))
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
    """w: the randomized sketch's width for k components (tasks/reduce/_randomized.py's
    sketch_width, at most min(n, d))."""
    return min(k + max(10, k // 2), shape.n, shape.d)


def first_size(method: str, shape: Shape, k: int, fixed: bool) -> int:
    """The batch (incremental) or sketch width (randomized) a fit starts with: the one for k
    when the count is fixed, else the method's first (it grows from there)."""
    if method == "incremental":
        return incremental_batch(shape.n, k, True) if fixed else min(INCREMENTAL_START, shape.n)
    return sketch_columns(shape, k if fixed else RANDOMIZED_START)


def tried_sizes(method: str, shape: Shape, k: int, fixed: bool, cap: int | None) -> list[int]:
    """The batches (incremental) or sketch widths (randomized) a fit goes through to hold k
    components: one for a fixed count, else doubling from the first size, at most `cap`."""
    sizes = [first_size(method, shape, k, fixed)]
    enough = (
        incremental_batch(shape.n, k, fixed)
        if method == "incremental"
        else sketch_columns(shape, k)
    )
    top = min(enough if cap is None else min(enough, cap), shape.n, shape.d)
    while sizes[-1] < top:
        sizes.append(min(2 * sizes[-1], top))
    return sizes


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
        return common + 12 * first_size(method, shape, k, fixed) * d
    if method == "randomized":
        width = first_size(method, shape, k, fixed)
        return common + 4 * min(k, width) * d + 12 * width * d
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
        b = first_size(method, shape, k, fixed)
        fit = 16 * b * d + 4 * b * d * (2 * CHAIN_WINDOW + t)
    elif method == "randomized":
        w = first_size(method, shape, k, fixed)
        fit = 4 * w * d + t * (block + STEP + MERGE_HELD * 4 * w * d)
    else:
        raise ValueError(f"unknown PCA method {method!r}")
    projection = 4 * k * d + t * (block + STEP)
    return OVERHEAD + max(fit, projection)


@dataclass(frozen=True)
class Lanes:
    """Threads that do each kind of work (module docstring: L, S, C)."""

    read: int  # threads reading, decompressing and scaling blocks
    products: int  # threads multiplying blocks in a parallel pass
    chain: int  # threads of the incremental chain's sequential updates
    client: int  # BLAS threads of this process's dense steps (eigh, QR)

    @classmethod
    def of(cls, workers: Workers | None, cores: int) -> Lanes:
        here = max(1, cores - 1)  # tasks/reduce/_stream.py's client_blas_threads
        if workers is None:
            return cls(cores, here, here, here)
        spread = workers.count * workers.threads
        return cls(spread, spread, 1, here)


def planned_passes(method: str, shape: Shape, k: int, fixed: bool, cap: int | None) -> int:
    """Passes over the n training rows the fit is expected to make (the reads R of the time
    formulas, rounded up): what the stage's progress counts against."""
    if method == "gram" and shape.n >= shape.d:
        return 2
    if method == "gram":
        return math.ceil(2 + (math.ceil(shape.n / panel_rows(shape)) + 1) / 2)
    per_size = 1 if method == "incremental" else POWER_ITERATIONS + 1
    return 1 + per_size * len(tried_sizes(method, shape, k, fixed, cap))


def estimated_seconds(
    method: str, shape: Shape, k: int, fixed: bool, lanes: Lanes, cap: int | None = None
) -> float:
    """Estimated time of the fit with `method` (formulas in the module docstring)."""
    n, d = shape.n, shape.d
    read = 4 * n * d / (READ * lanes.read)
    if method == "gram" and n >= d:
        return 2 * read + n * d * d / (FLOPS * lanes.products) + EIGH * d**3 / lanes.client
    if method == "gram":
        panels = math.ceil(n / panel_rows(shape))
        products = (n * n * d + 2 * n * k * d) / (FLOPS * lanes.products)
        return (2 + (panels + 1) / 2) * read + products + EIGH * n**3 / lanes.client
    total = read  # the column statistics
    for size in tried_sizes(method, shape, k, fixed, cap):
        if method == "incremental":
            chain = 12 * n * size * d / FLOPS + n / size * EIGH * (2 * size + 1) ** 3
            total += read + chain / lanes.chain
        else:
            dense = POWER_ITERATIONS * QR * size**2 * d + 2 * size**2 * d / FLOPS
            product = 4 * n * d * size / (FLOPS * lanes.products)
            total += (POWER_ITERATIONS + 1) * (read + product)
            total += (dense + EIGH * size**3) / lanes.client
    return total


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
    cores: int | None = None,
) -> Plan:
    """Choose the method for `method` ("auto" or a name) and say whether it fits `limit` and
    the `workers` the passes run on (None: no distributed client, they run here, on `cores`
    cores, default this machine's).

    Never raises: `check` turns a plan that does not fit into the one-line error.
    """
    k = expected_components(shape, variance, components)
    fixed = components is not None
    lanes = Lanes.of(workers, cores or os.cpu_count() or 1)
    candidates = AUTO_CANDIDATES if method == "auto" else (method,)
    estimates = {name: peak_bytes(name, shape, k, fixed) for name in candidates}
    per_worker = (
        None
        if workers is None
        else {
            name: worker_peak_bytes(name, shape, k, workers.threads, fixed) for name in candidates
        }
    )
    caps = {name: _cap(name, shape, fixed, limit, workers) for name in candidates}
    times = {name: estimated_seconds(name, shape, k, fixed, lanes, caps[name]) for name in caps}
    fitting = tuple(name for name in candidates if _fits(name, shape, k, fixed, limit, workers))
    fastest = min(times[name] for name in fitting or candidates)
    chosen = next(n for n in fitting or candidates if times[n] <= fastest + TIE_SECONDS)
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
        times,
        fitting,
        caps[chosen],
        {name: planned_passes(name, shape, k, fixed, caps[name]) for name in caps},
    )


def _cap(method: str, shape: Shape, fixed: bool, limit: int, workers: Workers | None) -> int | None:
    """For a method that grows toward a variance target: the largest batch or sketch that
    fits (the fit stops growing there); None otherwise."""
    if fixed or method == "gram":
        return None
    count, _ = largest_fitting_count(shape, limit, (method,), workers)
    return first_size(method, shape, max(count, 1), True)


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


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _duration(value: float) -> str:
    return f"{value:,.0f} s" if value < 2 * 3600 else f"{value / 3600:,.1f} h"
