"""Disk full while writing chunks: one clear error, a consistent store, and a resume that
recomputes only the chunks that did not make it.

The full disk is real: a small tmpfs mounted in a private mount namespace (`unshare`, no root
needed where user namespaces are allowed), so writes fail with ENOSPC exactly as on a full disk.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.settings import PipelineSettings
from tasks.dataset import scan
from tasks.extract import extract
from tasks.store import FeatureStore
from tests.conftest import write_image

LAYER = "block1_pool"  # 64x64x64 floats = 1 MiB per image at 128 px: 16 images per chunk
FLAGS = ("--backbone", "vgg16", "--weights", "none", "--layers", LAYER, "--image-size", "128",
         "--batch-size", "8")


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_available(),
                                reason="needs `unshare` with user and mount namespaces")


def _settings(data: Path, store: Path) -> PipelineSettings:
    return PipelineSettings(data=data, store=str(store), backbone="vgg16", weights="none",
                            layers=[LAYER], image_size=128, batch_size=8)


def _disk_bytes(folder: Path) -> int:
    """Bytes the files take on a page-granular file system such as tmpfs."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


def _extract_on_small_disk(data: Path, work: Path, disk_bytes: int) -> subprocess.CompletedProcess:
    """`featurepipe extract` into a store on a tmpfs of `disk_bytes`; the store is copied out
    before the namespace (and its mount) goes away."""
    disk, kept = work / "small-disk", work / "kept"
    disk.mkdir()
    command = [sys.executable, "-m", "flows", "extract", "--data", str(data),
               "--store", str(disk / "store"), *FLAGS]
    script = (f"mount -t tmpfs -o size={disk_bytes} tmpfs {shlex.quote(str(disk))} && "
              f"{shlex.join(command)}; rc=$?; cp -a {shlex.quote(str(disk / 'store'))} "
              f"{shlex.quote(str(kept))}; exit $rc")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def test_disk_full_keeps_a_consistent_store_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "images"
    for i in range(64):
        label, tint = ("a", 120) if i % 2 else ("b", 0)
        write_image(data / label / f"{i}.png", seed=i, size=64, tint=tint)
    manifest = scan(data)
    reference_store = FeatureStore(str(tmp_path / "reference"))
    settings = _settings(data, tmp_path / "reference").extract_settings()
    key = extract(manifest, reference_store, settings).feature_keys[LAYER]
    reference = reference_store.feature_array(key)
    assert reference.n_chunks == 4

    # room for the metadata and about half of the chunks
    run = _extract_on_small_disk(data, tmp_path, _disk_bytes(tmp_path / "reference") // 2)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "No space left on device" in run.stderr
    assert "run the same command again to resume" in run.stderr
    assert "Traceback" not in run.stderr

    kept = FeatureStore(str(tmp_path / "kept"))
    array = kept.feature_array(key)
    done = array.done_flags()
    assert 0 < done.sum() < array.n_chunks  # the disk filled up part-way through
    problems = array.verify()
    assert problems == [f"chunk {i}: missing (not marked done)" for i in np.flatnonzero(~done)]
    for index in np.flatnonzero(done):  # every chunk marked done holds the right numbers
        rows = array.chunk_slice(index)
        np.testing.assert_array_equal(array.data[rows], reference.data[rows])
    assert not list((tmp_path / "kept").rglob("*.partial"))  # no half-written temp files left

    resumed = extract(manifest, kept, settings)
    assert resumed.images_computed == sum(
        array.chunk_slice(i).stop - array.chunk_slice(i).start for i in np.flatnonzero(~done))
    np.testing.assert_array_equal(kept.feature_array(key).data[...], reference.data[...])
