"""The `featurepipe` command end to end, as a user runs it: real processes, real store, --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.features.store import FeatureStore
from tests.conftest import CLI_ENV, featurepipe, write_image

pytestmark = pytest.mark.slow  # see the slow marker in pyproject.toml


@pytest.fixture(scope="module")
def first_and_second_run(digits_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two identical `featurepipe run --json` calls on the digits: the second must be cached."""
    work = tmp_path_factory.mktemp("cli")
    args = (
        "run",
        "--data",
        str(digits_tree),
        "--store",
        str(work / "store"),
        "--runs",
        str(work / "runs"),
        "--backbone",
        "vgg16",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--layers",
        "block3_pool",
        "--pooling",
        "avg",
        "--classifiers",
        "svm,logreg",
        "--json",
    )
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
    assert first["n_components"] >= 1
    run_dir = Path(first["run_dir"])
    assert (run_dir / "report.json").is_file() and (run_dir / "report.md").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    for name, accuracy in first["accuracy"].items():  # the summary's figure is the test confusion's
        confusion = np.asarray(report["classifiers"][name]["confusion"])
        assert confusion.sum() == report["extras"]["n_test"]
        assert accuracy == pytest.approx(np.trace(confusion) / confusion.sum())
    assert report["settings"]["layer"] == "block3_pool"
    # the default precision `auto` is recorded as what it became: the stored features' precision
    attrs = (
        FeatureStore(str(work / "store"))
        .feature_array(first["layers"]["block3_pool"]["feature_key"])
        .attrs
    )
    assert report["settings"]["precision"] == attrs.get("precision", "float32")


def test_second_identical_run_computes_nothing(first_and_second_run) -> None:
    _, (first, second) = first_and_second_run
    assert second["images_computed"] == 0 and second["images_cached"] == 150
    assert second["layers"]["block3_pool"]["reduce_cached"] is True
    assert second["accuracy"] == first["accuracy"]
    assert second["run_id"] != first["run_id"]


def test_classify_only_and_store_commands(first_and_second_run) -> None:
    work, (first, _) = first_and_second_run
    key = first["layers"]["block3_pool"]["feature_key"]
    classify = featurepipe(
        "classify",
        "--features",
        key[:8],
        "--store",
        str(work / "store"),
        "--runs",
        str(work / "runs"),
        "--classifiers",
        "knn",
        "--components",
        "5",
        "--json",
        cwd=work,
    )
    assert classify.returncode == 0, classify.stderr[-3000:]
    summary = json.loads(classify.stdout)
    assert list(summary["accuracy"]) == ["knn"] and summary["n_components"] == 5
    # the run records the features' backbone settings, not the classify flags' defaults
    recorded = json.loads((Path(summary["run_dir"]) / "report.json").read_text())["settings"]
    first_run = json.loads((Path(first["run_dir"]) / "report.json").read_text())["settings"]
    fields = ("backbone", "weights", "image_size", "pooling", "precision")
    assert [recorded[f] for f in fields] == [first_run[f] for f in fields]
    assert recorded["weights"] == "none"
    too_many = featurepipe(
        "classify",
        "--features",
        key[:8],
        "--store",
        str(work / "store"),
        "--runs",
        str(work / "runs"),
        "--components",
        "10000",
        cwd=work,
    )
    assert too_many.returncode == 2 and "Traceback" not in too_many.stderr
    assert "--components 10000 is more than PCA can give here: at most 111" in too_many.stderr

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
    small = featurepipe(
        "run",
        "--data",
        str(tmp_path),
        "--backbone",
        "inceptionv3",
        "--image-size",
        "64",
        cwd=tmp_path,
    )
    assert small.returncode == 2 and small.stderr.strip() == (
        "error: invalid settings: --image-size 64 is too small for inceptionv3: its layers need "
        "at least 75 px (default 299)"
    )
    cron = featurepipe("serve", "--data", str(tmp_path), "--cron", "every day", cwd=tmp_path)
    assert cron.returncode == 2 and "invalid cron expression 'every day'" in cron.stderr


def test_predict_writes_a_csv_and_caches_features(
    first_and_second_run, digits_tree: Path, tmp_path: Path
) -> None:
    import csv

    from PIL import Image, ImageOps

    work, (first, _) = first_and_second_run
    new_images = tmp_path / "new"
    new_images.mkdir()
    for label in ("3", "7"):  # shifted copies: new bytes, so their features are computed
        for source in sorted((digits_tree / label).iterdir())[:2]:
            shifted = ImageOps.expand(Image.open(source), border=(2, 0, 0, 2))
            shifted.resize((32, 32)).save(new_images / f"{label}_{source.name}")
    out = tmp_path / "predictions.csv"
    args = (
        "predict",
        "--run",
        first["run_id"],
        "--data",
        str(new_images),
        "--out",
        str(out),
        "--store",
        str(work / "store"),
        "--runs",
        str(work / "runs"),
        "--json",
    )
    predicted = featurepipe(*args, cwd=work)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    summary = json.loads(predicted.stdout)
    assert summary["predictions"] == 4 and summary["images_computed"] == 4
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == sorted(p.name for p in new_images.iterdir())
    assert {r["predicted_class"] for r in rows} <= {str(d) for d in range(10)}
    assert {f"score_{d}" for d in range(10)} <= set(rows[0])
    again = json.loads(featurepipe(*args, cwd=work).stdout)
    assert again["images_computed"] == 0 and again["images_cached"] == 4


def test_predict_finds_the_runs_store_and_a_wrong_store_fails_at_once(
    first_and_second_run, digits_tree: Path, tmp_path: Path
) -> None:
    """The user's case: no --store, run from another folder, stderr not a terminal."""
    import shutil

    work, (first, _) = first_and_second_run
    new_images, elsewhere = tmp_path / "new", tmp_path / "elsewhere"
    new_images.mkdir()
    elsewhere.mkdir()
    for source in sorted((digits_tree / "4").iterdir())[:2]:  # images the run already has
        shutil.copy(source, new_images / f"known_{source.name}")
    write_image(new_images / "unseen.png", seed=7, size=32)
    args = ("predict", "--run", first["run_id"], "--runs", str(work / "runs"))
    args += ("--data", str(new_images), "--out", str(tmp_path / "p.csv"), "--json")
    predicted = featurepipe(*args, cwd=elsewhere)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    summary = json.loads(predicted.stdout)
    assert summary["store"] == str(work / "store") and summary["predictions"] == 3
    assert (summary["images_computed"], summary["images_cached"]) == (1, 2)
    assert "predict vgg16: 1/1 images" in predicted.stderr  # the progress line
    assert not (elsewhere / "featurepipe-store").exists()

    typo = tmp_path / "stor"
    wrong = featurepipe(*args, "--store", str(typo), cwd=elsewhere)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"error: no feature store at {typo} (the run was made with the store {work / 'store'})"
    ]
    assert not typo.exists()


def test_labels_csv_runs_end_to_end_and_predicts(tmp_path: Path) -> None:
    """A flat folder plus a CSV: the class-folder manifest key, cached features for predict,
    true labels kept, and a table mistake answered in one line before any work."""
    import csv

    from tasks.data.scan import scan

    flat, tree = tmp_path / "flat", tmp_path / "tree"
    lines = ["path,label"]
    for label, tint in (("blue", 0), ("red", 120)):
        for i in range(10):
            name = f"{label[0]}{i:02d}.png"
            write_image(flat / name, seed=tint + i, size=32, tint=tint)
            write_image(tree / label / name, seed=tint + i, size=32, tint=tint)
            lines.append(f"{name},{label}")
    write_image(flat / "unlabelled.png", seed=999, size=32)
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    common = ("--store", str(tmp_path / "store"), "--runs", str(tmp_path / "runs"), "--json")
    run = featurepipe(
        "run",
        "--data",
        str(flat),
        "--labels",
        str(tmp_path / "labels.csv"),
        *("--weights", "none", "--image-size", "32", "--layers", "block2_pool"),
        *("--pooling", "avg", "--classifiers", "logreg", *common),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["images_total"] == 20 and summary["class_names"] == ["blue", "red"]
    assert summary["manifest_key"] == scan(tree).key
    assert any(w.startswith("1 image files in ") for w in summary["warnings"])

    out = tmp_path / "p.csv"
    predict = featurepipe(
        "predict",
        *("--run", summary["run_id"], "--data", str(flat), "--out", str(out)),
        *("--labels", str(tmp_path / "labels.csv"), *common[2:]),
        cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    predicted = json.loads(predict.stdout)
    assert (predicted["images_computed"], predicted["images_cached"]) == (0, 20)
    rows = list(csv.DictReader(out.open()))
    assert {(r["file"], r["true_class"]) for r in rows} == {
        tuple(line.split(",")) for line in lines[1:]
    }

    (tmp_path / "bad.csv").write_text("path,label\nb00.png,blue\nb01.png,\n")
    bad = featurepipe(
        "run", "--data", str(flat), "--labels", str(tmp_path / "bad.csv"), cwd=tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: labels file {tmp_path / 'bad.csv'}: empty label on 1 row: line 3 ('b01.png')"
    ]


NO_TENSORFLOW = """
import json, sys
from flows.pipeline import classify_flow
from flows.settings import PipelineSettings
settings = PipelineSettings(store=sys.argv[1], runs=sys.argv[2], classifiers=["logreg"])
summary = classify_flow(settings, [sys.argv[3]])
print(json.dumps({"accuracy": summary["accuracy"],
                  "loaded": [m for m in ("tensorflow", "keras") if m in sys.modules]}))
"""


def test_classifier_only_rerun_never_loads_tensorflow(first_and_second_run) -> None:
    work, (first, _) = first_and_second_run
    key = first["layers"]["block3_pool"]["feature_key"]
    done = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, str(work / "store"), str(work / "runs"), key],
        cwd=Path(__file__).parents[2],
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []  # no backbone can be built without TensorFlow
    assert result["accuracy"]["logreg"] == first["accuracy"]["logreg"]


def test_sweep_compares_layers_in_one_table(first_and_second_run, digits_tree: Path) -> None:
    work, _ = first_and_second_run
    sweep = featurepipe(
        "sweep",
        "--data",
        str(digits_tree),
        "--store",
        str(work / "store"),
        "--runs",
        str(work / "runs"),
        "--weights",
        "none",
        "--image-size",
        "32",
        "--layers",
        "block2_pool,block3_pool",
        "--pooling",
        "avg",
        "--classifiers",
        "logreg",
        "--json",
        cwd=work,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    summary = json.loads(sweep.stdout)
    assert summary["images_computed"] == 150  # block2_pool is new; block3_pool came cached
    assert [(r["layer"], r["classifier"]) for r in summary["sweep"]] == [
        ("block2_pool", "logreg"),
        ("block3_pool", "logreg"),
    ]
    for path in summary["sweep_files"].values():
        assert Path(path).is_file()
    table = Path(summary["sweep_files"]["md"]).read_text()
    assert "block2_pool" in table and "block3_pool" in table


def test_store_commands_on_a_missing_store_say_so_and_create_nothing(tmp_path: Path) -> None:
    for command in (("ls",), ("verify", "--repair")):
        run = featurepipe("store", *command, "--store", "does-not-exist", cwd=tmp_path)
        assert run.returncode == 2
        assert run.stderr.splitlines() == ["error: no feature store at does-not-exist"]
    assert list(tmp_path.iterdir()) == []


def test_store_maintenance_commands(first_and_second_run) -> None:
    work, (first, _) = first_and_second_run
    store = ("--store", str(work / "store"))
    layer = first["layers"]["block3_pool"]
    info = featurepipe("store", "info", layer["feature_key"][:10], *store, cwd=work)
    assert info.returncode == 0 and json.loads(info.stdout)["layer"] == "block3_pool"
    removed = featurepipe("store", "rm", layer["reduce_key"], *store, cwd=work)
    assert removed.stdout.strip() == f"removed reduced/{layer['reduce_key']}"
    assert featurepipe("store", "gc", *store, cwd=work).returncode == 0
    listing = json.loads(featurepipe("store", "ls", *store, "--json", cwd=work).stdout)
    assert layer["reduce_key"] not in {row["key"] for row in listing["arrays"]}
    assert layer["feature_key"] in {row["key"] for row in listing["arrays"]}
    unknown = featurepipe("store", "info", "zzzz", *store, cwd=work)
    assert unknown.returncode == 2 and "no key starting with 'zzzz'" in unknown.stderr


def test_group_source_mistakes_answer_in_one_line_before_any_work(tmp_path: Path) -> None:
    """A labels file's group column beside --group-regex, and --group-by near-copies without a
    grouped split: one `error:` line each, before Prefect starts or any image is read."""
    for n in range(4):
        write_image(tmp_path / "flat" / f"{n}.png", seed=n, tint=120 * (n % 2))
    lines = ["path,label,group", *(f"{n}.png,{'ab'[n % 2]},photo{n // 2}" for n in range(4))]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    common = ("run", "--data", str(tmp_path / "flat"), "--store", str(tmp_path / "store"))
    both = featurepipe(
        *common,
        *("--labels", str(tmp_path / "labels.csv"), "--split", "grouped"),
        *("--group-regex", "(\\d)"),
        cwd=tmp_path,
    )
    assert both.returncode == 2
    assert both.stderr.strip().splitlines() == [
        "error: groups come from one source, but the labels file's group column and "
        "--group-regex both give them"
    ]
    ungrouped = featurepipe(*common, "--group-by", "near-copies", cwd=tmp_path)
    assert ungrouped.returncode == 2
    assert ungrouped.stderr.strip().splitlines() == [
        "error: invalid settings: --group-by near-copies needs --split grouped"
    ]
    assert not (tmp_path / "store").exists()
