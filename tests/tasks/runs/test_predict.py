"""Prediction with a finished run: the run's own store by default, every check before any
image is read, and images the store already knows are copied, not recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.registry import get_spec, resolve_weights
from tasks.classify.stage import classify_run
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.data.unlabelled import UNLABELLED, scan_for_prediction
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tasks.reduce.stage import PcaSettings, load_projected, reduce_cached
from tasks.runs.folder import ModelIntegrityError, load_model, read_report
from tasks.runs.predict import PredictError, extract_settings_of, plan_prediction, predict_folder
from tests.conftest import write_image

SETTINGS = ExtractSettings(
    backbone="vgg16",
    weights="none",
    layers=("block2_pool",),
    image_size=32,
    pooling="avg",
    batch_size=8,
    chunk_mb=0.05,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real run (extract -> reduce -> classify, no Prefect) on two generated classes."""
    work = tmp_path_factory.mktemp("predict")
    data = work / "images"
    for label, tint in (("cats", 0), ("dogs", 120)):
        for i in range(12):
            write_image(data / label / f"{label}_{i:02d}.png", seed=1000 * tint + i, tint=tint)
    manifest = scan(data)
    store = FeatureStore(str(work / "store"))
    layer = SETTINGS.layers[0]
    feature_key = extract(manifest, store, SETTINGS).feature_keys[layer]
    train, test = split_rows(manifest, "stratified", 0.25, 0)
    reduction = reduce_cached(store, feature_key, train, PcaSettings(method="gram", variance=0.9))
    run_dir = work / "runs" / "run-1"
    settings = {
        "backbone": "vgg16",
        "weights": "none",
        "layer": layer,
        "image_size": 32,
        "pooling": "avg",
        "dtype": "float32",
        # what the default `auto` became, recorded as the pipeline records it
        "precision": store.feature_array(feature_key).attrs.get("precision", "float32"),
        "seed": 0,
        "store": str(work / "store"),
    }
    classify_run(store, manifest, reduction, train, test, ["logreg"], run_dir, settings)
    return {"work": work, "data": data, "manifest": manifest, "run_dir": run_dir}


def _copy_run(trained: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["run_dir"], tmp_path / "run-copy"))


def test_predict_uses_the_runs_store_and_copies_known_images(trained: dict, tmp_path: Path) -> None:
    plan = plan_prediction(trained["run_dir"])  # no store given
    assert plan.store == str(trained["work"] / "store")
    new = tmp_path / "new"
    new.mkdir()
    known = sorted((trained["data"] / "cats").iterdir())[:3]
    for path in known:
        shutil.copy(path, new / f"known_{path.name}")
    for i in range(2):
        write_image(new / f"unseen_{i}.png", seed=99 + i, tint=60)
    seen = []
    rows, manifest, info = predict_folder(plan, new, lambda done, total: seen.append(done))
    assert (info["images_computed"], info["images_cached"]) == (2, 3)
    assert seen and seen[-1] == 2  # progress reported for the computed images only
    assert [r["file"] for r in rows] == sorted(p.name for p in new.iterdir())
    assert {r["true_class"] for r in rows} == {UNLABELLED}

    # the known images get exactly the run's own predictions for their stored rows
    store = FeatureStore(plan.store)
    projected, _ = load_projected(store, plan.report.keys["reduction"])
    run_rows = [trained["manifest"].paths().index(path) for path in known]
    expected = load_model(trained["run_dir"], "logreg").predict(projected[run_rows])
    names = plan.report.class_names
    predicted = {r["file"]: r["predicted_class"] for r in rows}
    assert [predicted[f"known_{p.name}"] for p in known] == [names[i] for i in expected]


def test_a_wrong_store_fails_before_anything_is_created_or_read(
    trained: dict, tmp_path: Path
) -> None:
    missing = tmp_path / "no-store-here"
    with pytest.raises(PredictError, match=f"no feature store at {missing} .*made with"):
        plan_prediction(trained["run_dir"], str(missing))
    assert not missing.exists()  # a mistyped --store leaves nothing behind
    other = FeatureStore(str(tmp_path / "other"))  # a real store, without this run
    with pytest.raises(PredictError, match="has no complete reduction"):
        plan_prediction(trained["run_dir"], other.location)
    assert not list(other.feature_arrays())


def test_a_tampered_model_is_refused_before_scanning(trained: dict, tmp_path: Path) -> None:
    run_dir = _copy_run(trained, tmp_path)
    model = run_dir / "models" / "logreg.joblib"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="refusing to load it"):
        plan_prediction(run_dir)


def test_changed_weights_are_refused(trained: dict, tmp_path: Path) -> None:
    run_dir = _copy_run(trained, tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    report["settings"]["seed"] = 1  # random weights of another seed: other features
    (run_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(PredictError, match="its models do not fit these features"):
        plan_prediction(run_dir)


def test_unknown_classifier_names_the_runs_own(trained: dict) -> None:
    with pytest.raises(PredictError, match="has no classifier 'svm'; it has logreg"):
        plan_prediction(trained["run_dir"], classifier="svm")


def test_flat_folder_scan_skips_non_images(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", seed=1)
    (tmp_path / "notes.txt").write_text("not an image")
    manifest = scan_for_prediction(tmp_path)
    assert [r.path for r in manifest.records] == ["a.png"]
    assert [s.path for s in manifest.skipped] == ["notes.txt"]
    assert np.array_equal(manifest.labels, [0])


def test_prediction_extracts_with_the_runs_precision(trained: dict) -> None:
    report = read_report(trained["run_dir"])
    report.settings["precision"] = "bfloat16"  # a run whose features were made in bfloat16
    assert extract_settings_of(report).precision == "bfloat16"
    del report.settings["precision"]  # runs from before the option were float32
    assert extract_settings_of(report).precision == "float32"


def test_tta_scores_are_the_mean_of_the_8_views_and_nothing_is_stored(
    trained: dict, tmp_path: Path
) -> None:
    """Views computed here with numpy, through the same backbone, PCA and classifier."""
    import dask.array as da

    from tasks.backbones.registry import build_feature_model, load_preprocess
    from tasks.data.images import load_rgb
    from tasks.finetune.tta import VIEWS
    from tasks.reduce.stage import load_pca
    from tests.tasks.finetune.test_tta import numpy_views

    plan = plan_prediction(trained["run_dir"])
    folder = tmp_path / "new"
    for i in range(3):
        write_image(folder / f"unseen_{i}.png", seed=50 + i, tint=40 * i)
    store = FeatureStore(plan.store)
    arrays_before = sorted(a.key for a in store.feature_arrays())
    seen = []
    rows, _, info = predict_folder(plan, folder, lambda done, total: seen.append(done), tta=True)
    assert (info["images_computed"], info["images_cached"], info["tta"]) == (3, 0, True)
    assert seen[-1] == 3 and {r["tta_views"] for r in rows} == {VIEWS}
    assert sorted(a.key for a in store.feature_arrays()) == arrays_before  # views not stored

    spec = get_spec("vgg16")
    precision = extract_settings_of(plan.report).precision  # bfloat16 where the CPU has it
    weights = resolve_weights(spec, "none")
    backbone = build_feature_model(spec, weights, 32, ["block2_pool"], "avg", precision)
    pca = load_pca(store, plan.report.keys["reduction"])
    preprocess = load_preprocess(spec)
    expected, single = [], []
    for path in sorted(folder.iterdir()):
        image = load_rgb(path, 32)
        features = np.asarray(backbone.predict(preprocess(np.stack(numpy_views(image))), verbose=0))
        probabilities = plan.model.predict_proba(pca.project(da.from_array(features)))
        expected.append(probabilities.mean(axis=0))
        single.append(probabilities[0])  # the image as it is: view 0
    names = plan.report.class_names
    scores = np.array([[r[f"score_{c}"] for c in names] for r in rows])
    # other batch compositions through the backbone: float32 rounding differs slightly
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.abs(scores - np.array(single)).max() > 1e-3  # the views changed the scores
    assert [r["predicted_class"] for r in rows] == [names[i] for i in np.argmax(expected, 1)]
