"""Classifier stage on scikit-learn's digits: real fits, small enough to stay fast."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tasks.classify.models import (
    CLASSIFIERS,
    SVM_PARAM_GRID,
    classification_metrics,
    predict_scores,
    resolve_options,
    train_and_evaluate,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CLASS_NAMES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=0)


@pytest.mark.parametrize(("name", "min_accuracy"), [("svm", 0.9), ("logreg", 0.9), ("knn", 0.9)])
def test_sklearn_classifiers_beat_chance(digits, name: str, min_accuracy: float) -> None:
    X_train, X_test, y_train, y_test = digits
    result = train_and_evaluate(name, X_train, y_train, X_test, y_test, CLASS_NAMES, seed=0)

    assert result.metrics["accuracy"] > min_accuracy
    assert result.scores.shape == (len(y_test), 10)
    assert np.array_equal(result.y_pred, predict_scores(result.model, X_test)[0])
    assert np.array_equal(np.argmax(result.scores, axis=1), result.y_pred)
    assert np.asarray(result.confusion).sum() == len(y_test)
    assert set(result.metrics["per_class"]) == set(CLASS_NAMES)
    assert result.fit_seconds > 0 and result.predict_seconds > 0
    assert result.history is None


def test_svm_default_grid_and_custom_grid(digits) -> None:
    X_train, X_test, y_train, y_test = digits
    default = train_and_evaluate("svm", X_train, y_train, X_test, y_test, CLASS_NAMES)
    assert default.best_params["C"] in SVM_PARAM_GRID["C"]
    assert default.best_params["gamma"] in SVM_PARAM_GRID["gamma"]
    assert default.model.get_params()["C"] == default.best_params["C"]
    assert default.model.get_params()["gamma"] == default.best_params["gamma"]

    grid = {"C": [2.0], "gamma": ["scale"]}
    custom = train_and_evaluate(
        "svm",
        X_train,
        y_train,
        X_test,
        y_test,
        CLASS_NAMES,
        options={"param_grid": grid, "cv_folds": 2},
    )
    assert custom.best_params == {"C": 2.0, "gamma": "scale"}


def test_knn_uses_n_neighbors_option(digits) -> None:
    X_train, X_test, y_train, y_test = digits
    result = train_and_evaluate(
        "knn", X_train, y_train, X_test, y_test, CLASS_NAMES, options={"n_neighbors": 3}
    )
    assert result.model.n_neighbors == 3


def test_unknown_classifier_and_option_are_rejected(digits) -> None:
    X_train, X_test, y_train, y_test = digits
    with pytest.raises(ValueError, match="valid names: svm, logreg, knn, dense256, dense64bn"):
        train_and_evaluate("forest", X_train, y_train, X_test, y_test, CLASS_NAMES)
    with pytest.raises(ValueError, match="n_neighbours"):
        train_and_evaluate(
            "knn", X_train, y_train, X_test, y_test, CLASS_NAMES, options={"n_neighbours": 3}
        )


def test_labels_must_be_indices_into_class_names(digits) -> None:
    X_train, X_test, y_train, y_test = digits
    with pytest.raises(ValueError, match="y_train"):
        train_and_evaluate("knn", X_train, y_train, X_test, y_test, CLASS_NAMES[:5])


def test_class_absent_from_test_set_still_reported() -> None:
    metrics, confusion = classification_metrics(
        np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c"]
    )
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert confusion == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert metrics["accuracy"] == 0.75


def test_dense_head_trains_with_history(digits) -> None:
    X_train, X_test, y_train, y_test = digits
    result = train_and_evaluate(
        "dense64bn",
        X_train,
        y_train,
        X_test,
        y_test,
        CLASS_NAMES,
        options={"epochs": 4, "batch_size": 64},
        seed=1,
    )
    assert set(result.history) >= {"accuracy", "loss", "val_accuracy", "val_loss"}
    assert 1 <= len(result.history["loss"]) <= 4
    assert result.best_params["epochs_run"] == len(result.history["loss"])
    assert result.scores.shape == (len(y_test), 10)
    assert np.allclose(result.scores.sum(axis=1), 1.0, atol=1e-4)
    assert result.metrics["accuracy"] > 0.5
    assert np.array_equal(predict_scores(result.model, X_test)[0], result.y_pred)


def test_sklearn_classifiers_do_not_import_tensorflow() -> None:
    """The classify path must not pay the ~7 s TensorFlow import (checked in a fresh process)."""
    script = textwrap.dedent(
        """
        import sys
        from sklearn.datasets import load_digits
        from tasks.classify.models import train_and_evaluate
        X, y = load_digits(return_X_y=True)
        names = [str(d) for d in range(10)]
        for name in ("svm", "logreg", "knn"):
            train_and_evaluate(name, X[::2] / 16, y[::2], X[1::2] / 16, y[1::2], names)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "keras"}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_every_listed_classifier_has_options_and_unknown_names_are_refused() -> None:
    for name in CLASSIFIERS:
        assert isinstance(resolve_options(name, None), dict)
    with pytest.raises(ValueError, match="unknown classifier 'svn'; valid names: svm, logreg"):
        resolve_options("svn", None)
