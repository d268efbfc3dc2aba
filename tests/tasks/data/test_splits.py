"""Grouped splits: every group on one side, groups from exactly one source, and one line for a
grouping that cannot make a split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.labels import scan_labels
from tasks.data.scan import Manifest, scan
from tasks.data.splits import SplitError, group_source, split_rows
from tests.conftest import write_image


def _photos(tmp_path: Path, photos: int = 12, copies: int = 3) -> tuple[Manifest, Manifest]:
    """Two classes of `photos` 'photos' with `copies` files each: the folder scan (no groups)
    and the scan of a CSV naming each file's photo in a group column."""
    tree = tmp_path / "tree"
    lines = ["path,label,group"]
    for n in range(2 * photos):
        label, tint = ("a", 0) if n % 2 else ("b", 120)
        for copy in range(copies):
            name = f"{label}/{n * copies + copy:03d}.png"
            write_image(tree / name, seed=n * copies + copy, tint=tint)
            lines.append(f"{name},{label},photo {n}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return scan(tree), scan_labels(tree, csv)


def test_grouped_split_keeps_each_group_on_one_side(tmp_path: Path) -> None:
    _, manifest = _photos(tmp_path)
    groups = np.asarray([r.group for r in manifest.records])
    train, test = split_rows(manifest, "grouped", 0.25, seed=0)
    assert sorted([*train, *test]) == list(range(len(groups)))
    assert not set(groups[train]) & set(groups[test])
    assert {manifest.records[i].label for i in test} == {"a", "b"}
    # a stratified split of the same rows does put copies of one photo on both sides
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    assert set(groups[train]) & set(groups[test])


def test_given_groups_split_like_a_column(tmp_path: Path) -> None:
    plain, grouped = _photos(tmp_path)
    found = np.asarray([r.group for r in grouped.records])  # e.g. near-copy groups
    train, test = split_rows(plain, "grouped", 0.25, seed=0, groups=found)
    assert not set(found[train]) & set(found[test])


@pytest.mark.parametrize(
    ("column", "regex", "near", "expected"),
    [
        (True, None, False, "column"),
        (False, r"_(\d+)_", False, "regex"),
        (False, None, True, "near-copies"),
        (False, None, False, None),
    ],
)
def test_group_source_names_the_one_source(
    column: bool, regex: str | None, near: bool, expected: str | None
) -> None:
    assert group_source(column, regex, near) == expected


def test_two_group_sources_are_one_error_line(tmp_path: Path) -> None:
    _, manifest = _photos(tmp_path)
    with pytest.raises(
        SplitError,
        match="groups come from one source, but the labels file's group column and "
        "--group-regex both give them",
    ):
        split_rows(manifest, "grouped", 0.25, seed=0, group_regex=r"(\d)")
    found = np.arange(len(manifest.records))
    with pytest.raises(SplitError, match="group column and --group-by near-copies"):
        split_rows(manifest, "grouped", 0.25, seed=0, groups=found)


def test_grouped_without_any_groups_says_where_they_come_from(image_tree: Path) -> None:
    with pytest.raises(SplitError, match="group column in --labels, --group-regex .* near-copies"):
        split_rows(scan(image_tree), "grouped")


def test_a_grouping_that_cannot_split_is_refused_with_its_figures(tmp_path: Path) -> None:
    plain, _ = _photos(tmp_path, photos=4)
    labels = np.asarray(plain.labels)
    chained = np.zeros(len(labels), dtype=int)  # a loose rule chained everything together
    with pytest.raises(
        SplitError, match=r"needs at least 4 groups; there are 1 groups, the largest holding 100%"
    ):
        split_rows(plain, "grouped", 0.25, seed=0, groups=chained)
    one_class_one_group = np.where(labels == 0, -1, np.arange(len(labels)))
    with pytest.raises(SplitError, match="every tested class in training .* largest holding 50%"):
        for seed in range(20):  # some seed puts class a's one group on the test side
            split_rows(plain, "grouped", 0.25, seed=seed, groups=one_class_one_group)
