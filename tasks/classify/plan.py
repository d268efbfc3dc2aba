"""The classify stage planned before any fit: each classifier's peak memory from the shapes,
and the in-memory classifiers handed over to the streamed `sgd` where they would not fit.

A pure function of shapes and settings (nothing is read or allocated), like the reduce
stage's plan (tasks/reduce/plan.py, whose `memory_limit` gives the limit here too).

Peak estimate in bytes (n training rows, t test rows, N rows in the stored reduction, k
components, c classes; F folds with n_f = ceil(n (F - 1) / F) rows fitted in each; W grid
threads = min(cores, F x distinct kernels of the grid); B = sgd's buffer_mib):

    common  = 1 GiB (interpreter, libraries; tasks.reduce.plan.OVERHEAD)
    loaded  = 4 N k + 4 (n + t) k (every projected float32 row, then the train and test copies)
    svm     = common + loaded + 8 n k (float64 rows) + max(
                8 F n_f n (each fold's Gram and cross products, all folds held)
                + W (8 n_f (n + n_f) + 200 MiB) (per thread in flight: the fold's train and
                  test kernels, the RBF formula's temporary, libsvm's kernel cache),
                24 n^2 + 200 MiB (the refit on all rows: Gram, kernel, temporary, cache))
    logreg  = common + loaded + 8 n k + 16 n c (a float64 copy; lbfgs' per-row class terms)
    knn     = common + loaded + 8 n k + 1 GiB (scikit-learn's working_memory for distances)
    dense*  = common + loaded + 8 n k + 1 GiB (TensorFlow and Keras' copy of the rows)
    sgd     = common + 4 B MiB (the slices read and their concatenation, then the float64 copy
                partial_fit makes of it) + 2 C (one stored chunk of C bytes, compressed and
                decompressed: reads go one chunk column at a time) + 12 t c (predictions, scores)

The svm terms were checked against the peak RSS of `benchmarks/classify_scale.py` at several n.

Handover rule: an in-memory classifier whose estimate exceeds the limit, and the svm when n
is above `svm_max_rows` (its time grows about as n^2: the threshold's measurement is in
benchmarks/README.md), runs as `sgd` instead, once however many hand over; one log line and the
run report say which, why and what instead. If not even `sgd` fits, the stage stops at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from sklearn.model_selection import ParameterGrid

from tasks.errors import UserError
from tasks.reduce.plan import OVERHEAD, GiB

MiB = 2**20
LIBSVM_CACHE = 200 * MiB  # SVC's cache_size default, one per libsvm fit in flight
WORKING_MEMORY = GiB  # scikit-learn's working_memory (knn distances) / TensorFlow (dense)
STREAMED = "sgd"
STREAMED_COPIES = 4  # buffers alive at once in fit_streamed (docstring)
# Above this many training rows the RBF grid hands over to sgd (benchmarks/README.md).
SVM_MAX_ROWS = 20_000


class ClassifyPlanError(UserError):
    """Not even the streamed classifier fits the memory this process may use."""


@dataclass(frozen=True)
class Shape:
    n: int  # training rows
    t: int  # test rows
    rows: int  # rows of the stored reduction (all loaded by the in-memory path)
    k: int  # components
    classes: int
    chunk_bytes: int = 0  # one chunk of the stored projected rows


@dataclass(frozen=True)
class Handover:
    """One classifier replaced by the streamed one, and why."""

    classifier: str
    reason: str

    def line(self) -> str:
        return (
            f"{self.classifier} hands over to {STREAMED} (linear model trained out of core by "
            f"partial_fit over the stored rows): {self.reason}"
        )


@dataclass(frozen=True)
class ClassifyPlan:
    run: list[str]  # classifiers to fit, in order, after the handovers
    handovers: list[Handover]
    estimates: dict[str, int]  # bytes per requested classifier (and sgd when it runs)
    limit: int
    limit_source: str

    @property
    def in_memory(self) -> list[str]:
        """The classifiers that need the projected rows loaded whole."""
        return [name for name in self.run if name != STREAMED]

    def describe(self) -> str:
        """One line for the log and the report: the figures behind the handovers."""
        figures = ", ".join(f"{name} {_gib(v)}" for name, v in self.estimates.items())
        return f"classifier memory plan: {figures} of {_gib(self.limit)} ({self.limit_source})"


def svm_threads(options: dict[str, Any], cores: int | None = None) -> int:
    """The grid's threads: one per (fold, distinct kernel) task, at most one per core."""
    kernels = {
        (p.get("kernel", "rbf"), p.get("gamma", "scale"), p.get("degree", 3), p.get("coef0", 0.0))
        for p in ParameterGrid(options["param_grid"])
    }
    return max(1, min(cores or os.cpu_count() or 1, options["cv_folds"] * len(kernels)))


def peak_bytes(name: str, shape: Shape, options: dict[str, Any], cores: int | None = None) -> int:
    """Estimated peak of the classify stage with classifier `name` (module docstring)."""
    n, t, k, c = shape.n, shape.t, shape.k, shape.classes
    if name == STREAMED:
        buffers = int(STREAMED_COPIES * options["buffer_mib"] * MiB)
        return OVERHEAD + buffers + 2 * shape.chunk_bytes + 12 * t * c
    loaded = OVERHEAD + 4 * shape.rows * k + 4 * (n + t) * k + 8 * n * k
    if name == "svm":
        folds = options["cv_folds"]
        fitted = math.ceil(n * (folds - 1) / folds)
        threads = svm_threads(options, cores)
        grid = 8 * folds * fitted * n + threads * (8 * fitted * (n + fitted) + LIBSVM_CACHE)
        return loaded + max(grid, 24 * n * n + LIBSVM_CACHE)
    if name == "logreg":
        return loaded + 16 * n * c
    return loaded + WORKING_MEMORY  # knn and the dense heads


def plan_classifiers(
    names: list[str],
    shape: Shape,
    options: dict[str, dict[str, Any]],
    limit: int,
    limit_source: str,
    svm_max_rows: int = SVM_MAX_ROWS,
    cores: int | None = None,
) -> ClassifyPlan:
    """Which classifiers run, after handing over those that would not fit (rule above).

    `options` holds every name's resolved options. Raises ClassifyPlanError when the
    streamed classifier itself does not fit: nothing else could.
    """
    estimates = {name: peak_bytes(name, shape, options[name], cores) for name in names}
    handovers = []
    for name in names:
        if name == STREAMED:
            continue
        if estimates[name] > limit:
            reason = f"about {_gib(estimates[name])} planned > {_gib(limit)} ({limit_source})"
        elif name == "svm" and shape.n > svm_max_rows:
            reason = f"{shape.n:,} training rows > --svm-max-rows {svm_max_rows:,}"
        else:
            continue
        handovers.append(Handover(name, reason))
    handed = {h.classifier for h in handovers}
    run = list(dict.fromkeys(STREAMED if name in handed else name for name in names))
    if STREAMED in run:
        estimates[STREAMED] = peak_bytes(STREAMED, shape, options[STREAMED], cores)
        if estimates[STREAMED] > limit:
            raise ClassifyPlanError(
                f"even the streamed classifier needs about {_gib(estimates[STREAMED])}, more "
                f"than the {_gib(limit)} this process may use ({limit_source}); use a larger "
                "--memory-limit or a smaller sgd buffer_mib"
            )
    return ClassifyPlan(run, handovers, estimates, limit, limit_source)


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"
