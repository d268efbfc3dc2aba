"""Train/test row selection: stratified, grouped by a file-name regex, or the dataset's folders.

Seeded and pure: the same manifest and settings always give the same rows, so a reduction
fitted on the train rows can be cached by the hash of those rows.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from tasks.data.scan import Manifest
from tasks.errors import UserError

SPLIT_METHODS = ("auto", "stratified", "grouped", "folder")


class SplitError(UserError):
    """The requested split cannot be made from this dataset."""


def _groups(manifest: Manifest, group_regex: str) -> np.ndarray:
    pattern = re.compile(group_regex)
    groups = []
    for record in manifest.records:
        name = PurePosixPath(record.path).name
        match = pattern.search(name)
        if match is None:
            raise SplitError(f"group regex {group_regex!r} does not match file name {name!r}")
        groups.append(f"{record.label}/{match.group(1) if match.groups() else match.group(0)}")
    return np.asarray(groups)


def split_rows(
    manifest: Manifest,
    method: str = "auto",
    test_size: float = 0.25,
    seed: int = 0,
    group_regex: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_rows, test_rows) indices into manifest.records.

    "auto" uses the dataset's own test/ tree when it has one, else a stratified split.
    valid/ rows join the training rows: classical classifiers do their own cross-validation.
    """
    if method not in SPLIT_METHODS:
        raise SplitError(f"unknown split {method!r}; choose one of {', '.join(SPLIT_METHODS)}")
    splits = np.asarray([r.split for r in manifest.records])
    labels = np.asarray(manifest.labels)
    if method == "auto":
        method = "folder" if (splits == "test").any() else "stratified"
    if method == "folder":
        test = np.flatnonzero(splits == "test")
        if test.size == 0:
            raise SplitError("split 'folder' needs a test/ sub-tree in the dataset")
        train = np.flatnonzero(splits != "test")
        return train, test
    if not 0.0 < test_size < 1.0:
        raise SplitError(f"test size must be between 0 and 1, got {test_size}")
    rows = np.arange(len(labels))
    if method == "stratified":
        counts = np.bincount(labels)
        if counts.min() < 2:
            raise SplitError("a stratified split needs at least 2 images per class")
        train, test = train_test_split(
            rows, test_size=test_size, random_state=seed, stratify=labels
        )
        return np.sort(train), np.sort(test)
    if not group_regex:
        raise SplitError("split 'grouped' needs --group-regex, e.g. '_(\\d+)_'")
    folds = max(2, round(1.0 / test_size))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, test = next(splitter.split(rows, labels, _groups(manifest, group_regex)))
    return np.sort(train), np.sort(test)


def rows_key(rows: np.ndarray) -> str:
    """Short hash of a row selection, part of the reduction's cache key."""
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
