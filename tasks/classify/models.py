"""Classifier stage: fit one named classifier on reduced features and evaluate it.

The features reaching this stage are already scaled and PCA-reduced, so every classifier
here but `sgd` works on in-memory numpy arrays; `sgd` (streamed.py) reads its rows a buffer at
a time, from an array here or from the store (`train_and_evaluate_streamed`). TensorFlow is
imported lazily, inside the dense-head code only: the scikit-learn path must start without
paying its ~7 s import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from tasks.classify import streamed
from tasks.classify.streamed import RowSource
from tasks.classify.svm_grid import svm_grid_search

# The original notebook's grid; a run may pass any other grid as options["param_grid"].
SVM_PARAM_GRID: dict[str, list[Any]] = {
    "C": [5, 10, 15],
    "gamma": ["auto", "scale"],
    "kernel": ["rbf"],
    "class_weight": ["balanced"],
}

_DENSE_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 32,
    "patience": 10,
    "validation_fraction": 0.2,
    "learning_rate": 1e-3,
}

# Every option a classifier accepts, with its default: an unknown key is a typo, not a no-op.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "svm": {"param_grid": SVM_PARAM_GRID, "cv_folds": 3},
    "logreg": {"C": 1.0, "max_iter": 5000},
    "knn": {"n_neighbors": 5},
    "dense256": _DENSE_DEFAULTS,
    "dense64bn": _DENSE_DEFAULTS,
    "sgd": streamed.DEFAULT_OPTIONS,
}


class _Fitted(NamedTuple):
    model: Any
    best_params: dict[str, Any]
    history: dict[str, list[float]] | None


@dataclass
class ClassifierResult:
    """Everything the report needs about one fitted classifier and its test predictions."""

    name: str
    model: object
    best_params: dict
    y_pred: np.ndarray
    scores: np.ndarray  # (n_test, n_classes): probabilities, or decision_function for the SVM
    metrics: dict
    confusion: list[list[int]]
    fit_seconds: float
    predict_seconds: float
    history: dict | None  # per-epoch accuracy/loss/val_* for the Keras heads


def _fit_svm(X: np.ndarray, y: np.ndarray, opts: dict, seed: int, n_classes: int) -> _Fitted:
    """Grid-search an RBF SVC; stratified folds keep every class in every fold.

    The search is GridSearchCV's (same candidates, folds, choice and refit) with each fold's
    kernel computed once for all C values. break_ties makes the predicted label the argmax
    of the reported decision scores (plain one-vs-one voting can disagree with them on ties).
    """
    folds = StratifiedKFold(n_splits=opts["cv_folds"], shuffle=True, random_state=seed)
    base = SVC(break_ties=True, random_state=seed)
    search = svm_grid_search(base, opts["param_grid"], X, y, folds.split(X, y))
    return _Fitted(search.model, search.best_params, None)


def _fit_logreg(X: np.ndarray, y: np.ndarray, opts: dict, seed: int, n_classes: int) -> _Fitted:
    """Multinomial logistic regression: the cheap linear baseline."""
    model = LogisticRegression(C=opts["C"], max_iter=opts["max_iter"], random_state=seed)
    model.fit(X, y)
    return _Fitted(model, dict(opts), None)


def _fit_knn(X: np.ndarray, y: np.ndarray, opts: dict, seed: int, n_classes: int) -> _Fitted:
    """k nearest neighbours: shows how well the feature space clusters by class."""
    model = KNeighborsClassifier(n_neighbors=opts["n_neighbors"])
    model.fit(X, y)
    return _Fitted(model, dict(opts), None)


def _fit_sgd(X: np.ndarray, y: np.ndarray, opts: dict, seed: int, n_classes: int) -> _Fitted:
    """The streamed linear model on rows already in memory (read a buffer at a time all the
    same, so it is the very model the stage fits from the store)."""
    model = streamed.fit_streamed(RowSource(X, np.arange(len(X))), y, n_classes, opts, seed)
    return _Fitted(model, dict(opts), None)


def validation_split(
    X: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out shuffled validation rows (stratified when the classes allow it).

    Keras' own validation_split takes the *last* rows unshuffled, which for class-sorted
    features would validate on one class only.
    """
    try:
        return train_test_split(X, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:  # a class with a single row, or fewer validation rows than classes
        return train_test_split(X, y, test_size=fraction, random_state=seed)


def _fit_dense(
    X: np.ndarray,
    y: np.ndarray,
    opts: dict,
    seed: int,
    n_classes: int,
    *,
    units: int,
    batch_norm: bool,
) -> _Fitted:
    """Train a one-hidden-layer softmax head with early stopping on a validation split."""
    import keras  # lazy: only the dense heads pay for the TensorFlow import

    keras.utils.set_random_seed(seed)
    X = np.asarray(X, dtype=np.float32)
    X_fit, X_val, y_fit, y_val = validation_split(X, y, opts["validation_fraction"], seed)
    hidden = [keras.layers.Dense(units, activation="relu")]
    if batch_norm:
        hidden.append(keras.layers.BatchNormalization())
    model = keras.Sequential(
        [
            keras.Input(shape=(X.shape[1],)),
            *hidden,
            keras.layers.Dropout(0.5),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=opts["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=opts["patience"], restore_best_weights=True
    )
    fit = model.fit(
        X_fit,
        y_fit,
        validation_data=(X_val, y_val),
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        callbacks=[stop],
        verbose=0,
    )
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    best_params = {**opts, "epochs_run": len(history["loss"]), "best_epoch": stop.best_epoch + 1}
    return _Fitted(model, best_params, history)


_FITTERS: dict[str, Callable[[np.ndarray, np.ndarray, dict, int, int], _Fitted]] = {
    "svm": _fit_svm,
    "logreg": _fit_logreg,
    "knn": _fit_knn,
    "dense256": partial(_fit_dense, units=256, batch_norm=False),
    "dense64bn": partial(_fit_dense, units=64, batch_norm=True),
    "sgd": _fit_sgd,
}

CLASSIFIERS: tuple[str, ...] = tuple(_FITTERS)


def resolve_options(name: str, options: dict | None) -> dict[str, Any]:
    """Merge a run's options over the defaults, rejecting unknown names and keys early."""
    if name not in DEFAULT_OPTIONS:
        raise ValueError(f"unknown classifier {name!r}; valid names: {', '.join(CLASSIFIERS)}")
    defaults = DEFAULT_OPTIONS[name]
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {name!r}; valid options: {sorted(defaults)}"
        )
    merged = {**defaults, **(options or {})}
    return streamed.check_options(merged) if name == "sgd" else merged


def predict_scores(model: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted label indices and per-class scores, whatever kind of model was fitted.

    scikit-learn models give predict_proba when they have it, else decision_function (SVC);
    their score columns follow model.classes_. A binary decision_function is widened to
    (-d, d) so scores always have one column per class. Keras heads give softmax outputs.
    """
    if hasattr(model, "predict_proba"):
        scores = model.predict_proba(X)
    elif hasattr(model, "decision_function"):
        scores = model.decision_function(X)
        if scores.ndim == 1:
            scores = np.column_stack([-scores, scores])
    else:
        probabilities = model.predict(np.asarray(X, dtype=np.float32), verbose=0)
        return np.argmax(probabilities, axis=1), probabilities
    return np.asarray(model.predict(X)), scores


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> tuple[dict[str, Any], list[list[int]]]:
    """Accuracy, averaged and per-class precision/recall/F1, and the confusion matrix.

    All classes are scored (labels=range(n)), so one absent from the test set still shows
    up, with zeros, instead of silently vanishing from the tables.
    """
    labels = list(range(len(class_names)))

    def averaged(average: str) -> dict[str, float]:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        return {"precision": float(p), "recall": float(r), "f1": float(f)}

    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro": averaged("macro"),
        "weighted": averaged("weighted"),
        "per_class": per_class,
    }
    confusion = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return metrics, confusion


def _check_labels(y: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    """Labels must be integer indices into class_names; anything else is a caller bug."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= n_classes)):
        raise ValueError(f"{what} must be integer indices in [0, {n_classes}), got {y.dtype}")
    return y


def train_and_evaluate(
    name: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    class_names: list[str],
    *,
    options: dict | None = None,
    seed: int = 0,
) -> ClassifierResult:
    """Fit classifier `name` on the training rows and score it on the test rows."""
    opts = resolve_options(name, options)
    n_classes = len(class_names)
    y_train = _check_labels(y_train, n_classes, "y_train")
    y_test = _check_labels(y_test, n_classes, "y_test")

    start = time.perf_counter()
    fitted = _FITTERS[name](X_train, y_train, opts, seed, n_classes)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    y_pred, scores = predict_scores(fitted.model, X_test)
    predict_seconds = time.perf_counter() - start
    return _result(name, fitted, y_test, y_pred, scores, fit_seconds, predict_seconds, class_names)


def train_and_evaluate_streamed(
    train: RowSource,
    y_train: np.ndarray,
    test: RowSource,
    y_test: np.ndarray,
    class_names: list[str],
    *,
    options: dict | None = None,
    seed: int = 0,
) -> ClassifierResult:
    """`sgd` on rows left where they are (the store): fitted and scored a buffer at a time."""
    opts = resolve_options("sgd", options)
    n_classes = len(class_names)
    y_train = _check_labels(y_train, n_classes, "y_train")
    y_test = _check_labels(y_test, n_classes, "y_test")

    start = time.perf_counter()
    fitted = _Fitted(streamed.fit_streamed(train, y_train, n_classes, opts, seed), opts, None)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    y_pred, scores = streamed.predict_streamed(fitted.model, test, opts["buffer_mib"])
    predict_seconds = time.perf_counter() - start
    return _result("sgd", fitted, y_test, y_pred, scores, fit_seconds, predict_seconds, class_names)


def _result(
    name: str,
    fitted: _Fitted,
    y_test: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray,
    fit_seconds: float,
    predict_seconds: float,
    class_names: list[str],
) -> ClassifierResult:
    metrics, confusion = classification_metrics(y_test, y_pred, class_names)
    return ClassifierResult(
        name=name,
        model=fitted.model,
        best_params=fitted.best_params,
        y_pred=y_pred,
        scores=scores,
        metrics=metrics,
        confusion=confusion,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        history=fitted.history,
    )
