"""Labels from a CSV: the same manifest (and key) as class folders, and one clear line for
each kind of mistake in the table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.data.labels import LabelsError, read_labels, scan_labels
from tasks.data.scan import Manifest, scan
from tests.conftest import write_image


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _table_of(tree: Path, with_split: bool = False) -> str:
    """A CSV describing a class-folder tree (optionally with train/ test/ sub-trees)."""
    lines = ["path,label,split" if with_split else "path,label"]
    for image in sorted(tree.rglob("*.png")):
        parts = image.relative_to(tree).parts
        split, label = (parts[0], parts[1]) if with_split else ("", parts[0])
        lines.append(f"{image.relative_to(tree).as_posix()},{label}" + (f",{split}" * with_split))
    return "\n".join(lines) + "\n"


def _flatten(tree: Path, flat: Path) -> str:
    """The same images in one folder under new names, and the CSV that labels them."""
    flat.mkdir()
    lines = ["file,class"]
    for i, image in enumerate(sorted(tree.rglob("*.png"))):
        shutil.copy(image, flat / f"photo_{i:03d}.png")
        lines.append(f"photo_{i:03d}.png,{image.parent.name}")
    return "\n".join(lines) + "\n"


def test_a_table_of_a_class_tree_gives_the_trees_manifest(image_tree: Path, tmp_path: Path) -> None:
    folders = scan(image_tree)
    table = scan_labels(image_tree, _csv(tmp_path / "labels.csv", _table_of(image_tree)))
    assert table.key == folders.key
    assert table.records == folders.records and table.class_names == folders.class_names
    assert table.warnings == [] and table.skipped == []
    limited = scan_labels(image_tree, tmp_path / "labels.csv", limit_per_class=5)
    assert limited.key == scan(image_tree, limit_per_class=5).key


def test_renamed_flat_copies_keep_the_key(image_tree: Path, tmp_path: Path) -> None:
    labels = _csv(tmp_path / "labels.csv", _flatten(image_tree, tmp_path / "flat"))
    assert scan_labels(tmp_path / "flat", labels).key == scan(image_tree).key


def test_split_column_matches_split_folders(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for split, count in (("train", 6), ("test", 3)):
        for label, tint in (("a", 0), ("b", 120)):
            for i in range(count):
                write_image(
                    tree / split / label / f"{i}.png", seed=tint + 10 * i + count, tint=tint
                )
    table = scan_labels(tree, _csv(tmp_path / "labels.csv", _table_of(tree, with_split=True)))
    assert table.key == scan(tree).key
    assert {r.split for r in table.records} == {"train", "test"}


def test_unlisted_images_are_left_out_with_a_count(image_tree: Path, tmp_path: Path) -> None:
    text = "\n".join(_table_of(image_tree).splitlines()[:-4]) + "\n"  # drop 4 dogs
    manifest = scan_labels(image_tree, _csv(tmp_path / "labels.csv", text))
    assert len(manifest.records) == 20
    assert manifest.warnings == [
        f"4 image files in {image_tree.resolve()} are not in labels.csv and were left out: "
        "dogs/img_08.png, dogs/img_09.png, dogs/img_10.png and 1 more"
    ]


def test_unusable_listed_files_are_skipped_with_the_scans_reasons(
    image_tree: Path, tmp_path: Path
) -> None:
    (image_tree / "cats" / "fake.png").write_text("<html>not an image</html>")
    (image_tree / "cats" / "notes.txt").write_text("hello")
    text = _table_of(image_tree) + "cats/notes.txt,cats\n"
    manifest = scan_labels(image_tree, _csv(tmp_path / "labels.csv", text))
    folders = scan(image_tree)
    assert manifest.key == folders.key
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert reasons["cats/fake.png"] == {s.path: s.reason for s in folders.skipped}["cats/fake.png"]
    assert reasons["cats/notes.txt"] == "not an image extension (.txt)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,kind\na.png,x\n", "needs a column path .* its header is: name, kind"),
        ("", "is empty: expected a header"),
        ("path,label\n", "lists no files"),
        ("path,label\ncats/img_00.png,\n", r"empty label on 1 row: line 2 \('cats/"),
        (
            "path,label,split\ncats/img_00.png,cats,train\ncats/img_01.png,cats,dev\n",
            r"split other than train, valid or test on 1 row: line 3 \('dev'\)",
        ),
        (
            "path,label\ncats/img_00.png,cats\ncats/img_01.png,cats\ncats/img_00.png,dogs\n",
            r"file listed a second time on 1 row: line 4 \('cats/img_00.png, first on line 2'\)",
        ),
        (
            "path,label\ncats/img_00.png,cats\ncats/nope.png,cats\ndogs/gone.png,dogs\n",
            r"file not found in .* on 2 rows: line 3 \('cats/nope.png'\), line 4",
        ),
        ("path,label\n../secret.png,cats\n", r"empty path or a path outside .* on 1 row: line 2"),
        ("path,label\n/etc/passwd,cats\n", r"empty path or a path outside .* on 1 row: line 2"),
    ],
)
def test_table_mistakes_are_one_line_each(
    image_tree: Path, tmp_path: Path, text: str, message: str
) -> None:
    labels = _csv(tmp_path / "labels.csv", text)
    with pytest.raises(LabelsError, match=message) as raised:
        read_labels(labels, image_tree)
    assert "\n" not in str(raised.value)
    with pytest.raises(LabelsError, match=message):
        scan_labels(image_tree, labels)


def test_a_missing_labels_file_is_named(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="labels file not found: .*nowhere.csv"):
        scan_labels(image_tree, tmp_path / "nowhere.csv")


def test_excel_bom_whitespace_and_dot_slash_are_accepted(image_tree: Path, tmp_path: Path) -> None:
    text = "\ufeffPath , Label\n" + "".join(
        f" ./{line.split(',')[0]} , {line.split(',')[1]}\n"
        for line in _table_of(image_tree).splitlines()[1:]
    )
    assert scan_labels(image_tree, _csv(tmp_path / "labels.csv", text)).key == scan(image_tree).key


def _grouped_table(tree: Path) -> str:
    """The class-folder tree's table with a group column: pairs of images as one 'photo'."""
    rows = _table_of(tree).splitlines()
    lines = [rows[0] + ",group"]
    lines += [f"{row},photo {i // 2}" for i, row in enumerate(rows[1:])]
    return "\n".join(lines) + "\n"


def test_a_group_column_is_kept_per_record_and_in_the_key(image_tree: Path, tmp_path: Path) -> None:
    plain = scan_labels(image_tree, _csv(tmp_path / "plain.csv", _table_of(image_tree)))
    grouped = scan_labels(image_tree, _csv(tmp_path / "grouped.csv", _grouped_table(image_tree)))
    assert all(r.group is None for r in plain.records)
    assert plain.key == scan(image_tree).key  # tables without groups keep their key
    by_path = {r.path: r.group for r in grouped.records}
    assert by_path["cats/img_00.png"] == by_path["cats/img_01.png"] == "photo 0"
    assert by_path["dogs/img_11.png"] == "photo 11"
    assert grouped.key != plain.key  # other groups, another manifest in the store
    assert Manifest.from_dict(grouped.to_dict()).records == grouped.records
    assert "group" not in plain.to_dict()["records"][0]  # stored as before groups existed


def test_groups_across_the_tables_own_splits_are_a_warning(tmp_path: Path) -> None:
    tree = tmp_path / "flat"
    for i in range(8):
        write_image(tree / f"{i}.png", seed=i, tint=120 * (i % 2))
    lines = ["path,label,split,group"] + [
        f"{i}.png,{'ab'[i % 2]},{'test' if i >= 6 else 'train'},g{i % 4}" for i in range(8)
    ]
    manifest = scan_labels(tree, _csv(tmp_path / "labels.csv", "\n".join(lines) + "\n"))
    assert (
        "2 groups have images in both the training and the test split of the labels file, "
        "which inflates test accuracy: g2, g3" in manifest.warnings
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "path,label,group\ncats/img_00.png,cats,a\ncats/img_01.png,cats, \n"
            "cats/img_02.png,cats,\n",
            r"empty group \(the table has a group column\) on 2 rows: line 3 \('cats/img_01.png'"
            r"\), line 4 \('cats/img_02.png'\)$",
        ),
        ("path,label,group\ncats/img_00.png,cats\n", r"empty group .* on 1 row: line 2"),
    ],
)
def test_group_mistakes_are_one_line_each(
    image_tree: Path, tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(LabelsError, match=message) as raised:
        read_labels(_csv(tmp_path / "labels.csv", text), image_tree)
    assert "\n" not in str(raised.value)
