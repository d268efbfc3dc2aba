"""Out-of-core linear classifier: SGD trained by `partial_fit` over row slices of the store.

The RBF SVM grid needs every training row and (n, n) kernels in memory; this model never holds
more than one buffer of rows (`buffer_mib`), so it fits any n. Rows are standardised first (a
streamed StandardScaler: SGD's step size assumes unit variance) and each epoch visits the row
slices in a seeded random order, MIX_SLICES slices per `partial_fit` call (which shuffles the
rows it is given): stores keep the rows in class-folder order, and one class per call would
drag the weights from class to class.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tasks.features.store import FeatureStore, StoreError

log = logging.getLogger("featurepipe.classify")

MiB = 2**20
MIX_SLICES = 8  # row slices from random places of the store in one partial_fit call
PROBABILISTIC_LOSSES = ("log_loss", "modified_huber")  # the report needs per-class scores

DEFAULT_OPTIONS: dict[str, Any] = {
    "epochs": 10,
    "alpha": 1e-4,
    "loss": "log_loss",
    "average": True,
    "buffer_mib": 32,
}


@dataclass(frozen=True)
class RowSource:
    """Rows `rows` of a (n_rows, k) array, read one slice of consecutive rows at a time.

    `array` is a Zarr array of the store or a numpy array: anything with `shape` and row
    slicing. Positions index `rows` (and the labels aligned with them), not the array.
    """

    array: Any
    rows: np.ndarray

    @property
    def n_columns(self) -> int:
        return int(self.array.shape[1])

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk (a Zarr array decompresses whole chunks); 1 for numpy."""
        return int(getattr(self.array, "chunks", (1,))[0])

    @property
    def chunk_columns(self) -> int:
        """Columns per stored chunk: reads go one chunk column at a time (all for numpy)."""
        return int(getattr(self.array, "chunks", (1, self.n_columns))[1])

    def slice_rows(self, buffer_mib: float) -> int:
        """Rows per slice: MIX_SLICES slices of float32 rows fill the buffer, and a slice
        never straddles two chunk rows (a chunk is decompressed whole to read any part of it)."""
        rows = max(1, int(buffer_mib * MiB) // (4 * max(self.n_columns, 1) * MIX_SLICES))
        if rows >= self.chunk_rows:
            return rows - rows % self.chunk_rows
        return self.chunk_rows // -(-self.chunk_rows // rows)

    def slices(self, slice_rows: int) -> list[np.ndarray]:
        """Positions of `rows` grouped by the array's slices of `slice_rows` rows (non-empty)."""
        order = np.argsort(self.rows, kind="stable")
        edges = np.arange(0, int(self.array.shape[0]) + slice_rows, slice_rows)
        bounds = np.searchsorted(self.rows[order], edges)
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def read(self, positions: np.ndarray, columns: int | None = None) -> np.ndarray:
        """The rows at `positions` (all within one slice), their first `columns` columns (all
        by default): the slice's rows are read one chunk column at a time, then selected."""
        wanted = self.rows[positions]
        low, high = int(wanted.min()), int(wanted.max()) + 1
        width = min(columns or self.n_columns, self.n_columns)
        out = np.empty((len(wanted), width), dtype=self.array.dtype)
        step = self.chunk_columns
        for start in range(0, width, step):  # one chunk decompressed at a time
            stop = min(start + step, width)
            out[:, start:stop] = np.asarray(self.array[low:high, start:stop])[wanted - low]
        return out

    def leading_columns(self, count: int, buffer_mib: float) -> np.ndarray:
        """The first `count` columns of every row, in `rows` order, a buffer at a time."""
        out = np.empty((len(self.rows), min(count, self.n_columns)), dtype=self.array.dtype)
        for positions in self.slices(self.slice_rows(buffer_mib) * MIX_SLICES):
            out[positions] = self.read(positions, count)
        return out


def stored_rows(store: FeatureStore, key: str, rows: np.ndarray) -> RowSource:
    """The projected rows of a complete stored reduction, left on disk until read."""
    attrs = store.reduction_attrs(key)
    if attrs is None:
        raise StoreError(f"no complete reduction {key} in {store.location}")
    return RowSource(store.root[f"reduced/{key}/projected"], np.asarray(rows))


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse values the model cannot work with (models.resolve_options checks the keys)."""
    if options["loss"] not in PROBABILISTIC_LOSSES:
        raise ValueError(
            f"sgd loss must be one of {PROBABILISTIC_LOSSES} (the report needs class scores), "
            f"got {options['loss']!r}"
        )
    if options["epochs"] < 1 or options["buffer_mib"] <= 0:
        raise ValueError("sgd needs epochs >= 1 and buffer_mib > 0")
    return options


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class weight n / (n_classes * count), class_weight="balanced"'s formula, which
    partial_fit does not accept: it cannot see the counts of rows it has not been given yet.
    Classes without rows get 1 (no row ever uses it)."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    weights = np.ones(n_classes)
    present = counts > 0
    weights[present] = len(y) / (n_classes * counts[present])
    return weights


def fit_streamed(
    source: RowSource, y: np.ndarray, n_classes: int, options: dict[str, Any], seed: int
) -> Pipeline:
    """Standardise and fit an SGD linear model, reading `source` a buffer at a time.

    One pass fits the scaler, then `epochs` passes fit the model; each pass reads every row
    once. `y` holds the labels of `source.rows`, in the same order.
    """
    opts = check_options(options)
    slices = source.slices(source.slice_rows(opts["buffer_mib"]))
    scaler = StandardScaler()
    for positions in slices:
        scaler.partial_fit(source.read(positions))
    model = SGDClassifier(
        loss=opts["loss"], alpha=opts["alpha"], average=opts["average"], random_state=seed
    )
    weights = balanced_weights(y, n_classes)
    classes = np.arange(n_classes)
    rng = np.random.default_rng(seed)
    for epoch in range(opts["epochs"]):
        began = time.perf_counter()
        order = rng.permutation(len(slices))
        for start in range(0, len(order), MIX_SLICES):
            chosen = [slices[i] for i in order[start : start + MIX_SLICES]]
            X = scaler.transform(np.concatenate([source.read(p) for p in chosen]), copy=False)
            labels = y[np.concatenate(chosen)]
            model.partial_fit(X, labels, classes=classes, sample_weight=weights[labels])
            del X  # before the next buffer is read
        log.info(
            "sgd: epoch %d/%d over %s rows in %.1f s",
            epoch + 1,
            opts["epochs"],
            f"{len(y):,}",
            time.perf_counter() - began,
        )
    return make_pipeline(scaler, model)


def predict_streamed(
    model: Pipeline, source: RowSource, buffer_mib: float
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels and class probabilities of every row of `source`, a slice at a time."""
    n_classes = len(model.classes_)
    y_pred = np.empty(len(source.rows), dtype=np.int64)
    scores = np.empty((len(source.rows), n_classes))
    for positions in source.slices(source.slice_rows(buffer_mib) * MIX_SLICES):
        X = source.read(positions)
        y_pred[positions] = model.predict(X)
        scores[positions] = model.predict_proba(X)
    return y_pred, scores
