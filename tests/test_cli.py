"""The `featurepipe` command end to end, as a user runs it: real processes, real store, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_LOGGING_LEVEL": "WARNING"}


def featurepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_and_second_run(digits_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two identical `featurepipe run --json` calls on the digits: the second must be cached."""
    work = tmp_path_factory.mktemp("cli")
    args = ("run", "--data", str(digits_tree), "--store", str(work / "store"),
            "--runs", str(work / "runs"), "--backbone", "vgg16", "--weights", "none",
            "--image-size", "32", "--layers", "block3_pool", "--pooling", "avg",
            "--classifiers", "svm,logreg", "--json")
    runs = [featurepipe(*args, cwd=work) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    return work, [json.loads(run.stdout) for run in runs]


def test_run_json_summary(first_and_second_run) -> None:
    work, (first, _) = first_and_second_run
    assert first["images_total"] == 150
    assert (first["images_computed"], first["images_cached"]) == (150, 0)
    assert first["images_skipped"] == 0 and first["skipped"] == []
    assert set(first["accuracy"]) == {"svm", "logreg"}
    assert all(0.0 <= acc <= 1.0 for acc in first["accuracy"].values())
    assert first["n_components"] >= 1
    run_dir = Path(first["run_dir"])
    assert (run_dir / "report.json").is_file() and (run_dir / "report.md").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["settings"]["layer"] == "block3_pool"


def test_second_identical_run_computes_nothing(first_and_second_run) -> None:
    _, (first, second) = first_and_second_run
    assert second["images_computed"] == 0 and second["images_cached"] == 150
    assert second["layers"]["block3_pool"]["reduce_cached"] is True
    assert second["accuracy"] == first["accuracy"]
    assert second["run_id"] != first["run_id"]


def test_classify_only_and_store_commands(first_and_second_run) -> None:
    work, (first, _) = first_and_second_run
    key = first["layers"]["block3_pool"]["feature_key"]
    classify = featurepipe("classify", "--features", key[:8], "--store", str(work / "store"),
                           "--runs", str(work / "runs"), "--classifiers", "knn", "--json",
                           cwd=work)
    assert classify.returncode == 0, classify.stderr[-3000:]
    summary = json.loads(classify.stdout)
    assert list(summary["accuracy"]) == ["knn"]

    listing = featurepipe("store", "ls", "--store", str(work / "store"), "--json", cwd=work)
    rows = json.loads(listing.stdout)["arrays"]
    assert {row["kind"] for row in rows} == {"features", "reduced"}
    verify = featurepipe("store", "verify", "--store", str(work / "store"), cwd=work)
    assert verify.returncode == 0 and "ok" in verify.stdout


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    missing = featurepipe("run", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "dataset folder not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = featurepipe("run", "--data", str(tmp_path), "--variance", "1.5", cwd=tmp_path)
    assert bad.returncode == 2 and "variance" in bad.stderr and "Traceback" not in bad.stderr
