"""Near-copies in the stored features: images so alike that one is an augmented copy of the other.

Datasets made by augmenting photos (rotations, shifts, flips) put copies of one photo on both
sides of a random split, and test accuracy then measures recall of copies, not accuracy on new
photos. Two uses, one rule (cosine similarity of a row to its nearest neighbours, at or above a
threshold): `near_copy_groups` joins near-copies into groups for `--split grouped --group-by
near-copies`, and `leak_check` tells a run how many of its test images have a near-copy among
its training images.

The threshold is data-relative by default ("auto"): the cosine that 75 % of the reference rows
reach to their nearest other reference row (for the check: the training rows, estimated from
at most AUTO_QUERIES of them so its cost grows as n, not n^2; for the groups: all rows).
Measured on the blood cells' EfficientNet-Lite0 features against a photo map, absolute
thresholds fail: a copy's nearest copy (median 0.946) and another photo's nearest image (median
0.925) overlap, and the check at a fixed 0.95 flagged only a third of a fully leaky split. With
"auto", test rows are flagged as often as training rows would be (75 %) when the split leaks
and rarely when it does not: the leak estimate (flagged share / 0.75) was 0.99-1.00 on random
splits, 0.95-0.99 on the file-name-regex split and 0.04-0.06 on a split by photo field. It is
scale-free, so it holds for any backbone and layer, but it compares test rows with training
rows: on a dataset without any copies the test rows are as close to training as training rows
are to each other, and the estimate is high too (about 1.0 on the 277 original photos).

Cheap on purpose: rows are compared one block of queries at a time against all others
(BLOCK_BYTES of similarities, never an n x n matrix; the time still grows as n^2), and rows
wider than SKETCH_WIDTH are first hashed down to SKETCH_WIDTH columns (a count sketch: one pass
over the stored chunks, inner products kept in expectation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

GROUP_BY = ("auto", "near-copies")
AUTO_QUANTILE = 0.25  # "auto": the cosine 75 % of reference rows reach to their nearest row
AUTO_QUERIES = 4096  # training rows whose nearest other row sets "auto" (all, if fewer)
NEIGHBOURS = 10  # edges per image in the group graph: enough for the copies of one photo
SKETCH_WIDTH = 2048  # wider rows are hashed down to this many columns first
BLOCK_BYTES = 64 << 20  # similarities held at once: a block of query rows x all pool rows
LEAKY_SHARE = 0.5  # warn above this leak estimate (flagged share / share expected if leaky)
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
    near_copy_threshold: float | Literal["auto"] = Field(
        "auto",
        description="Cosine similarity of stored feature rows at or above which two images "
        "count as near-copies; auto: the cosine that 75% of the reference rows (training rows "
        "for the check) reach to their nearest other row",
    )

    @field_validator("near_copy_threshold", mode="before")
    @classmethod
    def _cosine_or_auto(cls, value: Any) -> Any:
        """One message for both forms, instead of one per member of the union."""
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not 0.0 < number < 1.0:
            raise ValueError(f"a cosine between 0 and 1 (exclusive) or auto, got {value!r}")
        return number


Threshold = float | Literal["auto"]


def resolve_threshold(threshold: Threshold, nearest_similarity: np.ndarray) -> float:
    """The cosine threshold: a fixed one as given, or "auto" from the reference rows' nearest
    neighbour similarities (their AUTO_QUANTILE quantile)."""
    if threshold != "auto":
        return float(threshold)
    if not nearest_similarity.size:
        return 1.0
    return float(np.quantile(nearest_similarity, AUTO_QUANTILE))


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
    step = int(getattr(features, "chunks", (1024,))[0])
    sketch = _count_sketch(width, seed) if width > SKETCH_WIDTH else None
    rows = np.empty((n, min(width, SKETCH_WIDTH)), dtype=np.float32)
    for start in range(0, n, step):
        block = np.asarray(features[start : start + step], dtype=np.float32)
        rows[start : start + len(block)] = block if sketch is None else block @ sketch
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    return rows


def nearest(
    queries: np.ndarray, pool: np.ndarray, k: int, own: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity), both (len(queries), k): each query's k most similar pool rows, most
    similar first. `own`: each query's own row in the pool, never its own neighbour."""
    k = min(k, len(pool) - (own is not None))
    index = np.empty((len(queries), k), dtype=np.int64)
    similarity = np.empty((len(queries), k), dtype=np.float32)
    step = max(1, BLOCK_BYTES // (4 * len(pool)))
    for start in range(0, len(queries), step):
        block = queries[start : start + step] @ pool.T
        if own is not None:
            block[np.arange(len(block)), own[start : start + len(block)]] = -np.inf
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
    rule: Threshold = "auto"

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0

    @property
    def largest_share(self) -> float:
        return float(np.bincount(self.groups).max() / self.groups.size)

    def describe(self) -> str:
        return (
            f"near-copy groups at cosine >= {self.threshold:.4f} ({_rule(self.rule)}): "
            f"{self.n_groups} groups for {self.groups.size} images, the largest holding "
            f"{self.largest_share:.1%}"
        )


def _rule(threshold: Threshold) -> str:
    return "auto" if threshold == "auto" else "fixed"


def near_copy_groups(rows: np.ndarray, threshold: Threshold) -> NearCopyGroups:
    """Join each row to those of its NEIGHBOURS nearest rows at or above the threshold ("auto":
    from all rows' nearest-neighbour similarities); groups are the connected components. A
    loose threshold chains everything into one group: the caller reports `largest_share`, and
    the split refuses groups it cannot use."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rows)
    if n < 2:
        return NearCopyGroups(np.zeros(n, dtype=np.int64), resolve_threshold(threshold, np.ones(0)))
    index, similarity = nearest(rows, rows, NEIGHBOURS, own=np.arange(len(rows)))
    cut = resolve_threshold(threshold, similarity[:, 0])
    source, slot = np.nonzero(similarity >= cut)
    graph = coo_matrix((np.ones(len(source)), (source, index[source, slot])), shape=(n, n))
    _, groups = connected_components(graph, directed=False)
    return NearCopyGroups(groups.astype(np.int64), cut, threshold)


@dataclass(frozen=True)
class LeakCheck:
    """Per test row: its most similar training row and whether that is a near-copy."""

    threshold: float  # the cosine used
    rule: Threshold  # "auto" or the fixed cosine asked for
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
    def expected_if_leaky(self) -> float:
        """The share a fully leaky split would show: test rows like training rows are flagged
        as often as training rows reach the "auto" threshold; with a fixed one, all of them."""
        return 1.0 - AUTO_QUANTILE if self.rule == "auto" else 1.0

    @property
    def leak_estimate(self) -> float:
        """The share of test images that look like copies of training images, estimated."""
        return min(1.0, self.share / self.expected_if_leaky)

    @property
    def leaky(self) -> bool:
        return self.leak_estimate > LEAKY_SHARE

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
            "rule": _rule(self.rule),
            "test_with_copy": int(self.has_copy.sum()),
            "n_test": int(self.has_copy.size),
            "share": self.share,
            "leak_estimate": self.leak_estimate,
            "accuracy_with": accuracy(self.has_copy),
            "accuracy_without": accuracy(~self.has_copy),
        }

    def warning(self) -> str | None:
        """One line when most test images have a near-copy in training, naming the fix."""
        if not self.leaky:
            return None
        return (
            f"{self.share:.0%} of the test images have a near-copy in the training images "
            f"(cosine >= {self.threshold:.4f}, {_rule(self.rule)}; leak estimate "
            f"{self.leak_estimate:.0%}): when images are copies of one photo (augmentation, "
            f"bursts), test accuracy overstates accuracy on new images; {LEAK_FIX}"
        )


def leak_check(
    rows: np.ndarray,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    threshold: Threshold,
    files: Sequence[str] | None = None,
) -> LeakCheck:
    """For each test row, its nearest training row (cosine on `rows` from `unit_rows`); "auto"
    takes the threshold from the training rows' nearest other training rows. `files` (one per
    row) name the nearest training images in the run's near_copies.csv."""
    train_rows, test_rows = np.asarray(train_rows), np.asarray(test_rows)
    if len(train_rows) < 2 or not len(test_rows):
        empty = np.zeros(len(test_rows))
        cut = resolve_threshold(threshold, np.ones(0))
        return LeakCheck(cut, threshold, empty.astype(np.int64), empty.astype(np.float32))
    reference = np.ones(0)
    if threshold == "auto":  # a quantile: a seeded sample of queries estimates it in O(n)
        sample = np.sort(np.random.default_rng(0).permutation(len(train_rows))[:AUTO_QUERIES])
        reference = nearest(rows[train_rows[sample]], rows[train_rows], 1, own=sample)[1][:, 0]
    index, similarity = nearest(rows[test_rows], rows[train_rows], 1)
    nearest_train = train_rows[index[:, 0]]
    named = tuple(files[i] for i in nearest_train) if files is not None else ()
    cut = resolve_threshold(threshold, reference)
    return LeakCheck(cut, threshold, nearest_train, similarity[:, 0], named)
