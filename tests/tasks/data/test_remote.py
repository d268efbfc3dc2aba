"""Image trees in object storage (moto's S3 server on loopback): same manifest as on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.images import load_rgb
from tasks.data.scan import DatasetError, scan
from tasks.data.unlabelled import scan_for_prediction
from tests.conftest import write_image
from tests.s3 import s3_endpoint, upload  # noqa: F401 (a fixture)


@pytest.mark.usefixtures("s3_endpoint")
def test_s3_tree_scans_like_the_local_folder(image_tree: Path) -> None:
    good = (image_tree / "dogs" / "img_00.png").read_bytes()
    (image_tree / "cats" / "notes.jpg").write_text("this is text, not a JPEG")
    (image_tree / "cats" / "empty.jpg").write_bytes(b"")
    (image_tree / "dogs" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_tree / "dogs" / "readme.txt").write_text("hello")
    (image_tree / "dogs" / ".hidden.png").write_bytes(good)
    (image_tree / "stray.png").write_bytes(good)
    upload(image_tree, "s3://features/images")

    local, remote = scan(image_tree), scan("s3://features/images/")
    assert remote.key == local.key  # same contents, labels, splits: cached features are shared
    assert remote.root == "s3://features/images"
    assert [(r.path, r.size) for r in remote.records] == [(r.path, r.size) for r in local.records]
    assert {(s.path, s.reason) for s in remote.skipped} == {
        (s.path, s.reason) for s in local.skipped
    }
    assert scan("s3://features/images", limit_per_class=5).key == scan(image_tree, 5).key
    url = remote.paths([0])[0]
    assert url == f"s3://features/images/{remote.records[0].path}"
    np.testing.assert_array_equal(
        load_rgb(url, 16), load_rgb(image_tree / local.records[0].path, 16)
    )


@pytest.mark.usefixtures("s3_endpoint")
def test_s3_splits_layout_and_missing_prefix(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for label in ("a", "b"):
            for i in range(3):
                write_image(
                    tmp_path / split / label / f"{i}.png",
                    seed=i + 10 * (label == "b") + 100 * (split == "test"),
                )
    upload(tmp_path, "s3://features/split")
    assert scan("s3://features/split").key == scan(tmp_path).key
    assert scan_for_prediction("s3://features/split").key == scan(tmp_path).key  # predict --data
    assert {r.split for r in scan("s3://features/split").records} == {"train", "test"}
    with pytest.raises(DatasetError, match="not found"):
        scan("s3://features/nothing-here")
