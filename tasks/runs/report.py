"""Writing a run: per classifier its figures, mistakes (CSV and gallery) and hashed model, then
report.md and report.json (through tasks.runs.folder, which does every run-folder write)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tasks.classify.models import ClassifierResult
from tasks.features.near_copies import LeakCheck
from tasks.runs.folder import (
    MODELS_DIR,
    atomic_write,
    is_finished,
    save_model,
    to_plain,
    write_report,
)
from tasks.runs.gallery import mistakes_by_confidence, predicted_scores, write_gallery
from tasks.runs.markdown import report_markdown
from tasks.runs.plots import confusion_png, learning_curves_png
from tasks.runs.redact import redact
from tasks.runs.schema import ClassifierReport, RunReport


def _write_misclassified(
    path: Path,
    mistakes: np.ndarray,
    test_files: list[str],
    y_test: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    names: list[str],
) -> None:
    """CSV of the test files the classifier got wrong, in the gallery's order (most confident
    first), with the score of the predicted class."""

    def write(temp: Path) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "true", "predicted", "score"])
            writer.writerows(
                [test_files[i], names[y_test[i]], names[y_pred[i]], f"{confidence[i]:.4f}"]
                for i in mistakes
            )

    atomic_write(path, write)


NEAR_COPIES_FILE = "near_copies.csv"


def _write_near_copies(path: Path, check: LeakCheck, test_files: list[str]) -> None:
    """CSV of every test image, its most similar training image and their cosine similarity,
    most similar first: the pairs behind the report's `near_copies` share, to look at."""

    def write(temp: Path) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "nearest_training_file", "similarity", "near_copy"])
            for i in np.argsort(-check.similarity, kind="stable"):
                writer.writerow(
                    [
                        test_files[i],
                        check.nearest_files[i],
                        f"{check.similarity[i]:.4f}",
                        bool(check.has_copy[i]),
                    ]
                )

    atomic_write(path, write)


def _near_copies_entry(
    run_dir: Path,
    check: LeakCheck | None,
    results: list[ClassifierResult],
    test_files: list[str],
    y_test: np.ndarray,
) -> dict | None:
    """The report's `near_copies` section, and near_copies.csv when the check names files."""
    if check is None:
        return None
    section = check.section(y_test, {r.name: r.y_pred for r in results})
    if check.nearest_files:
        _write_near_copies(run_dir / NEAR_COPIES_FILE, check, test_files)
        section["file"] = NEAR_COPIES_FILE
    return to_plain(section)


def _classifier_entry(
    run_dir: Path,
    result: ClassifierResult,
    class_names: list[str],
    test_files: list[str],
    test_paths: list[Path],
    y_test: np.ndarray,
) -> ClassifierReport:
    """Write one classifier's files and return its section of the report."""
    name = result.name
    y_pred = np.asarray(result.y_pred)
    images = {"confusion": f"confusion_{name}.png"}
    confusion_png(
        result.confusion, class_names, run_dir / images["confusion"], f"{name}: test confusion"
    )
    mistakes = mistakes_by_confidence(y_test, y_pred, result.scores)
    confidence = predicted_scores(y_pred, result.scores)
    misclassified = f"misclassified_{name}.csv"
    _write_misclassified(
        run_dir / misclassified, mistakes, test_files, y_test, y_pred, confidence, class_names
    )
    gallery = write_gallery(
        run_dir / f"gallery_{name}.png",
        mistakes,
        test_paths,
        y_test,
        y_pred,
        confidence,
        class_names,
    )
    if gallery is not None:
        images["gallery"] = gallery.name
    if result.history:
        images["learning_curves"] = f"learning_curves_{name}.png"
        learning_curves_png(result.history, run_dir / images["learning_curves"])
    model_file, model_sha256 = save_model(run_dir, name, result.model)
    return ClassifierReport(
        metrics=to_plain(result.metrics),
        best_params=to_plain(result.best_params),
        confusion=to_plain(result.confusion),
        fit_seconds=float(result.fit_seconds),
        predict_seconds=float(result.predict_seconds),
        model_file=model_file,
        model_sha256=model_sha256,
        images=images,
        misclassified_file=misclassified,
        n_misclassified=len(mistakes),
        history=to_plain(result.history),
    )


def write_run(
    run_dir: Path,
    *,
    settings: dict,
    keys: dict,
    results: list[ClassifierResult],
    class_names: list[str],
    test_files: list[str],
    y_test: np.ndarray,
    image_root: str | Path | None = None,
    images: dict[str, str] | None = None,
    extras: dict | None = None,
    near_copies: LeakCheck | None = None,
) -> RunReport:
    """Write a complete run folder and return its report.

    `test_files` name the test images as the report shows them, relative to `image_root`
    (where the gallery reads its thumbnails). `images` are run-wide figures the caller already
    drew into the folder. `near_copies` (the test rows' near-copy check) becomes the report's
    `near_copies` section, with each classifier's accuracy with and without a near-copy in
    training, and near_copies.csv. The folder name is the run id; an existing report is never
    overwritten; credentials in the settings are masked.
    """
    run_dir = Path(run_dir)
    y_test = np.asarray(y_test)
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate classifier names in results: {names}")
    if len(test_files) != len(y_test):
        raise ValueError(f"{len(test_files)} test files but {len(y_test)} test labels")
    if is_finished(run_dir):
        raise FileExistsError(f"{run_dir} already holds a finished run")
    (run_dir / MODELS_DIR).mkdir(parents=True, exist_ok=True)

    test_paths = [Path(image_root or "") / file for file in test_files]
    classifiers = {
        r.name: _classifier_entry(run_dir, r, class_names, test_files, test_paths, y_test)
        for r in results
    }
    best = max(classifiers, key=lambda n: classifiers[n].accuracy, default=None)
    report = RunReport(
        run_id=run_dir.name,
        created=datetime.now(UTC).isoformat(timespec="milliseconds"),
        settings=to_plain(redact(settings)),
        keys=to_plain(keys),
        class_names=list(class_names),
        n_test=len(y_test),
        best_classifier=best,
        classifiers=classifiers,
        extras=to_plain(extras or {}),
        images=dict(images or {}),
        near_copies=_near_copies_entry(run_dir, near_copies, results, test_files, y_test),
    )
    write_report(run_dir, report, report_markdown(report))
    return report
