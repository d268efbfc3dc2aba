"""Flow wiring that is ours, run by Prefect itself (local mode): retries on I/O only."""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from prefect import flow, task

from flows.pipeline import IO_RETRIES
from tasks.errors import UserError
from tasks.reduce import pca as reduce
from tasks.reduce._progress import reporting

FAST_RETRIES = {**IO_RETRIES, "retry_delay_seconds": [0, 0]}  # same policy, no waiting


def _attempts_until_done(error: Exception, failures: int) -> int:
    """Run a task that fails `failures` times with `error` under the production retry policy."""
    attempts = []

    @task(**FAST_RETRIES)
    def step() -> None:
        attempts.append(1)
        if len(attempts) <= failures:
            raise error

    @flow
    def wrapper() -> None:
        step()

    try:
        wrapper()
    except type(error):
        pass
    return len(attempts)


def test_transient_io_errors_are_retried() -> None:
    assert _attempts_until_done(ConnectionResetError("store hiccup"), failures=2) == 3


def test_bad_input_is_not_retried() -> None:
    assert _attempts_until_done(UserError("no such layer"), failures=5) == 1


def test_io_errors_give_up_after_two_retries() -> None:
    # 10 failures planned: a policy with more retries would make more than 3 attempts.
    assert _attempts_until_done(TimeoutError("object store did not answer"), failures=10) == 3


def test_pca_progress_lines_reach_the_run_log(caplog: pytest.LogCaptureFixture) -> None:
    from flows.progress import ProgressDisplay

    rows = da.from_array(np.random.default_rng(0).random((64, 16)), chunks=(8, 16))

    def fit_with_progress() -> None:
        log = logging.getLogger("featurepipe.reduce")
        with (
            ProgressDisplay("reduce x", log_interval=0.0, unit="rows", log=log) as progress,
            reporting(progress, 64, 2, 0),
        ):
            reduce.ScaledPCA(variance=0.9).fit(rows)

    @flow
    def fit() -> None:
        task(fit_with_progress)()

    fit()
    assert "reduce x: pass 1 of 2 (column statistics): 64/128 rows" in caplog.text


def test_extraction_progress_is_logged_when_no_terminal_shows_a_bar(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flows.progress import ProgressDisplay

    with ProgressDisplay("extract vgg16", log_interval=0.0) as progress:  # pytest: no terminal
        progress(16, 64)
    assert "extract vgg16: 16/64 images" in caplog.text and "min left" in caplog.text


# Near-copies: generated "photos" (coloured discs on a coloured, noisy background) and copies of
# each made by flips, 1-pixel shifts and a quarter turn, as augmentation makes them. Random-init
# VGG16 features pooled after block1 keep copies at cosine >= 0.9995 and other photos <= 0.991
# (measured on these images), so the fixed THRESHOLD separates them for grouping; deeper
# random-init layers do not. The check runs with the default ("auto") rule unless told.
THRESHOLD = 0.995
COPY_OPS = (
    lambda a: a,
    lambda a: a[:, ::-1],
    lambda a: np.roll(a, 1, axis=1),
    lambda a: a[::-1],
    lambda a: np.roll(a, -1, axis=0),
    lambda a: np.rot90(a),
)


def _photo(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    pixels = np.empty((size, size, 3))
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        cy, cx = rng.integers(4, size - 4, 2)
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(3, 9) ** 2] = rng.integers(0, 256, 3)
    return pixels + rng.normal(0, 12, pixels.shape)


@pytest.fixture(scope="module")
def copied_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 photos of 2 classes, 6 copies each, in class folders, and labels.csv naming each
    file's photo as its `group`; one store for every run of the module (features extracted
    once)."""
    from PIL import Image

    work = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    lines = ["path,label,group"]
    for n in range(24):
        label = "ab"[n % 2]
        base = np.clip(_photo(rng) + (label == "b") * np.array([50, 0, -50]), 0, 255)
        (work / "images" / label).mkdir(parents=True, exist_ok=True)
        for copy, op in enumerate(COPY_OPS):
            path = f"{label}/{n:02d}_{copy}.png"
            Image.fromarray(np.ascontiguousarray(op(base.astype(np.uint8)))).save(
                work / "images" / path
            )
            lines.append(f"{path},{label},photo {n}")
    (work / "labels.csv").write_text("\n".join(lines) + "\n")
    return work


def _run(work: Path, **values) -> tuple[dict, dict, list[dict]]:
    """A pipeline run on the copies: its summary, report.json and near_copies.csv rows."""
    import csv
    import json

    from flows.pipeline import pipeline_flow
    from flows.settings import PipelineSettings

    settings = PipelineSettings(
        data=work / "images",
        store=str(work / "store"),
        runs=work / "runs",
        weights="none",
        image_size=32,
        layers=["block1_pool"],
        pooling="avg",
        classifiers=["logreg"],
        **values,
    )
    summary = pipeline_flow(settings)
    run_dir = Path(summary["run_dir"])
    report = json.loads((run_dir / "report.json").read_text())
    with open(run_dir / report["near_copies"]["file"], newline="") as handle:
        return summary, report, list(csv.DictReader(handle))


def _photos_on_both_sides(work: Path, pairs: list[dict]) -> set[str]:
    """Photos (the CSV's groups) with copies in training and in test; near_copies.csv lists
    every test image once."""
    import csv

    with open(work / "labels.csv", newline="") as handle:
        photo = {row["path"]: row["group"] for row in csv.DictReader(handle)}
    tested = {row["file"] for row in pairs}
    return {photo[f] for f in tested} & {photo[f] for f in photo if f not in tested}


def test_a_stratified_split_of_copies_is_reported_and_warned_about(
    copied_photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    summary, report, pairs = _run(copied_photos, split="stratified")
    near = report["near_copies"]
    assert near["rule"] == "auto" and near["n_test"] == len(pairs) == 36
    assert near["leak_estimate"] > 0.5 and near["test_with_copy"] == round(near["share"] * 36)
    assert set(near["accuracy_with"]) == set(near["accuracy_without"]) == {"logreg"}
    assert summary["near_copy_share"] == summary["layers"]["block1_pool"]["near_copy_share"]
    assert summary["near_copy_share"] == near["share"]
    assert summary["near_copy_leak_estimate"] == near["leak_estimate"]
    assert len(_photos_on_both_sides(copied_photos, pairs)) > 12  # the truth: copies leak
    assert any(
        record.levelname == "WARNING"
        and "of the test images have a near-copy in the training images" in record.getMessage()
        and "--group-by near-copies" in record.getMessage()
        for record in caplog.records
    )
    markdown = (Path(summary["run_dir"]) / "report.md").read_text()
    assert "## Near-copies of test images in training" in markdown
    assert "test accuracy overstates accuracy on new images" in markdown


def test_grouping_by_near_copies_keeps_each_photo_on_one_side(
    copied_photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, report, pairs = _run(
        copied_photos, split="grouped", group_by="near-copies", near_copy_threshold=THRESHOLD
    )
    assert report["near_copies"]["share"] == 0.0 and report["near_copies"]["n_test"] > 0
    assert _photos_on_both_sides(copied_photos, pairs) == set()
    found = report["extras"]["near_copy_groups"]
    assert found["n_groups"] == 24 and found["largest_share"] == pytest.approx(6 / 144)
    assert "near-copy groups at cosine >= 0.9950 (fixed): 24 groups for 144 images" in caplog.text
    assert "overstates" not in caplog.text


def test_a_group_column_keeps_each_photo_on_one_side(copied_photos: Path) -> None:
    _, report, pairs = _run(copied_photos, split="grouped", labels=copied_photos / "labels.csv")
    assert _photos_on_both_sides(copied_photos, pairs) == set()
    assert report["near_copies"]["rule"] == "auto"
    assert report["near_copies"]["leak_estimate"] < 0.2


def test_two_group_sources_fail_before_extraction(copied_photos: Path, tmp_path: Path) -> None:
    from flows.pipeline import pipeline_flow
    from flows.settings import PipelineSettings
    from tasks.data.splits import SplitError

    settings = PipelineSettings(
        data=copied_photos / "images",
        labels=copied_photos / "labels.csv",
        store=str(tmp_path / "store"),
        split="grouped",
        group_by="near-copies",
    )
    with pytest.raises(SplitError, match="group column and --group-by near-copies"):
        pipeline_flow(settings)
    assert not (tmp_path / "store").exists()  # nothing was extracted
