"""Store maintenance on a real Zarr store: gc removes what crashes and deletions leave behind,
never a reduction another process is writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.data.scan import scan
from tasks.features.store import FeatureStore, StoreError
from tests.conftest import write_image


def _manifest(folder: Path):
    for label in ("a", "b"):
        write_image(folder / label / "0.png", seed=0)
    return scan(folder)


def test_gc_removes_orphans_and_crash_leftovers_but_not_a_reduction_being_written(
    tmp_path: Path,
) -> None:
    store = FeatureStore(str(tmp_path / "store"))
    store.save_reduction("orphan", {"projected": np.zeros((2, 1))}, {"feature_key": "gone"})
    crashed = store.root.require_group("reduced").require_group("crashed")
    crashed.attrs.put({"feature_key": "gone", "complete": False})  # what a kill leaves

    with store.locked(["crashed"]):  # another process is still writing it
        assert store.gc() == ["reduced/orphan"]
    assert store.gc() == ["reduced/crashed"]
    assert list(store.reductions()) == []


def test_inspection_needs_an_existing_store_and_never_writes(tmp_path: Path) -> None:
    for mode in ("r", "r+"):
        with pytest.raises(StoreError, match="^no feature store at .*typo$"):
            FeatureStore(str(tmp_path / "typo"), mode=mode)
    assert list(tmp_path.iterdir()) == []  # nothing created, not even a lock folder

    FeatureStore(str(tmp_path / "store")).save_manifest(_manifest(tmp_path / "images"))
    read_only = FeatureStore(str(tmp_path / "store"), mode="r")
    assert read_only.summaries() == []
    with pytest.raises(ValueError, match="read-only"):
        read_only.create_feature_array("k", 2, 2, "float32", {})


def test_verify_names_each_bad_chunk_and_its_kind_and_repair_forgets_them(
    tmp_path: Path,
) -> None:
    store = FeatureStore(str(tmp_path / "store"))
    array = store.create_feature_array("k", 12, 4, "float32", {}, chunk_bytes=4 * 4 * 4)
    assert array.n_chunks == 3  # 4 rows per chunk
    for index in range(3):
        array.write_chunk(index, np.full((4, 4), index, np.float32))  # chunk 0: all zeros
    assert array.verify() == []

    array.data[4:8] = np.nan  # chunk 1: done but not finite
    (tmp_path / "store" / "features" / "k" / "x" / "c" / "2" / "0").unlink()  # chunk 2: no data
    array.unmark_chunk(0)  # chunk 0: not done
    problems = array.verify()
    assert [(p.chunk, p.kind) for p in problems] == [
        (0, "not_done"),
        (1, "not_finite"),
        (2, "no_data"),
    ]
    assert str(problems[2]) == "chunk 2: missing data (marked done, object absent)"

    array.repair(problems)
    assert array.missing_chunks() == [0, 1, 2]
