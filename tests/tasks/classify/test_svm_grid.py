"""The shared-kernel SVM grid against scikit-learn's GridSearchCV on the same folds.

It must choose the same parameters, score every fold the same and refit the same model;
digits projected to 20 PCA components stand in for reduced features. Decision values are
compared within libsvm's stopping tolerance (tol=1e-3): BLAS sums the kernel's dot products
in another order than libsvm does, and a last-bit difference can move the solver's path.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import pairwise_kernels
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.svm import SVC

from tasks.classify.models import SVM_PARAM_GRID, train_and_evaluate
from tasks.classify.svm_grid import _fold, _kernel, _kernel_spec, best_index, refit, svm_grid_search

CLASS_NAMES = [str(d) for d in range(10)]
TOL = SVC().tol


@pytest.fixture(scope="module")
def projected() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X = PCA(20, random_state=0).fit_transform(X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)


def _reference(X, y, grid, seed: int) -> GridSearchCV:
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    return GridSearchCV(SVC(break_ties=True, random_state=seed), grid, cv=folds).fit(X, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_choice_scores_and_model_as_gridsearchcv(projected, seed: int) -> None:
    X_train, X_test, y_train, y_test = projected
    reference = _reference(X_train, y_train, SVM_PARAM_GRID, seed)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    ours = svm_grid_search(
        SVC(break_ties=True, random_state=seed),
        SVM_PARAM_GRID,
        X_train,
        y_train,
        folds.split(X_train, y_train),
        n_jobs=2,
    )

    assert ours.candidates == reference.cv_results_["params"]
    for split in range(3):
        assert np.array_equal(
            ours.split_scores[:, split], reference.cv_results_[f"split{split}_test_score"]
        )
    assert np.array_equal(ours.mean_scores, reference.cv_results_["mean_test_score"])
    assert ours.best_index == reference.best_index_
    assert ours.best_params == reference.best_params_
    assert np.array_equal(ours.model.predict(X_test), reference.predict(X_test))
    assert np.allclose(
        ours.model.decision_function(X_test), reference.decision_function(X_test), atol=TOL
    )
    assert ours.model.score(X_test, y_test) == reference.score(X_test, y_test)


def test_classifier_stage_matches_gridsearchcv(projected) -> None:
    X_train, X_test, y_train, y_test = projected
    reference = _reference(X_train, y_train, SVM_PARAM_GRID, seed=3)
    result = train_and_evaluate("svm", X_train, y_train, X_test, y_test, CLASS_NAMES, seed=3)

    assert result.best_params == reference.best_params_
    assert result.metrics["accuracy"] == reference.score(X_test, y_test)
    assert np.array_equal(result.y_pred, reference.predict(X_test))


def test_equal_means_pick_the_first_candidate(projected) -> None:
    """Two C values far past the margin give identical folds: GridSearchCV keeps the first."""
    X_train, _, y_train, _ = projected
    grid = {"C": [1e6, 1e7], "gamma": ["scale"]}
    reference = _reference(X_train, y_train, grid, seed=0)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    ours = svm_grid_search(SVC(), grid, X_train, y_train, folds.split(X_train, y_train))

    assert ours.mean_scores[0] == ours.mean_scores[1]
    assert ours.best_index == reference.best_index_ == 0
    assert best_index(np.array([0.5, 0.9, 0.7, 0.9])) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"C": 5, "gamma": "scale", "kernel": "rbf", "class_weight": "balanced"},
        {"C": 2, "gamma": "auto", "kernel": "rbf"},
        {"C": 0.5, "gamma": 0.05, "kernel": "rbf"},
        {"C": 1, "kernel": "linear"},
        {"C": 1, "kernel": "poly", "degree": 2, "gamma": "auto", "coef0": 1.0},
        {"C": 1, "kernel": "sigmoid", "gamma": 0.01, "coef0": 0.5},
    ],
)
def test_refit_equals_a_direct_fit(projected, params: dict) -> None:
    X_train, X_test, y_train, _ = projected
    base = SVC(break_ties=True, random_state=0)
    direct = SVC(break_ties=True, random_state=0, **params).fit(X_train, y_train)
    ours = pickle.loads(pickle.dumps(refit(base, params, X_train, y_train)))

    assert ours.get_params() == direct.get_params()
    assert np.array_equal(ours.support_, direct.support_)
    assert np.array_equal(ours.support_vectors_, direct.support_vectors_)
    assert ours._gamma == direct._gamma
    assert np.array_equal(ours.predict(X_test), direct.predict(X_test))
    assert np.allclose(ours.decision_function(X_test), direct.decision_function(X_test), atol=TOL)


@pytest.mark.parametrize(
    "params",
    [
        {"kernel": "rbf", "gamma": "scale"},
        {"kernel": "rbf", "gamma": "auto"},
        {"kernel": "linear"},
        {"kernel": "poly", "degree": 3, "gamma": "scale", "coef0": 0.5},
        {"kernel": "sigmoid", "gamma": "scale", "coef0": -1.0},
    ],
)
def test_fold_kernels_are_the_ones_svc_would_use(projected, params: dict) -> None:
    """gamma='scale' is resolved on each fold's training rows, as SVC.fit(X[train]) does."""
    X_train, _, y_train, _ = projected
    X = X_train.astype(np.float64)
    X[:40] *= 3.0  # the folds' variances differ from the whole set's
    for train, test in StratifiedKFold(n_splits=3, shuffle=True, random_state=0).split(X, y_train):
        fold = _fold(X, y_train, train, test)
        spec = _kernel_spec({**SVC().get_params(), **params}, fold)
        svc = SVC(**params).fit(X[train], y_train[train])
        extra = {"gamma": svc._gamma, "degree": svc.degree, "coef0": svc.coef0}
        extra = {k: v for k, v in extra.items() if k in params}
        expected = pairwise_kernels(X[train], metric=params["kernel"], **extra)
        expected_cross = pairwise_kernels(X[test], X[train], metric=params["kernel"], **extra)
        assert np.allclose(
            _kernel(spec, fold.gram, fold.sq_train, fold.sq_train), expected, rtol=1e-12, atol=1e-12
        )
        assert np.allclose(
            _kernel(spec, fold.cross, fold.sq_test, fold.sq_train),
            expected_cross,
            rtol=1e-12,
            atol=1e-12,
        )


def test_unknown_kernel_is_refused(projected) -> None:
    X_train, _, y_train, _ = projected
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        svm_grid_search(
            SVC(), {"kernel": ["precomputed"]}, X_train, y_train, folds.split(X_train, y_train)
        )
