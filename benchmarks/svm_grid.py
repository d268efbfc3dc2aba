"""Benchmark: the notebook's SVM grid, GridSearchCV vs the shared-kernel search, one run.

Both search the same grid (C in {5, 10, 15} x gamma in {auto, scale}, RBF, balanced classes)
over the same 3 stratified folds of synthetic rows shaped like PCA-reduced features, then
refit on all rows; the script prints both times, their ratio, and whether the selected
parameters, the fold scores and the held-out accuracy agree. The shared-kernel search runs
twice, on one thread and on --n-jobs threads, to show what running folds in parallel gives.

    .venv/bin/python -m benchmarks.svm_grid --rows 3000 --cols 1000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.svm import SVC

from tasks.classify.models import SVM_PARAM_GRID
from tasks.classify.svm_grid import svm_grid_search


def rows(n_rows: int, n_cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four overlapping classes (the blood cells' SVM reaches ~0.66), centred like PCA output."""
    X, y = make_classification(
        n_samples=n_rows,
        n_features=n_cols,
        n_informative=min(40, n_cols),
        n_redundant=0,
        n_classes=4,
        class_sep=0.6,
        flip_y=0.05,
        random_state=seed,
    )
    return X.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows searched (before the test)")
    parser.add_argument("--cols", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (default: all cores)")
    args = parser.parse_args()

    X, y = rows(args.rows + args.test_rows, args.cols, args.seed)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=args.test_rows, stratify=y, random_state=args.seed
    )
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=args.seed)
    base = SVC(break_ties=True, random_state=args.seed)

    began = time.perf_counter()
    search = GridSearchCV(base, SVM_PARAM_GRID, cv=folds).fit(X_train, y_train)
    reference_s = time.perf_counter() - began

    began = time.perf_counter()
    shared = svm_grid_search(
        base, SVM_PARAM_GRID, X_train, y_train, folds.split(X_train, y_train), args.n_jobs
    )
    shared_s = time.perf_counter() - began
    began = time.perf_counter()
    svm_grid_search(base, SVM_PARAM_GRID, X_train, y_train, folds.split(X_train, y_train), 1)
    one_thread_s = time.perf_counter() - began

    n_splits = folds.get_n_splits()
    reference_scores = np.column_stack(
        [search.cv_results_[f"split{i}_test_score"] for i in range(n_splits)]
    )
    figures = {
        "rows": args.rows,
        "cols": args.cols,
        "gridsearchcv_s": round(reference_s, 2),
        "shared_kernel_s": round(shared_s, 2),
        "ratio": round(shared_s / reference_s, 3),
        "shared_kernel_one_thread_s": round(one_thread_s, 2),
        "same_best_params": search.best_params_ == shared.best_params,
        "same_fold_scores": bool(np.array_equal(reference_scores, shared.split_scores)),
        "test_accuracy": [search.score(X_test, y_test), shared.model.score(X_test, y_test)],
        "mean_cv_accuracy": [round(float(s), 4) for s in shared.mean_scores],
        "best_params": shared.best_params,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
