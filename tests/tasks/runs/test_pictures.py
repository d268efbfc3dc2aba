"""Pictures of a real run (digits PNGs -> random-weight VGG16 features in a real store -> PCA
-> classifiers): gallery, 2-D class map, and the report artifact that carries them inline."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from tasks.classify.stage import classify_run
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tasks.reduce.stage import PcaSettings, load_projected, reduce_cached
from tasks.runs import markdown
from tasks.runs.gallery import GALLERY_CAP, mistakes_by_confidence
from tasks.runs.plots import MAP_LDA_COMPONENTS, class_map_panels, pca_class_map_png
from tasks.runs.schema import RunReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
SETTINGS = ExtractSettings(
    backbone="vgg16", weights="none", layers=("block2_pool",), image_size=32, pooling="avg"
)


@pytest.fixture(scope="module")
def digits_run(digits_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("digits-run")
    store = FeatureStore(str(work / "store"))
    manifest = scan(digits_tree)
    key = extract(manifest, store, SETTINGS).feature_keys["block2_pool"]
    train, test = split_rows(manifest, "stratified", 0.3, 0)
    reduction = reduce_cached(store, key, train, PcaSettings(method="gram", variance=0.9))
    run_dir = work / "runs" / "run-1"
    report = classify_run(
        store, manifest, reduction, train, test, ["logreg", "knn"], run_dir, {"layer": "b2"}
    )
    return run_dir, report, len(test)


def test_every_run_has_a_class_map_and_galleries(digits_run) -> None:
    run_dir, report, n_test = digits_run
    assert report.images == {"class_map": "class_map.png", "pca_variance": "pca_variance.png"}
    for name, entry in report.classifiers.items():
        assert 0 < entry.n_misclassified < n_test  # random weights: some right, some wrong
        assert entry.images["gallery"] == f"gallery_{name}.png"
    for file in ("class_map.png", "gallery_logreg.png", "gallery_knn.png"):
        assert (run_dir / file).read_bytes().startswith(PNG_MAGIC), file
    with Image.open(run_dir / "class_map.png") as image:
        assert image.size == (1200, 550)  # two 6 x 5.5 in panels at 100 dpi


def test_gallery_order_and_cap() -> None:
    y_true = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 0, 1])  # rows 1, 2, 3, 5, 6, 7 are wrong
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.99, 0.01], [0.3, 0.7]] * 2)
    assert mistakes_by_confidence(y_true, y_pred, scores).tolist() == [2, 6, 3, 7, 1, 5]
    assert GALLERY_CAP == 24  # the gallery shows the first 24 of this order (test_report)


def test_artifact_carries_report_tables_and_pictures(digits_run) -> None:
    run_dir, report, _ = digits_run
    text = markdown.artifact_markdown(report, run_dir)
    assert "| class | precision | recall | F1 | support |" in text
    assert "| true \\ predicted | 0 | 1 | 2 |" in text
    for name in report.classifiers:
        assert f"## {name}" in text
    inline = {caption: base64.b64decode(data) for caption, data in DATA_URI.findall(text)}
    assert inline["2-D map of the rows"] == (run_dir / "class_map.png").read_bytes()
    assert inline["gallery knn"] == (run_dir / "gallery_knn.png").read_bytes()
    assert len(inline) == 2 + 2 * len(report.classifiers)  # run pictures, confusion + gallery
    assert "file://" not in text
    assert f"`{run_dir.resolve()}` on host" in text
    assert "| `gallery_logreg.png` |" in text and "| `models/knn.joblib` |" in text
    assert text.startswith(markdown.report_markdown(report).rstrip("\n").split("\n")[0])


def test_pictures_over_the_budget_are_named_not_embedded(digits_run, monkeypatch) -> None:
    run_dir, report, _ = digits_run
    budget = len(base64.b64encode((run_dir / "class_map.png").read_bytes()))
    monkeypatch.setattr(markdown, "INLINE_BUDGET", budget)
    text = markdown.artifact_markdown(report, run_dir)
    assert [caption for caption, _ in DATA_URI.findall(text)] == ["2-D map of the rows"]
    assert "*gallery knn: `gallery_knn.png` in the run folder (" in text


def test_report_round_trips_through_json(digits_run) -> None:
    _, report, _ = digits_run
    assert RunReport.from_json(report.to_json()) == report


def _centroid_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows nearest to their own class's centroid: how well a view separates."""
    centroids = np.stack([points[labels == c].mean(axis=0) for c in np.unique(labels)])
    nearest = np.argmin(((points[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    return float(np.mean(nearest == labels))


def test_class_map_views(digits_tree: Path, digits_run) -> None:
    """The discriminant view separates the digits far better than the first two components."""
    run_dir, report, n_test = digits_run
    store = FeatureStore(str(run_dir.parents[1] / "store"))
    projected, attrs = load_projected(store, report.keys["reduction"])
    manifest = scan(digits_tree)
    train, test = split_rows(manifest, "stratified", 0.3, 0)
    rows = np.concatenate([train, test])
    labels = np.asarray(manifest.labels)[rows]
    pca, lda = class_map_panels(
        projected[rows], labels, len(train), attrs["pca"]["cumulative_variance_ratio"]
    )
    np.testing.assert_allclose(pca.points, projected[rows, :2])
    assert pca.axis_labels[0].startswith("PC1 (") and lda.axis_labels == ("LD1", "LD2")
    n = len(train)
    separated, mixed = (_centroid_accuracy(p.points[:n], labels[:n]) for p in (lda, pca))
    assert separated > mixed + 0.2, (separated, mixed)


def test_class_map_with_a_single_component(tmp_path: Path) -> None:
    one_column = np.arange(6, dtype=float)[:, None]
    labels = np.array([0, 1] * 3)
    path = pca_class_map_png(one_column, labels, 4, [0.7], ["a", "b"], tmp_path / "map.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_class_map_fits_discriminants_in_the_leading_components_and_survives_their_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    wide = rng.normal(size=(120, 300)) + labels[:, None]  # more components than the view uses
    pca, lda = class_map_panels(wide, labels, 90, np.linspace(0.1, 0.9, 300))
    assert lda.title.endswith(f"(first {MAP_LDA_COMPONENTS} components)")

    def no_convergence(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")  # as on 7,467 blood-cell rows

    monkeypatch.setattr(LinearDiscriminantAnalysis, "fit", no_convergence)
    panels = class_map_panels(wide, labels, 90, np.linspace(0.1, 0.9, 300))
    assert [p.title for p in panels] == ["first two PCA components"]
    assert "without the discriminant view" in caplog.text
    path = pca_class_map_png(
        wide, labels, 90, np.linspace(0.1, 0.9, 300), list("abc"), tmp_path / "m.png"
    )
    assert path.read_bytes().startswith(PNG_MAGIC)
