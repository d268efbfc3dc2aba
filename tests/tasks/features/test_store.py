"""Store maintenance on a real Zarr store: gc removes what crashes and deletions leave behind,
never a reduction another process is writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.features.store import FeatureStore


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
