"""The layer sweep's table and chart, in files and as the artifact text with the chart inline."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

from tasks.runs.markdown import inline_pictures
from tasks.runs.schema import ClassifierReport, RunReport
from tasks.runs.sweep import sweep_markdown, sweep_rows, write_sweep


def _report(accuracies: dict[str, float]) -> RunReport:
    entries = {
        name: ClassifierReport(
            metrics={"accuracy": accuracy, "macro": {"f1": accuracy - 0.05}},
            best_params={},
            confusion=[[1]],
            fit_seconds=1.234,
            predict_seconds=0.1,
            model_file=f"models/{name}.joblib",
            model_sha256="0" * 64,
            images={},
            misclassified_file=f"misclassified_{name}.csv",
            n_misclassified=0,
        )
        for name, accuracy in accuracies.items()
    }
    return RunReport("r", "now", {}, {}, ["a"], 1, None, entries)


def test_sweep_files_and_artifact_text(tmp_path: Path) -> None:
    layers = {
        "block3_pool": {"n_components": 90, "n_features": 256, "reduce_seconds": 2.0},
        "block4_pool": {"n_components": 40, "n_features": 512, "reduce_seconds": 1.0},
    }
    reports = {
        "block3_pool": _report({"svm": 0.61234, "logreg": 0.5}),
        "block4_pool": _report({"svm": 0.7}),
    }
    rows = sweep_rows(layers, reports)
    assert [(r["layer"], r["classifier"], r["accuracy"]) for r in rows] == [
        ("block3_pool", "svm", 0.6123),
        ("block3_pool", "logreg", 0.5),
        ("block4_pool", "svm", 0.7),
    ]
    paths = write_sweep(rows, tmp_path / "sweep", "Layer sweep")
    with open(paths["csv"], newline="") as handle:
        assert [row["n_components"] for row in csv.DictReader(handle)] == ["90", "90", "40"]
    text = paths["md"].read_text()
    assert "| block4_pool | svm | 0.7 | 0.65 | 40 | 512 | 1.0 | 1.23 |" in text
    assert text.rstrip().endswith("(sweep.png)")
    inline = sweep_markdown(rows, "Layer sweep", inline_pictures(paths["png"].parent))
    encoded = inline.rsplit("base64,", 1)[1].rstrip(")\n")
    assert base64.b64decode(encoded) == paths["png"].read_bytes()
    assert inline.split("![")[0] == text.split("![")[0]  # same table in both
