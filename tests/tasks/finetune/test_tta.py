"""Test-time augmentation and the newer fine-tuning options on a real (tiny) fine-tuning run:
the 8 views are the square's symmetries, the run's test scores and `predict --tta` are the
mean of the 8 views' softmax computed here by hand, label smoothing and colour jitter train,
the report records them, and each epoch reports its batches as they go."""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flows.finetune import FinetuneFlowSettings
from tasks.backbones.registry import get_spec, load_preprocess
from tasks.data.images import load_rgb
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.progress import epoch_progress
from tasks.finetune.settings import FinetuneSettings
from tasks.finetune.training import MODEL_NAME, run_finetune
from tasks.finetune.tta import VIEWS, dihedral_views, mean_over_views
from tasks.runs.folder import load_model, new_run_id
from tasks.runs.predict import plan_prediction, predict_folder
from tests.conftest import write_image

# Same process, same kernels, but other batch compositions than the run's own predictions.
TOLERANCE = 1e-5

SETTINGS = FinetuneSettings(
    backbone="vgg16",
    weights="none",
    image_size=32,
    head=(8,),
    batch_norm=True,
    phase1_epochs=1,
    phase2_epochs=0,
    # nearly untrained: its predictions are unsure and some test images are wrong, so the
    # report's misclassified list has scores to compare
    phase1_learning_rate=1e-9,
    batch_size=4,
    label_smoothing=0.1,
    brightness_jitter=0.1,
    contrast_jitter=0.2,
    saturation_jitter=0.2,
    hue_jitter=0.05,
    tta=True,
)


def numpy_views(image: np.ndarray) -> list[np.ndarray]:
    """The 8 turns and mirrors of one square image, computed with numpy, in VIEWS order."""
    turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return turns + [np.flip(turn, axis=1) for turn in turns]


def by_hand(model, paths: list[Path], preprocess, size: int, tta: bool) -> np.ndarray:
    """Softmax per image, averaged over its views computed here (or of the image alone)."""
    out = []
    for path in paths:
        image = load_rgb(path, size)
        views = np.stack(numpy_views(image) if tta else [image])
        out.append(np.asarray(model.predict(preprocess(views), verbose=0)).mean(axis=0))
    return np.stack(out)


@contextlib.contextmanager
def progress_lines() -> Iterator[list[str]]:
    """The messages fine-tuning's progress logger emits inside the block (also in a module
    fixture, where pytest's caplog is not available)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("featurepipe.finetune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fine-tuning run with every new option on; its in-epoch progress lines recorded."""
    root = tmp_path_factory.mktemp("tta")
    data = root / "images"
    for label, tint in (("cats", 0), ("dogs", 120)):
        for i in range(8):
            write_image(data / label / f"img_{i:02d}.png", seed=10 * tint + i, size=32, tint=tint)
    manifest = scan(data)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    with progress_lines() as lines:
        run_dir = root / "runs" / new_run_id()
        report = run_finetune(manifest, train, test, SETTINGS, run_dir, progress_interval=0)
    return {
        "data": data,
        "run_dir": run_dir,
        "report": report,
        "test_paths": [Path(manifest.root) / manifest.records[i].path for i in test],
        "fit_images": report.extras["n_train"],
        "lines": lines,
    }


def test_views_are_the_squares_symmetries_image_major() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3)).astype(np.float32)
    views = np.asarray(dihedral_views(images))
    assert views.shape == (3 * VIEWS, 5, 5, 3)
    for i, image in enumerate(images):
        for got, expected in zip(
            views[VIEWS * i : VIEWS * (i + 1)], numpy_views(image), strict=True
        ):
            np.testing.assert_array_equal(got, expected)
    scores = np.arange(2 * VIEWS * 3, dtype=float).reshape(2 * VIEWS, 3)
    np.testing.assert_allclose(mean_over_views(scores), [scores[:8].mean(0), scores[8:].mean(0)])


def test_the_runs_test_scores_are_the_mean_of_the_8_views(finetuned: dict) -> None:
    report, run_dir = finetuned["report"], finetuned["run_dir"]
    assert report.settings["tta"] is True and report.settings["label_smoothing"] == 0.1
    assert report.settings["hue_jitter"] == 0.05
    assert report.extras["test_time_augmentation"].startswith("8 dihedral views")
    model = load_model(run_dir, MODEL_NAME)
    preprocess = load_preprocess(get_spec("vgg16"))
    paths = finetuned["test_paths"]
    tta = by_hand(model, paths, preprocess, 32, tta=True)
    plain = by_hand(model, paths, preprocess, 32, tta=False)
    names = report.class_names
    truth = np.array([names.index(p.parent.name) for p in paths])
    predicted = np.argmax(tta, axis=1)
    entry = report.classifiers[MODEL_NAME]
    assert entry.accuracy == pytest.approx(np.mean(predicted == truth))
    with (run_dir / entry.misclassified_file).open() as handle:
        wrong = {row["file"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert wrong, "the nearly untrained model should get some test images wrong"
    for i, path in enumerate(paths):
        key = f"{path.parent.name}/{path.name}"
        assert (key in wrong) == (predicted[i] != truth[i])
        if key in wrong:  # the CSV keeps 4 decimals
            assert wrong[key] == pytest.approx(tta[i, predicted[i]], abs=1e-4)
    assert np.abs(tta - plain).max() > 1e-3  # the views matter: the check above can tell


def test_predict_tta_on_a_finetuned_run(finetuned: dict, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    for path in finetuned["test_paths"]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    plan = plan_prediction(finetuned["run_dir"])
    seen: list[int] = []
    rows, _, info = predict_folder(plan, folder, lambda done, _: seen.append(done), tta=True)
    paths = sorted(folder.iterdir())
    assert seen and seen[-1] == len(paths) and seen == sorted(seen)  # images, per batch
    assert [r["file"] for r in rows] == [p.name for p in paths]
    assert info["tta"] and {r["tta_views"] for r in rows} == {VIEWS}
    names = plan.report.class_names
    scores = np.array([[r[f"score_{c}"] for c in names] for r in rows])
    preprocess = load_preprocess(get_spec("vgg16"))
    expected = by_hand(plan.model, paths, preprocess, 32, tta=True)
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE)
    assert [r["predicted_class"] for r in rows] == [names[i] for i in expected.argmax(axis=1)]
    plain, _, _ = predict_folder(plan, folder)
    assert "tta_views" not in plain[0]  # the no-TTA output is unchanged


def test_each_epoch_logs_its_batches(finetuned: dict) -> None:
    batches = -(-finetuned["fit_images"] // SETTINGS.batch_size)
    progress = [line for line in finetuned["lines"] if "images/s" in line]
    assert len(progress) == batches  # interval 0: every batch
    assert progress[-1].startswith(f"phase 1 epoch 1/1: batch {batches}/{batches}, ")
    assert progress[-1].endswith("0 s left in the epoch")


def test_progress_lines_follow_the_interval() -> None:
    """A fake clock: 20 s per batch, a 30 s interval, 10 images in batches of 4."""
    now = [100.0]
    callback = epoch_progress(10, 4, lambda e: f"epoch {e + 1}", 30.0, clock=lambda: now[0])
    with progress_lines() as lines:
        callback.on_epoch_begin(0)
        for batch in range(3):
            now[0] += 20.0
            callback.on_train_batch_end(batch)
    assert lines == [
        "epoch 1: batch 2/3, 0.2 images/s, 20 s left in the epoch",  # 40 s: past the interval
        "epoch 1: batch 3/3, 0.2 images/s, 0 s left in the epoch",  # the epoch's last batch
    ]


def test_the_flow_settings_hand_the_new_options_to_fine_tuning() -> None:
    options = {"tta": True, "label_smoothing": 0.1, "hue_jitter": 0.05, "contrast_jitter": 0.2}
    handed = FinetuneFlowSettings(**options).finetune_settings()
    assert {name: getattr(handed, name) for name in options} == options
    assert FinetuneFlowSettings().finetune_settings().colour_jitter is False  # off by default
