"""The classify stage on a real Zarr store: above --svm-max-rows the SVM grid hands over to the
streamed sgd (one log line, recorded in report.json and report.md); at the threshold it does not."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.classify.stage import classify_run
from tasks.data.demo import write_digits
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.features.store import FeatureStore
from tasks.reduce.stage import PcaSettings, reduce_cached
from tasks.runs.schema import RunReport


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory):
    """Digits PNGs -> their 8x8 pixels as stored features (no backbone) -> a real reduction."""
    work = tmp_path_factory.mktemp("classify-stage")
    manifest = scan(write_digits(work / "digits", per_class=60))
    pixels = np.stack(
        [
            np.asarray(
                Image.open(Path(manifest.root) / r.path).convert("L").resize((8, 8)), np.float32
            )
            for r in manifest.records
        ]
    ).reshape(len(manifest.records), -1)
    store = FeatureStore(str(work / "store"))
    features = store.create_feature_array(
        "digit-pixels", len(pixels), pixels.shape[1], "float32", {"manifest_key": manifest.key}
    )
    for index in range(features.n_chunks):
        features.write_chunk(index, pixels[features.chunk_slice(index)])
    train, test = split_rows(manifest, "stratified", 0.25, 0)
    reduction = reduce_cached(
        store, "digit-pixels", train, PcaSettings(method="gram", variance=0.9)
    )
    return work, store, manifest, reduction, train, test


def _run(reduced, name: str, svm_max_rows: int) -> tuple[RunReport, Path]:
    work, store, manifest, reduction, train, test = reduced
    run_dir = work / "runs" / name
    report = classify_run(
        store,
        manifest,
        reduction,
        train,
        test,
        ["svm", "logreg"],
        run_dir,
        {"layer": "pixels"},
        svm_max_rows=svm_max_rows,
    )
    return report, run_dir


def test_svm_hands_over_to_sgd_above_the_threshold(reduced, caplog) -> None:
    train = reduced[4]
    with caplog.at_level(logging.INFO, logger="featurepipe.classify"):
        report, run_dir = _run(reduced, "above", svm_max_rows=len(train) - 1)
    assert list(report.classifiers) == ["sgd", "logreg"]
    (line,) = report.extras["classifier_handover"]
    assert line.startswith("svm hands over to sgd")
    assert f"{len(train):,} training rows > --svm-max-rows {len(train) - 1:,}" in line
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [line]
    assert line in (run_dir / "report.md").read_text()
    assert report.classifiers["sgd"].accuracy > 0.85  # digits: logreg reaches ~0.95
    assert (run_dir / report.classifiers["sgd"].model_file).exists()


def test_no_handover_at_the_threshold(reduced, caplog) -> None:
    train = reduced[4]
    with caplog.at_level(logging.INFO, logger="featurepipe.classify"):
        report, _ = _run(reduced, "at", svm_max_rows=len(train))
    assert list(report.classifiers) == ["svm", "logreg"]
    assert report.extras["classifier_handover"] == []
    assert "classifier memory plan: svm" in report.extras["classifier_plan"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
