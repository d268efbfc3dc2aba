"""`--precision` as a user gives it: a real `featurepipe extract` process and store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tasks.features.store import FeatureStore
from tests.conftest import featurepipe

pytestmark = pytest.mark.slow  # a real Prefect flow per call, see pyproject.toml


def extract(data: Path, store: Path, *flags: str) -> subprocess.CompletedProcess:
    args = ["extract", "--data", str(data), "--store", str(store), "--weights", "none"]
    args += ["--image-size", "32", "--layers", "block1_pool", "--json", *flags]
    return featurepipe(*args, cwd=store.parent)


def test_precision_flag_reaches_the_stored_features(image_tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    keys = {}
    for precision in ("float32", "bfloat16"):
        done = extract(image_tree, store, "--precision", precision)
        assert done.returncode == 0, done.stderr[-3000:]
        keys[precision] = json.loads(done.stdout)["feature_keys"]["block1_pool"]

    assert keys["float32"] != keys["bfloat16"]
    attrs = FeatureStore(str(store)).feature_array(keys["bfloat16"]).attrs
    assert attrs["precision"] == "bfloat16"
    assert "precision" not in FeatureStore(str(store)).feature_array(keys["float32"]).attrs

    wrong = extract(image_tree, store, "--precision", "bf16")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: invalid settings: precision")
