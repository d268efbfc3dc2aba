"""`finetune --precision` as a user gives it: real `featurepipe finetune` and `predict`
processes, from the flag to the report and to predictions from the bfloat16-trained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import featurepipe

pytestmark = pytest.mark.slow  # a real Prefect flow per call, see pyproject.toml


def test_a_bfloat16_fine_tuning_is_recorded_and_predicts(image_tree: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    common = ["finetune", "--data", str(image_tree), "--runs", str(runs), "--weights", "none"]
    common += ["--image-size", "32", "--head", "4", "--phase1-epochs", "1", "--phase2-epochs", "0"]

    refused = featurepipe(*common, "--precision", "auto", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: invalid settings: precision")

    done = featurepipe(*common, "--precision", "bfloat16", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout)["run_id"]
    report = json.loads((runs / run_id / "report.json").read_text())
    assert report["settings"]["precision"] == "bfloat16"

    out = tmp_path / "predictions.csv"
    predict = ["predict", "--runs", str(runs), "--run", run_id, "--data", str(image_tree)]
    predicted = featurepipe(*predict, "--out", str(out), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(image_tree.rglob("*.png")))
    assert {row["predicted_class"] for row in rows} <= set(report["class_names"])
