"""Prediction on new images with a finished run: same backbone, layer, scaling, PCA and model.

New images go through the feature store like any others, so predicting twice on the same
folder extracts nothing the second time.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.data.images import IMAGE_EXTENSIONS, check_image
from tasks.data.scan import ImageRecord, Manifest, Skipped, file_sha256, scan
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings, extract
from tasks.features.store import FeatureStore
from tasks.reduce.stage import load_pca
from tasks.runs.report import load_model, read_report

UNLABELLED = "?"
FINETUNED = "finetune"  # the model name of fine-tuning runs in report.json


def scan_unlabelled(folder: Path) -> Manifest:
    """Every image file directly in `folder` (no class sub-folders needed), label '?'."""
    records, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(Skipped(path.name, f"not an image extension ({path.suffix or 'none'})"))
            continue
        reason = check_image(path)
        if reason:
            skipped.append(Skipped(path.name, reason))
            continue
        records.append(
            ImageRecord(path.name, UNLABELLED, "all", path.stat().st_size, file_sha256(path))
        )
    if not records:
        raise UserError(f"no readable images in {folder}")
    return Manifest(str(folder.resolve()), records, [UNLABELLED], skipped)


def scan_for_prediction(folder: str | Path) -> Manifest:
    """Class sub-folders are used when present (their names are kept as true labels)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    has_images_here = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
    return scan_unlabelled(folder) if has_images_here else scan(folder)


def extract_settings_of(report: dict) -> ExtractSettings:
    """The extraction settings a run's features were made with."""
    settings = report["settings"]
    return ExtractSettings(
        backbone=settings["backbone"],
        weights=settings["weights"],
        layers=(settings["layer"],),
        image_size=settings.get("image_size"),
        pooling=settings.get("pooling"),
        dtype=settings.get("dtype", "float32"),
        seed=settings.get("seed", 0),
    )


def predict_folder(
    run_dir: Path, folder: Path, store: FeatureStore, classifier: str | None = None
) -> tuple[list[dict], Manifest, dict]:
    """Predict every image of `folder` with one classifier of the run (default: its best)."""
    from tasks.classify.models import predict_scores

    report = read_report(run_dir)
    name = classifier or report["best_classifier"]
    if name not in report["classifiers"]:
        raise UserError(
            f"run {run_dir.name} has no classifier {name!r}; it has "
            f"{', '.join(report['classifiers'])}"
        )
    manifest = scan_for_prediction(folder)
    class_names = report["class_names"]
    if name == FINETUNED:  # an end-to-end network: images in, probabilities out
        from tasks.finetune.training import predict_finetuned

        predicted, scores = predict_finetuned(run_dir, manifest.paths())
        labels = [class_names.index(label) for label in predicted]
        counts = {"images_computed": len(labels), "images_cached": 0}
    else:
        result = extract(manifest, store, extract_settings_of(report))
        layer = report["settings"]["layer"]
        features = store.feature_array(result.feature_keys[layer]).as_dask()
        pca = load_pca(store, report["keys"]["reduction"])
        reduced = pca.project(features)
        labels, scores = predict_scores(load_model(run_dir, name), reduced)
        counts = {"images_computed": result.images_computed, "images_cached": result.images_cached}
    rows = [
        {
            "file": record.path,
            "true_class": record.label,
            "predicted_class": class_names[int(label)],
            **{f"score_{c}": float(s) for c, s in zip(class_names, row, strict=True)},
        }
        for record, label, row in zip(manifest.records, labels, scores, strict=True)
    ]
    return rows, manifest, {"classifier": name, **counts}


def write_predictions_csv(rows: list[dict], path: Path) -> Path:
    """One row per image: file, true class ('?' if unknown), predicted class, per-class scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
