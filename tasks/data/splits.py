"""Train/test row selection: stratified, grouped, or the dataset's folders.

A grouped split keeps each group (copies of one photo) on one side; its groups come from one
source: a labels table's `group` column, a file-name regex, or near-copies found in the
features (tasks/features/near_copies.py).

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


def group_source(has_column: bool, group_regex: str | None, near_copies: bool) -> str | None:
    """Where a grouped split's groups come from: "column" (a labels table's `group` column),
    "regex" (--group-regex on file names) or "near-copies" (found in the features); None if
    from nowhere. Two sources at once is an error rather than a precedence: they would disagree
    about which images belong together, and a silently ignored one leaks copies."""
    given = [
        name
        for name, used in (
            ("the labels file's group column", has_column),
            ("--group-regex", bool(group_regex)),
            ("--group-by near-copies", near_copies),
        )
        if used
    ]
    if len(given) > 1:
        raise SplitError(f"groups come from one source, but {' and '.join(given)} both give them")
    if has_column:
        return "column"
    if group_regex:
        return "regex"
    return "near-copies" if near_copies else None


def has_group_column(manifest: Manifest) -> bool:
    return any(record.group is not None for record in manifest.records)


def _regex_groups(manifest: Manifest, group_regex: str) -> np.ndarray:
    pattern = re.compile(group_regex)
    groups = []
    for record in manifest.records:
        name = PurePosixPath(record.path).name
        match = pattern.search(name)
        if match is None:
            raise SplitError(f"group regex {group_regex!r} does not match file name {name!r}")
        groups.append(f"{record.label}/{match.group(1) if match.groups() else match.group(0)}")
    return np.asarray(groups)


def _manifest_groups(manifest: Manifest, group_regex: str | None) -> np.ndarray:
    """The groups a manifest itself gives: its records' `group` values, or the regex's."""
    source = group_source(has_group_column(manifest), group_regex, near_copies=False)
    if source == "column":
        return np.asarray([record.group for record in manifest.records])
    if source == "regex":
        return _regex_groups(manifest, group_regex)
    raise SplitError(
        "split 'grouped' needs groups: a group column in --labels, --group-regex (e.g. "
        "'_(\\d+)_') or --group-by near-copies"
    )


def _grouped(
    labels: np.ndarray, groups: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """StratifiedGroupKFold's first fold as (train, test); a grouping that cannot give both
    sides (too few groups, one group holding nearly everything) is refused in one line."""
    folds = max(2, round(1.0 / test_size))
    names, sizes = np.unique(groups, return_counts=True)
    largest = sizes.max() / len(groups)
    described = f"{len(names)} groups, the largest holding {largest:.0%} of the images"
    if len(names) < folds:
        raise SplitError(
            f"a grouped split with test size {test_size} needs at least {folds} groups; "
            f"there are {described}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    rows = np.arange(len(labels))
    train, test = next(splitter.split(rows, labels, groups))
    untrained = set(labels[test]) - set(labels[train])
    if train.size == 0 or test.size == 0 or untrained:
        raise SplitError(
            f"the groups cannot make a train/test split with every tested class in training "
            f"({described})"
        )
    return np.sort(train), np.sort(test)


def split_rows(
    manifest: Manifest,
    method: str = "auto",
    test_size: float = 0.25,
    seed: int = 0,
    group_regex: str | None = None,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_rows, test_rows) indices into manifest.records.

    "auto" uses the dataset's own test/ tree when it has one, else a stratified split.
    valid/ rows join the training rows: classical classifiers do their own cross-validation.
    "grouped" keeps each group on one side: `groups` (one per record, e.g. near-copy groups
    found in the features) when given, else the manifest's group column or `group_regex`.
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
    if groups is not None:
        group_source(has_group_column(manifest), group_regex, near_copies=True)
    else:
        groups = _manifest_groups(manifest, group_regex)
    return _grouped(labels, np.asarray(groups), test_size, seed)


def rows_key(rows: np.ndarray) -> str:
    """Short hash of a row selection, part of the reduction's cache key."""
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
