"""Run folders written from real fitted classifiers on scikit-learn's digits (the test images
written as PNG files, so the galleries show real thumbnails)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tasks.classify.models import predict_scores, train_and_evaluate
from tasks.runs.folder import (
    ModelIntegrityError,
    list_runs,
    load_model,
    new_run_id,
    read_report,
    sha256_file,
)
from tasks.runs.gallery import GALLERY_CAP
from tasks.runs.markdown import metrics_table, run_summary_markdown
from tasks.runs.plots import bar_chart_png, explained_variance_png
from tasks.runs.report import write_run
from tasks.runs.schema import RunReport

REPO_ROOT = Path(__file__).resolve().parents[3]
CLASS_NAMES = [f"digit{d}" for d in range(10)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"dataset": "digits", "backbone": "none", "layer": "pixels"}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict:
    images = tmp_path_factory.mktemp("digit-images")
    X, y = load_digits(return_X_y=True)
    files = np.array([f"img_{i:04d}.png" for i in range(len(y))])
    X_train, X_test, y_train, y_test, _, files_test = train_test_split(
        X / 16.0, y, files, test_size=0.25, stratify=y, random_state=0
    )
    for pixels, name in zip(X_test, files_test, strict=True):
        image = (pixels.reshape(8, 8) * 255).astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
        Image.fromarray(image).save(images / name)
    return {
        "image_root": images,
        "X_train": X_train,
        "y_train": y_train,
        "X_test": X_test,
        "y_test": y_test,
        "test_files": files_test.tolist(),
    }


@pytest.fixture(scope="module")
def results(split) -> list:
    data = (split["X_train"], split["y_train"], split["X_test"], split["y_test"], CLASS_NAMES)
    return [
        train_and_evaluate("svm", *data, options={"param_grid": {"C": [10]}, "cv_folds": 2}),
        train_and_evaluate("knn", *data),
        train_and_evaluate("dense256", *data, options={"epochs": 3, "batch_size": 64}),
    ]


def _write(
    root: Path, results: list, split: dict, settings: dict = SETTINGS, **kwargs
) -> tuple[Path, RunReport]:
    run_dir = root / new_run_id()
    report = write_run(
        run_dir,
        settings=settings,
        keys={"feature_key": "f" * 16, "reduce_key": "r" * 16},
        results=results,
        class_names=CLASS_NAMES,
        test_files=split["test_files"],
        y_test=split["y_test"],
        image_root=split["image_root"],
        **kwargs,
    )
    return run_dir, report


@pytest.fixture(scope="module")
def run(tmp_path_factory, results, split) -> tuple[Path, RunReport]:
    extras = {
        "n_components": np.int64(32),
        "evr": np.float32(0.875),
        "skipped": [Path("bad.jpeg")],
        "nan": float("nan"),
    }
    return _write(tmp_path_factory.mktemp("runs"), results, split, extras=extras)


def test_write_run_produces_every_file(run) -> None:
    run_dir, report = run
    expected = {
        "report.json",
        "report.md",
        "models/svm.joblib",
        "models/knn.joblib",
        "models/dense256.keras",
        "learning_curves_dense256.png",
    }
    for name in ("svm", "knn", "dense256"):
        expected |= {f"confusion_{name}.png", f"misclassified_{name}.csv", f"gallery_{name}.png"}
        assert report.classifiers[name].n_misclassified > 0  # so each has a gallery
    written = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert written == expected  # no stray temp files, no learning curves for sklearn models
    for png in run_dir.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)


def test_report_json_is_plain_and_complete(run, split) -> None:
    run_dir, report = run
    assert json.loads((run_dir / "report.json").read_text()) == report.to_json()
    assert read_report(run_dir) == report
    assert report.extras == {
        "n_components": 32,
        "evr": 0.875,
        "skipped": ["bad.jpeg"],
        "nan": None,
    }
    assert report.keys["feature_key"] == "f" * 16
    assert report.n_test == len(split["y_test"])
    svm = report.classifiers["svm"]
    assert svm.best_params["C"] == 10
    assert svm.model_sha256 == sha256_file(run_dir / svm.model_file)
    assert report.classifiers["dense256"].history["val_loss"]
    accuracies = report.accuracy()
    assert report.best_classifier == max(accuracies, key=accuracies.get)


def test_reports_without_newer_fields_still_load(run) -> None:
    run_dir, report = run
    data = report.to_json()
    del data["images"], data["near_copies"]
    loaded = RunReport.from_json(data)
    assert loaded.images == {} and loaded.near_copies is None


def test_near_copies_section_csv_and_markdown(tmp_path, results, split) -> None:
    """The check's figures per classifier, its pairs in near_copies.csv (most similar first),
    and a report.md section that says the accuracy overstates when most tests have a copy."""
    from tasks.features.near_copies import LeakCheck
    from tasks.runs.markdown import artifact_markdown

    n = len(split["y_test"])
    similarity = np.linspace(0.5, 1.0, n, dtype=np.float32)  # the last 60% are copies
    check = LeakCheck(0.7, np.arange(n), similarity, tuple(f"train_{i}.png" for i in range(n)))
    run_dir, report = _write(tmp_path, results[:2], split, near_copies=check)
    near = report.near_copies
    copy = similarity >= 0.7
    assert near["test_with_copy"] == copy.sum() and near["share"] == pytest.approx(copy.mean())
    for result in results[:2]:
        right = result.y_pred == split["y_test"]
        assert near["accuracy_with"][result.name] == pytest.approx(right[copy].mean())
        assert near["accuracy_without"][result.name] == pytest.approx(right[~copy].mean())
    assert read_report(run_dir).near_copies == near
    with open(run_dir / near["file"], newline="") as handle:
        pairs = list(csv.DictReader(handle))
    assert [row["file"] for row in pairs[:2]] == split["test_files"][-1:-3:-1]
    assert pairs[0] == {
        "file": split["test_files"][-1],
        "nearest_training_file": f"train_{n - 1}.png",
        "similarity": "1.0000",
        "near_copy": "True",
    }
    markdown = (run_dir / "report.md").read_text()
    assert "## Near-copies of test images in training" in markdown
    assert f"{copy.sum()} of {n} test images" in markdown
    assert "overstates accuracy on new images" in markdown
    assert "[near_copies.csv](near_copies.csv)" in markdown
    assert "## Near-copies of test images in training" in artifact_markdown(report, run_dir)
    clean = LeakCheck(0.7, np.arange(n), np.zeros(n, dtype=np.float32))
    _, quiet = _write(tmp_path, results[:1], split, near_copies=clean)
    assert quiet.near_copies["accuracy_with"] == {"svm": None}
    assert "overstates" not in (tmp_path / quiet.run_id / "report.md").read_text()


def _misclassified(run_dir: Path, name: str) -> list[dict]:
    with open(run_dir / f"misclassified_{name}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_misclassified_csv_lists_wrong_predictions_most_confident_first(
    run, results, split
) -> None:
    run_dir, report = run
    for result in results:
        rows = _misclassified(run_dir, result.name)
        wrong = np.flatnonzero(result.y_pred != split["y_test"])
        assert len(rows) == len(wrong) == report.classifiers[result.name].n_misclassified
        index = {f: i for i, f in enumerate(split["test_files"])}
        assert sorted(index[row["file"]] for row in rows) == wrong.tolist()
        for row in rows:
            i = index[row["file"]]
            assert row["true"] == CLASS_NAMES[split["y_test"][i]]
            assert row["predicted"] == CLASS_NAMES[result.y_pred[i]]
            assert float(row["score"]) == pytest.approx(
                result.scores[i, result.y_pred[i]], abs=1e-4
            )
        scores = [float(row["score"]) for row in rows]
        assert scores == sorted(scores, reverse=True)


def _gallery_rows(path: Path) -> int:
    """Rows of thumbnails in a gallery PNG: its height is 1.55 in per row at 80 dpi."""
    with Image.open(path) as image:
        return round(image.height / (1.55 * 80))


def test_gallery_is_capped(run) -> None:
    run_dir, report = run
    counts = {name: entry.n_misclassified for name, entry in report.classifiers.items()}
    assert max(counts.values()) > GALLERY_CAP and min(counts.values()) < GALLERY_CAP - 6
    for name, count in counts.items():
        shown = min(count, GALLERY_CAP)
        assert _gallery_rows(run_dir / f"gallery_{name}.png") == -(-shown // 6), name


def test_no_gallery_without_mistakes(tmp_path, results, split) -> None:
    perfect = replace(results[1], y_pred=np.asarray(split["y_test"]))
    run_dir, report = _write(tmp_path, [perfect], split)
    assert "gallery" not in report.classifiers["knn"].images
    assert not (run_dir / "gallery_knn.png").exists() and not _misclassified(run_dir, "knn")


def test_markdown_has_tables_and_image_links(run) -> None:
    run_dir, report = run
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith(f"# Run {run_dir.name}")
    assert "| classifier | accuracy | macro F1 | weighted F1 | fit s |" in markdown
    assert "| class | precision | recall | F1 | support |" in markdown
    assert "| true \\ predicted | digit0 |" in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    for link in links:
        assert (run_dir / link).is_file()
    assert {"learning_curves_dense256.png", "gallery_knn.png", "confusion_svm.png"} <= set(links)
    summary = run_summary_markdown(report)
    assert summary in markdown and "dataset `digits`" in summary


def test_metrics_table_rows(run) -> None:
    _, report = run
    rows = metrics_table(report)
    assert [r["classifier"] for r in rows] == ["svm", "knn", "dense256"]
    assert set(rows[0]) == {"classifier", "accuracy", "macro_f1", "weighted_f1", "fit_seconds"}
    assert rows[0]["accuracy"] > 0.9


def test_load_model_round_trips(run, results, split) -> None:
    run_dir, _ = run
    for result in results:
        y_pred, _ = predict_scores(load_model(run_dir, result.name), split["X_test"])
        assert np.array_equal(y_pred, result.y_pred)


def test_load_model_refuses_tampered_file(tmp_path, results, split) -> None:
    run_dir, _ = _write(tmp_path, results[:2], split)
    model_path = run_dir / "models" / "knn.joblib"
    data = bytearray(model_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="refusing"):
        load_model(run_dir, "knn")
    with pytest.raises(ModelIntegrityError, match="no model named"):
        load_model(run_dir, "dense256")
    assert load_model(run_dir, "svm") is not None


def test_write_run_never_overwrites(tmp_path, results, split) -> None:
    run_dir, _ = _write(tmp_path, results[1:2], split)
    with pytest.raises(FileExistsError):
        write_run(
            run_dir,
            settings=SETTINGS,
            keys={},
            results=results[1:2],
            class_names=CLASS_NAMES,
            test_files=split["test_files"],
            y_test=split["y_test"],
        )


def test_no_credentials_in_run_files(tmp_path, results, split) -> None:
    settings = {
        **SETTINGS,
        "store": "s3://AKIAKEY:hunter2@bucket/store?region=eu&token=tok42",
        "classifier_options": {"svm": {"api_key": "key42", "C": [1]}},
    }
    run_dir, report = _write(tmp_path, results[1:2], split, settings=settings)
    written = b"".join(path.read_bytes() for path in run_dir.rglob("*") if path.is_file())
    for secret in (b"hunter2", b"tok42", b"key42"):
        assert secret not in written
    assert report.settings["store"] == "s3://AKIAKEY:***@bucket/store?region=eu&token=***"
    assert report.settings["classifier_options"] == {"svm": {"api_key": "***", "C": [1]}}
    assert report.settings["dataset"] == "digits"


def test_list_runs_newest_first(tmp_path, results, split) -> None:
    older, _ = _write(tmp_path, results[1:2], split)
    time.sleep(0.01)
    newer, _ = _write(tmp_path, results[:2], split)
    (tmp_path / "crashed-run").mkdir()  # no report.json: an unfinished run is not listed
    runs = list_runs(tmp_path)
    assert [r["id"] for r in runs] == [newer.name, older.name]
    assert runs[0]["dataset"] == "digits" and runs[0]["layer"] == "pixels"
    assert set(runs[0]["accuracy"]) == {"svm", "knn"}
    assert runs[1]["best_classifier"] == "knn"


def test_run_ids_sort_by_time() -> None:
    first = new_run_id()
    time.sleep(0.002)
    assert new_run_id() > first
    assert re.fullmatch(r"\d{8}T\d{9}Z-[0-9a-f]{6}", first)


def test_other_figures(tmp_path) -> None:
    ratio = np.cumsum(np.full(50, 0.018))
    for path in (
        explained_variance_png(ratio, 40, 0.7, tmp_path / "evr.png"),
        bar_chart_png(
            ["block3", "block4", "block5"], [0.5, 0.62, 0.4], tmp_path / "bars.png", "test accuracy"
        ),
    ):
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_sklearn_run_does_not_import_tensorflow(tmp_path) -> None:
    """Writing and reloading a scikit-learn run must not pay the TensorFlow import."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from tasks.classify.models import train_and_evaluate
        from tasks.runs.folder import load_model
        from tasks.runs.report import write_run
        X = np.random.default_rng(0).normal(size=(60, 4)); y = np.arange(60) % 3
        result = train_and_evaluate("logreg", X[:40], y[:40], X[40:], y[40:], ["a", "b", "c"])
        run_dir = {str(tmp_path / "run")!r}
        write_run(run_dir, settings={{}}, keys={{}}, results=[result], class_names=["a", "b", "c"],
                  test_files=[str(i) for i in range(20)], y_test=y[40:])
        load_model(run_dir, "logreg")
        print(sorted(m for m in sys.modules if m.split(".")[0] in {{"tensorflow", "keras"}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
