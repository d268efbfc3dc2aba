"""`featurepipe extract` stopped part-way, by a full disk or by Ctrl-C: one clear line, a
consistent store (every chunk marked done holds the right numbers, no temporary files), and a
resume that computes only the chunks that did not make it.

The full disk is real: a small tmpfs mounted in a private mount namespace (`unshare`, no root
needed where user namespaces are allowed), so writes fail with ENOSPC exactly as on a full disk.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.settings import PipelineSettings
from tasks.data.scan import Manifest, scan
from tasks.features.extract import ExtractSettings, extract, plan_extraction
from tasks.features.store import FeatureArray, FeatureStore
from tests.conftest import cli_env, write_image
from tests.floats import assert_features_close

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml

LAYER = "block1_pool"  # 64x64x64 floats = 1 MiB per image at 128 px: 16 images per chunk


FLAGS = (
    "--backbone",
    "vgg16",
    "--weights",
    "none",
    "--layers",
    LAYER,
    "--image-size",
    "128",
    "--batch-size",
    "8",
)
REPO = Path(__file__).resolve().parents[2]


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    return probe.returncode == 0


def _images(folder: Path, count: int) -> tuple[Manifest, ExtractSettings]:
    """`count` generated images and the extraction settings FLAGS stand for."""
    for i in range(count):
        label, tint = ("a", 120) if i % 2 else ("b", 0)
        write_image(folder / label / f"{i}.png", seed=i, size=64, tint=tint)
    settings = PipelineSettings(
        data=folder, backbone="vgg16", weights="none", layers=[LAYER], image_size=128, batch_size=8
    )
    return scan(folder), settings.extract_settings()


def _assert_stopped_cleanly(run: subprocess.CompletedProcess, code: int, reason: str) -> None:
    assert run.returncode == code, run.stderr[-3000:]
    assert reason in run.stderr and "run the same command again to resume" in run.stderr
    assert "Traceback" not in run.stderr


def _assert_consistent(store_path: Path, key: str) -> tuple[FeatureArray, np.ndarray]:
    """The array was stopped part-way and holds nothing half-written; returns its done flags."""
    array = FeatureStore(str(store_path)).feature_array(key)
    done = array.done_flags()
    assert 0 < done.sum() < array.n_chunks  # really stopped part-way through
    assert [(p.chunk, p.kind) for p in array.verify()] == [
        (i, "not_done") for i in np.flatnonzero(~done)
    ]
    assert not list(store_path.rglob("*.partial"))  # no temporary file left behind
    return array, done


def _missing_rows(array: FeatureArray, done: np.ndarray) -> int:
    return sum(
        rows.stop - rows.start for rows in (array.chunk_slice(i) for i in np.flatnonzero(~done))
    )


def _disk_bytes(folder: Path) -> int:
    """Bytes the files take on a page-granular file system such as tmpfs."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


def _extract_on_small_disk(data: Path, work: Path, disk_bytes: int) -> subprocess.CompletedProcess:
    """`featurepipe extract` into a store on a tmpfs of `disk_bytes`; the store is copied out
    before the namespace (and its mount) goes away."""
    disk, kept = work / "small-disk", work / "kept"
    disk.mkdir()
    command = [
        sys.executable,
        "-m",
        "flows",
        "extract",
        "--data",
        str(data),
        "--store",
        str(disk / "store"),
        *FLAGS,
    ]
    script = (
        f"mount -t tmpfs -o size={disk_bytes} tmpfs {shlex.quote(str(disk))} && "
        f"{shlex.join(command)}; rc=$?; cp -a {shlex.quote(str(disk / 'store'))} "
        f"{shlex.quote(str(kept))}; exit $rc"
    )
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.skipif(
    not _namespaces_available(), reason="needs `unshare` with user and mount namespaces"
)
def test_disk_full_keeps_a_consistent_store_and_resumes(tmp_path: Path) -> None:
    manifest, settings = _images(tmp_path / "images", 64)
    reference_store = FeatureStore(str(tmp_path / "reference"))
    key = extract(manifest, reference_store, settings).feature_keys[LAYER]
    reference = reference_store.feature_array(key)
    assert reference.n_chunks == 4

    # room for the metadata and about half of the chunks
    run = _extract_on_small_disk(
        tmp_path / "images", tmp_path, _disk_bytes(tmp_path / "reference") // 2
    )
    _assert_stopped_cleanly(run, 2, "No space left on device")
    array, done = _assert_consistent(tmp_path / "kept", key)
    for index in np.flatnonzero(done):  # every chunk marked done holds the right numbers
        rows = array.chunk_slice(index)
        assert_features_close(array.data[rows], reference.data[rows])

    resumed = extract(manifest, FeatureStore(str(tmp_path / "kept")), settings)
    assert resumed.images_computed == _missing_rows(array, done)
    assert_features_close(array.data[...], reference.data[...])


def _as_in_a_terminal() -> None:
    """Give the child the SIGINT disposition of a foreground terminal process. A shell starts
    background jobs (`make test &`, CI runners) with SIGINT ignored, children inherit that, and
    Python then never raises KeyboardInterrupt: why this test once failed only in full CI runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_finished_chunks_and_resumes(tmp_path: Path) -> None:
    manifest, settings = _images(tmp_path / "images", 160)  # 10 chunks: Ctrl-C lands after one
    key = plan_extraction(manifest, settings).key(LAYER)
    first_chunk_done = tmp_path / "store" / "features" / key / "done" / "c" / "0"
    command = [sys.executable, "-m", "flows", "extract", "--data", str(tmp_path / "images")]
    process = subprocess.Popen(
        [*command, "--store", str(tmp_path / "store"), *FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
        preexec_fn=_as_in_a_terminal,
    )
    deadline = time.monotonic() + 300
    while not first_chunk_done.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk finished in 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = process.communicate(timeout=120)
    stopped = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    _assert_stopped_cleanly(stopped, 130, "interrupted")
    array, done = _assert_consistent(tmp_path / "store", key)

    resumed = extract(manifest, FeatureStore(str(tmp_path / "store")), settings)
    assert resumed.images_computed == _missing_rows(array, done)
    assert FeatureStore(str(tmp_path / "store")).feature_array(key).verify() == []
