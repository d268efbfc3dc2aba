"""The streamed classifier: as accurate as logistic regression on digits, reads a buffer at a
time from a real Zarr store, and predicts each row in its own place."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.utils.class_weight import compute_class_weight

from tasks.classify.models import resolve_options, train_and_evaluate
from tasks.classify.plan import OVERHEAD, Shape, peak_bytes
from tasks.classify.streamed import (
    RowSource,
    balanced_weights,
    fit_streamed,
    predict_streamed,
    stored_rows,
)
from tasks.features.store import FeatureStore, StoreError

NAMES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def digits_projected() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits in class order (as a class-folder store keeps them), PCA-projected on the
    training rows: every fourth row is a test row."""
    X, y = load_digits(return_X_y=True)
    order = np.argsort(y, kind="stable")
    X, y = X[order] / 16, y[order]
    test = np.arange(0, len(y), 4)
    train = np.setdiff1d(np.arange(len(y)), test)
    projected = PCA(30, random_state=0).fit(X[train]).transform(X).astype(np.float32)
    return projected, y, train, test


def test_accuracy_close_to_logistic_regression(digits_projected) -> None:
    X, y, train, test = digits_projected
    # a small buffer: 8 slices of ~54 rows per partial_fit call, ~25 slices per epoch
    options = {"sgd": {"buffer_mib": 0.05}}
    scores = {
        name: train_and_evaluate(
            name, X[train], y[train], X[test], y[test], NAMES, options=options.get(name)
        )
        for name in ("logreg", "sgd")
    }
    logreg, sgd = (scores[name].metrics["accuracy"] for name in ("logreg", "sgd"))
    assert logreg > 0.9
    assert sgd >= logreg - 0.03, (sgd, logreg)


def test_balanced_weights_are_scikit_learns(digits_projected) -> None:
    _, y, train, _ = digits_projected
    y = y[train][: len(train) // 2]  # uneven counts, classes 5..9 nearly absent
    present = np.unique(y)
    expected = compute_class_weight("balanced", classes=present, y=y)
    weights = balanced_weights(y, 12)  # two classes with no row at all
    np.testing.assert_allclose(weights[present], expected * len(present) / 12)
    assert weights[10] == weights[11] == 1.0


def test_same_seed_same_model_and_streamed_predictions_keep_row_order(digits_projected) -> None:
    X, y, train, test = digits_projected
    opts = resolve_options("sgd", {"buffer_mib": 0.05, "epochs": 3})
    shuffled = np.random.default_rng(1).permutation(train)  # rows not in store order
    source = RowSource(X, shuffled)
    first = fit_streamed(source, y[shuffled], 10, opts, seed=3)
    again = fit_streamed(source, y[shuffled], 10, opts, seed=3)
    np.testing.assert_array_equal(first[-1].coef_, again[-1].coef_)
    rows = np.random.default_rng(2).permutation(test)
    y_pred, scores = predict_streamed(first, RowSource(X, rows), buffer_mib=0.01)
    np.testing.assert_array_equal(y_pred, first.predict(X[rows]))
    np.testing.assert_allclose(scores, first.predict_proba(X[rows]), rtol=1e-4, atol=1e-6)


class RecordingArray:
    """A numpy array that notes the first row of every slice read from it."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.shape, self.dtype, self.starts = values, values.shape, values.dtype, []

    def __getitem__(self, key):
        self.starts.append(key[0].start)
        return self.values[key]


def test_each_epoch_reads_every_slice_once_in_a_seeded_random_order(digits_projected) -> None:
    X, y, train, _ = digits_projected
    opts = resolve_options("sgd", {"buffer_mib": 0.05, "epochs": 3})

    def passes(seed: int) -> list[list[int]]:
        array = RecordingArray(X)
        fit_streamed(RowSource(array, train), y[train], 10, opts, seed)
        size = len(array.starts) // 4  # the scaler's pass, then one per epoch
        return [array.starts[i * size : (i + 1) * size] for i in range(4)]

    scaler, *epochs = passes(seed=0)
    assert len(scaler) > 16 and scaler == sorted(scaler)  # many slices, read in store order
    for epoch in epochs:
        assert sorted(epoch) == scaler and epoch != scaler
    assert epochs[0] != epochs[1] != epochs[2]
    assert passes(seed=0)[1:] == epochs and passes(seed=1)[1:] != epochs


def test_fit_reads_the_store_a_buffer_at_a_time(tmp_path: Path) -> None:
    """Peak traced memory stays a small share of the (n, k) matrix, which is never loaded
    (zarr's default chunks of a reduction are (12,500, 16) here: reads go chunk by chunk)."""
    rng = np.random.default_rng(0)
    n, k = 100_000, 64
    y = rng.integers(0, 4, n)
    rows = rng.normal(size=(n, k)).astype(np.float32)
    rows[np.arange(n), y] += 3  # each class shifted along its own axis
    store = FeatureStore(str(tmp_path / "store"))
    store.save_reduction("r", {"projected": rows}, {})
    full_bytes = rows.nbytes
    del rows
    train = np.arange(0, n, 2)
    source = stored_rows(store, "r", train)
    opts = resolve_options("sgd", {"buffer_mib": 1, "epochs": 1})
    tracemalloc.start()
    try:
        model = fit_streamed(source, y[train], 4, opts, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_bytes / 4, (peak, full_bytes)
    array = source.array
    chunk_bytes = 4 * array.chunks[0] * array.chunks[1]
    shape = Shape(n=len(train), t=0, rows=n, k=k, classes=4, chunk_bytes=chunk_bytes)
    assert peak <= peak_bytes("sgd", shape, opts) - OVERHEAD, "beyond the plan's formula"
    test = stored_rows(store, "r", np.arange(1, 2001, 2))
    y_pred, _ = predict_streamed(model, test, buffer_mib=1)
    assert np.mean(y_pred == y[test.rows]) > 0.9  # it learned from what it read


def test_a_reduction_that_is_not_there_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no complete reduction nope"):
        stored_rows(FeatureStore(str(tmp_path / "store")), "nope", np.arange(3))


def test_losses_without_class_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="sgd loss must be one of"):
        resolve_options("sgd", {"loss": "hinge"})


def test_leading_columns_of_stored_rows_in_the_rows_order(tmp_path: Path) -> None:
    """The class map's columns: read across several chunk columns, rows in the caller's order."""
    values = np.random.default_rng(0).normal(size=(30_000, 100)).astype(np.float32)
    store = FeatureStore(str(tmp_path / "store"))
    store.save_reduction("r", {"projected": values}, {})
    rows = np.random.default_rng(1).permutation(30_000)[:5_000]
    source = stored_rows(store, "r", rows)
    assert source.chunk_columns < 40 < source.n_columns  # the read spans chunk columns
    np.testing.assert_array_equal(source.leading_columns(40, buffer_mib=0.5), values[rows, :40])
