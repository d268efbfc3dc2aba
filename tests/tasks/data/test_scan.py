"""Scanning folders into manifests: layouts, bad files, content keys, limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.data.scan import DatasetError, scan
from tests.conftest import write_image


def test_scan_class_folders(image_tree: Path) -> None:
    manifest = scan(image_tree)
    assert manifest.class_names == ["cats", "dogs"]
    assert len(manifest.records) == 24
    assert all(r.split == "all" and len(r.sha256) == 64 for r in manifest.records)
    assert manifest.labels.count(0) == 12


def test_bad_files_are_skipped_with_reasons(image_tree: Path) -> None:
    (image_tree / "cats" / "empty.jpg").write_bytes(b"")
    (image_tree / "cats" / "notes.jpg").write_text("this is text, not a JPEG")
    good = (image_tree / "dogs" / "img_00.png").read_bytes()
    (image_tree / "dogs" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_tree / "dogs" / "readme.txt").write_text("hello")
    (image_tree / "dogs" / ".hidden.png").write_bytes(good)
    (image_tree / "stray.png").write_bytes(good)
    manifest = scan(image_tree)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert len(manifest.records) == 24
    assert set(reasons) == {
        "cats/empty.jpg",
        "cats/notes.jpg",
        "dogs/truncated.png",
        "dogs/readme.txt",
        "dogs/.hidden.png",
        "stray.png",
    }
    assert "not an image extension" in reasons["dogs/readme.txt"]
    assert "class folder" in reasons["stray.png"]


def test_key_ignores_names_but_not_pixels(image_tree: Path) -> None:
    before = scan(image_tree).key
    os.rename(image_tree / "cats" / "img_00.png", image_tree / "cats" / "renamed.png")
    assert scan(image_tree).key == before
    write_image(image_tree / "cats" / "renamed.png", seed=999)
    assert scan(image_tree).key != before


def test_split_subtrees_and_nested_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for label in ("a", "b"):
            for i in range(3):
                write_image(tmp_path / split / label / "deeper" / f"{i}.png", seed=i + len(split))
    manifest = scan(tmp_path)
    assert {r.split for r in manifest.records} == {"train", "test"}
    assert manifest.class_names == ["a", "b"]
    assert len(manifest.records) == 12


def test_limit_per_class_is_stable(image_tree: Path) -> None:
    first = scan(image_tree, limit_per_class=5)
    assert len(first.records) == 10
    assert [r.sha256 for r in scan(image_tree, limit_per_class=5).records] == [
        r.sha256 for r in first.records
    ]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        scan(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        scan(tmp_path)


def test_manifest_paths_cannot_escape_the_root(image_tree: Path) -> None:
    from dataclasses import replace

    from tasks.data.scan import Manifest

    manifest = scan(image_tree)
    assert manifest.paths([0])[0] == image_tree / manifest.records[0].path
    evil = replace(manifest.records[0], path="../../etc/passwd")
    tampered = Manifest.from_dict({**manifest.to_dict(), "records": [evil.__dict__]})
    with pytest.raises(DatasetError, match="escapes"):
        tampered.paths()
