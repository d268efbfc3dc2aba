"""Near-copies in the stored features: images so alike that one is an augmented copy of the other.

Datasets made by augmenting photos (rotations, shifts, flips) put copies of one photo on both
sides of a random split, and test accuracy then measures recall of copies, not accuracy on new
photos. Two uses, one rule (cosine similarity of a row to its nearest neighbours, at or above a
threshold): `near_copy_groups` joins near-copies into groups for `--split grouped --group-by
near-copies`, and `leak_check` tells a run how many of its test images have a near-copy among
its training images.

Cheap on purpose: rows are compared in blocks of BLOCK_ROWS against all others (never an n x n
matrix), and rows wider than SKETCH_WIDTH are first hashed down to SKETCH_WIDTH columns (a
count sketch: one pass over the stored chunks, inner products kept in expectation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GROUP_BY = ("auto", "near-copies")
DEFAULT_THRESHOLD = 0.95
NEIGHBOURS = 10  # edges per image in the group graph: enough for the copies of one photo
SKETCH_WIDTH = 2048  # wider rows are hashed down to this many columns first
BLOCK_ROWS = 1024  # query rows per matrix product: BLOCK_ROWS x n similarities at a time
LEAKY_SHARE = 0.5  # above this share of test images with a near-copy in training, warn
LEAK_FIX = (
    "split by source: --split grouped with a group column in --labels, or --split grouped "
    "--group-by near-copies"
)


class NearCopySettings(BaseModel):
    """How near-copies are found: one rule for `--group-by near-copies` and a run's check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_by: Literal[GROUP_BY] = Field(
        "auto",
        description="Where --split grouped takes its groups: auto (the labels file's group "
        "column, else --group-regex) or near-copies (found in the features)",
    )
    near_copy_threshold: float = Field(
        DEFAULT_THRESHOLD,
        gt=0.0,
        lt=1.0,
        description="Cosine similarity of stored feature rows at or above which two images "
        "count as near-copies",
    )


def _count_sketch(width: int, seed: int):
    """A (width, SKETCH_WIDTH) sparse matrix with one random sign per row in a random column:
    a count sketch, which keeps inner products in expectation at one multiply-add per value."""
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, SKETCH_WIDTH, width)
    signs = rng.choice(np.float32([-1.0, 1.0]), width)
    return csr_matrix((signs, (np.arange(width), buckets)), shape=(width, SKETCH_WIDTH))


def unit_rows(features: Any, seed: int = 0) -> np.ndarray:
    """The rows of a stored (n, d) feature array (Zarr or numpy) as float32 unit vectors, read
    one stored chunk of rows at a time; hashed to SKETCH_WIDTH columns when d is wider. Rows
    of zeros stay zero (similar to nothing)."""
    n, width = features.shape
    step = int(getattr(features, "chunks", (BLOCK_ROWS,))[0])
    sketch = _count_sketch(width, seed) if width > SKETCH_WIDTH else None
    rows = np.empty((n, min(width, SKETCH_WIDTH)), dtype=np.float32)
    for start in range(0, n, step):
        block = np.asarray(features[start : start + step], dtype=np.float32)
        rows[start : start + len(block)] = block if sketch is None else block @ sketch
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    return rows


def nearest(
    queries: np.ndarray, pool: np.ndarray, k: int, same: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity), both (len(queries), k): each query's k most similar pool rows, most
    similar first. `same` means queries are the pool, so a row is never its own neighbour."""
    k = min(k, len(pool) - same)
    index = np.empty((len(queries), k), dtype=np.int64)
    similarity = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), BLOCK_ROWS):
        block = queries[start : start + BLOCK_ROWS] @ pool.T
        if same:
            block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-sims, axis=1)
        index[start : start + len(block)] = np.take_along_axis(top, order, axis=1)
        similarity[start : start + len(block)] = np.take_along_axis(sims, order, axis=1)
    return index, similarity


@dataclass(frozen=True)
class NearCopyGroups:
    """One group id per row: the connected components of the near-copy graph."""

    groups: np.ndarray
    threshold: float

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0

    @property
    def largest_share(self) -> float:
        return float(np.bincount(self.groups).max() / self.groups.size)

    def describe(self) -> str:
        return (
            f"near-copy groups at cosine >= {self.threshold}: {self.n_groups} groups for "
            f"{self.groups.size} images, the largest holding {self.largest_share:.1%}"
        )


def near_copy_groups(rows: np.ndarray, threshold: float) -> NearCopyGroups:
    """Join each row to those of its NEIGHBOURS nearest rows at or above `threshold`; groups are
    the connected components. A loose threshold chains everything into one group: the caller
    reports `largest_share`, and the split refuses groups it cannot use."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rows)
    if n < 2:
        return NearCopyGroups(np.zeros(n, dtype=np.int64), threshold)
    index, similarity = nearest(rows, rows, NEIGHBOURS, same=True)
    source, slot = np.nonzero(similarity >= threshold)
    graph = coo_matrix((np.ones(len(source)), (source, index[source, slot])), shape=(n, n))
    _, groups = connected_components(graph, directed=False)
    return NearCopyGroups(groups.astype(np.int64), threshold)


@dataclass(frozen=True)
class LeakCheck:
    """Per test row: its most similar training row and whether that is a near-copy."""

    threshold: float
    nearest_train: np.ndarray  # manifest rows
    similarity: np.ndarray
    nearest_files: tuple[str, ...] = ()  # the nearest training images' files, when known

    @property
    def has_copy(self) -> np.ndarray:
        return self.similarity >= self.threshold

    @property
    def share(self) -> float:
        return float(self.has_copy.mean()) if self.has_copy.size else 0.0

    @property
    def leaky(self) -> bool:
        return self.share > LEAKY_SHARE

    def section(self, y_test: np.ndarray, predictions: dict[str, np.ndarray]) -> dict[str, Any]:
        """report.json's `near_copies`: the share, and per classifier the accuracy on test
        images with and without a near-copy in training (None for an empty subset)."""
        correct = {name: np.asarray(y) == np.asarray(y_test) for name, y in predictions.items()}

        def accuracy(subset: np.ndarray) -> dict[str, float | None]:
            return {
                name: float(right[subset].mean()) if subset.any() else None
                for name, right in correct.items()
            }

        return {
            "threshold": self.threshold,
            "test_with_copy": int(self.has_copy.sum()),
            "n_test": int(self.has_copy.size),
            "share": self.share,
            "accuracy_with": accuracy(self.has_copy),
            "accuracy_without": accuracy(~self.has_copy),
        }

    def warning(self) -> str | None:
        """One line when most test images have a near-copy in training, naming the fix."""
        if not self.leaky:
            return None
        return (
            f"{self.share:.0%} of the test images have a near-copy in the training images "
            f"(cosine >= {self.threshold}): test accuracy overstates accuracy on new images; "
            f"{LEAK_FIX}"
        )


def leak_check(
    rows: np.ndarray,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    threshold: float,
    files: Sequence[str] | None = None,
) -> LeakCheck:
    """For each test row, its nearest training row (cosine on `rows` from `unit_rows`);
    `files` (one per row) name the nearest training images in the run's near_copies.csv."""
    train_rows, test_rows = np.asarray(train_rows), np.asarray(test_rows)
    if not len(train_rows) or not len(test_rows):
        empty = np.zeros(len(test_rows))
        return LeakCheck(threshold, empty.astype(np.int64), empty.astype(np.float32))
    index, similarity = nearest(rows[test_rows], rows[train_rows], 1)
    nearest_train = train_rows[index[:, 0]]
    named = tuple(files[i] for i in nearest_train) if files is not None else ()
    return LeakCheck(threshold, nearest_train, similarity[:, 0], named)
