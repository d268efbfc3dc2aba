"""SVM grid search that computes each fold's kernel once and shares it across candidates.

GridSearchCV hands libsvm the raw rows for every candidate, so each of the grid's C values
recomputes the same kernel columns (row by row, far slower than one BLAS product). Here each
fold's dot products are one matrix product, every distinct kernel (kernel, gamma, degree,
coef0) is an elementwise function of them, and libsvm gets it precomputed. Candidates, fold
assignment, scores, ranking (rank, then first) and the final refit on all rows are
GridSearchCV's, so the selected parameters and the fitted model are the same.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid
from sklearn.svm import SVC

_KERNEL_PARAMS = ("kernel", "gamma", "degree", "coef0")
_KERNELS = ("linear", "poly", "rbf", "sigmoid")

KernelSpec = tuple[str, float | None, int | None, float | None]  # kernel, gamma, degree, coef0


@dataclass
class GridResult:
    """Per-candidate fold scores (GridSearchCV's split<i>_test_score) and the refit model."""

    candidates: list[dict[str, Any]]
    split_scores: np.ndarray  # (n_candidates, n_splits) accuracy on each held-out fold
    best_index: int
    model: SVC  # refit on all rows with the best candidate, as GridSearchCV.best_estimator_

    @property
    def mean_scores(self) -> np.ndarray:
        return self.split_scores.mean(axis=1)

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.candidates[self.best_index])


@dataclass
class _Fold:
    """One split's rows and dot products, from which every kernel of the grid is derived."""

    y_train: np.ndarray
    y_test: np.ndarray
    n_features: int
    variance: float  # X_train.var(), for gamma="scale"
    gram: np.ndarray  # X_train @ X_train.T
    cross: np.ndarray  # X_test @ X_train.T
    sq_train: np.ndarray  # squared norms of the training rows
    sq_test: np.ndarray


def _fold(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> _Fold:
    X_train, X_test = X[train], X[test]
    return _Fold(
        y[train],
        y[test],
        X.shape[1],
        float(X_train.var()),
        X_train @ X_train.T,
        X_test @ X_train.T,
        np.einsum("ij,ij->i", X_train, X_train),
        np.einsum("ij,ij->i", X_test, X_test),
    )


def _gamma(value: Any, fold: _Fold) -> float:
    """SVC's own resolution of gamma, on the fold's training rows."""
    if value == "scale":
        return 1.0 / (fold.n_features * fold.variance) if fold.variance != 0 else 1.0
    if value == "auto":
        return 1.0 / fold.n_features
    return float(value)


def _kernel_spec(params: dict[str, Any], fold: _Fold) -> KernelSpec:
    """The values that decide a candidate's kernel matrix on this fold (None where unused)."""
    kernel = params["kernel"]
    if kernel not in _KERNELS:
        raise ValueError(f"SVM grid kernel must be one of {_KERNELS}, got {kernel!r}")
    gamma = None if kernel == "linear" else _gamma(params["gamma"], fold)
    degree = int(params["degree"]) if kernel == "poly" else None
    coef0 = float(params["coef0"]) if kernel in ("poly", "sigmoid") else None
    return kernel, gamma, degree, coef0


def _kernel(spec: KernelSpec, dots: np.ndarray, sq_rows: np.ndarray, sq_cols: np.ndarray):
    """libsvm's kernel formulas applied to precomputed dot products (svm.cpp, Kernel)."""
    kernel, gamma, degree, coef0 = spec
    if kernel == "linear":
        return dots
    if kernel == "rbf":  # exp(-gamma * (|a|^2 + |b|^2 - 2 a.b)), in place, libsvm's order
        values = np.add.outer(sq_rows, sq_cols)
        values -= 2.0 * dots
        values *= -gamma
        return np.exp(values, out=values)
    if kernel == "poly":
        return (gamma * dots + coef0) ** degree
    return np.tanh(gamma * dots + coef0)


def _score_group(
    base: SVC, fold: _Fold, spec: KernelSpec, group: list[tuple[int, dict[str, Any]]]
) -> list[tuple[int, float]]:
    """Fit every candidate sharing one kernel on a fold; accuracy on its held-out rows."""
    train_kernel = _kernel(spec, fold.gram, fold.sq_train, fold.sq_train)
    test_kernel = _kernel(spec, fold.cross, fold.sq_test, fold.sq_train)
    scores = []
    for index, params in group:
        rest = {key: value for key, value in params.items() if key not in _KERNEL_PARAMS}
        model = clone(base).set_params(**rest, kernel="precomputed")
        model.fit(train_kernel, fold.y_train)
        scores.append((index, float(model.score(test_kernel, fold.y_test))))
    return scores


def best_index(mean_scores: np.ndarray) -> int:
    """GridSearchCV's choice: the lowest rank of -mean (ties share the lowest), first wins."""
    return int(rankdata(-mean_scores, method="min").argmin())


def svm_grid_search(
    base: SVC,
    param_grid: dict[str, list] | list[dict[str, list]],
    X: np.ndarray,
    y: np.ndarray,
    splits: Iterable[tuple[np.ndarray, np.ndarray]],
    n_jobs: int | None = None,
) -> GridResult:
    """Score every candidate of `param_grid` on every split, pick the best, refit on all rows.

    Candidates sharing a kernel on a fold are fitted one after another on one precomputed
    kernel; (fold, kernel) groups run in `n_jobs` threads (libsvm and numpy release the GIL).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    candidates = list(ParameterGrid(param_grid))
    defaults = base.get_params()
    folds = [_fold(X, y, train, test) for train, test in splits]
    tasks: dict[tuple[int, KernelSpec], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for f, fold in enumerate(folds):
        for index, params in enumerate(candidates):
            spec = _kernel_spec({**defaults, **params}, fold)
            tasks[(f, spec)].append((index, params))
    split_scores = np.full((len(candidates), len(folds)), np.nan)
    workers = max(1, min(n_jobs or os.cpu_count() or 1, len(tasks)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="svm-grid") as pool:
        futures = [
            (f, pool.submit(_score_group, base, folds[f], spec, group))
            for (f, spec), group in tasks.items()
        ]
        for f, future in futures:
            for index, score in future.result():
                split_scores[index, f] = score
    del folds, futures
    best = best_index(split_scores.mean(axis=1))
    return GridResult(candidates, split_scores, best, refit(base, candidates[best], X, y))


def refit(base: SVC, params: dict[str, Any], X: np.ndarray, y: np.ndarray) -> SVC:
    """The SVC that `clone(base).set_params(**params).fit(X, y)` gives, fitted faster.

    libsvm is fitted on the precomputed kernel of all rows, then its solution (dual
    coefficients, intercepts, support indices) is carried into an SVC with the real kernel,
    whose support vectors are the chosen rows: it predicts new rows like a direct fit.
    """
    X = np.asarray(X, dtype=np.float64)
    model = clone(base).set_params(**params)
    every = _fold(X, np.asarray(y), np.arange(len(X)), np.arange(0))
    settings = model.get_params()
    spec = _kernel_spec(settings, every)
    rest = {key: value for key, value in params.items() if key not in _KERNEL_PARAMS}
    fitted = clone(base).set_params(**rest, kernel="precomputed")
    fitted.fit(_kernel(spec, every.gram, every.sq_train, every.sq_train), y)
    model.__dict__.update(
        {name: value for name, value in vars(fitted).items() if name not in vars(model)}
    )
    model.support_vectors_ = X[fitted.support_]
    model.shape_fit_ = X.shape
    model.n_features_in_ = X.shape[1]
    model._gamma = _gamma(settings["gamma"], every)
    return model
