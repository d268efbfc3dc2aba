"""Prediction on new images with a finished run: same backbone, layer, scaling, PCA and model.

New images go through the feature store like any others, so predicting twice on the same
folder extracts nothing the second time. Everything that can be checked without an image (the
run's store, its reduction, its model files and weights) is checked first, so a wrong store or
a tampered model fails in seconds, not after an hour of extraction.

With test-time augmentation each image's 8 dihedral views go through the run's backbone (or
fine-tuned model) in memory, never into the store: the store holds features of files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.backbones.registry import get_spec, load_preprocess, resolve_weights
from tasks.data.scan import Manifest
from tasks.data.unlabelled import scan_for_prediction
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings, ProgressCallback, extract
from tasks.features.store import FeatureStore, StoreError
from tasks.finetune.settings import MODEL_NAME
from tasks.finetune.tta import TTA_COLUMN, VIEWS
from tasks.runs.folder import load_model, read_report
from tasks.runs.redact import MASK
from tasks.runs.schema import RunReport


class PredictError(UserError):
    """The run cannot predict here (wrong store, missing reduction, changed weights)."""


@dataclass(frozen=True)
class PredictPlan:
    """A run checked for prediction: its report, the chosen (verified, loaded) model and, for
    frozen-feature runs, the store holding its reduction."""

    run_dir: Path
    report: RunReport
    classifier: str
    model: Any
    store: str | None  # None for fine-tuned runs: they take images, not stored features


def recorded_store(report: RunReport) -> str:
    """The store a run was made with, as its report records it."""
    location = str(report.setting("store") or "")
    if not location or MASK in location:
        raise PredictError(
            f"run {report.run_id} does not record a usable store location "
            f"({location or 'none'}; credentials are masked in reports): give --store"
        )
    return location


def open_existing_store(location: str, recorded: str) -> FeatureStore:
    """Open a store without creating it: a mistyped --store must not leave an empty one."""
    try:
        return FeatureStore(location, mode="r+")
    except StoreError as error:
        raise PredictError(f"{error} (the run was made with the store {recorded})") from None


def _check_weights(store: FeatureStore, report: RunReport) -> None:
    """Refuse weights that no longer are the ones the run's features were made with (a
    replaced weights file): its models would then score features they never saw."""
    array = store.feature_array(report.keys["features"])
    if array is None:  # features removed since: the reduction alone is needed
        return
    settings = report.settings
    spec = get_spec(settings["backbone"])
    now = resolve_weights(spec, settings["weights"], settings.get("seed", 0)).identity
    if array.attrs.get("weights") != now:
        raise PredictError(
            f"weights {settings['weights']!r} are now {now}, but run {report.run_id} was "
            f"made with {array.attrs.get('weights')}: its models do not fit these features"
        )


def plan_prediction(
    run_dir: Path, store: str | None = None, classifier: str | None = None
) -> PredictPlan:
    """Check a run before any image is read: classifier, store (default: the run's own),
    reduction, weights and the model file's sha256 (the model is loaded only if it matches)."""
    report = read_report(run_dir)
    name = classifier or report.best_classifier
    if name not in report.classifiers:
        raise PredictError(
            f"run {run_dir.name} has no classifier {name!r}; it has {', '.join(report.classifiers)}"
        )
    location = None
    if name != MODEL_NAME:
        recorded = report.setting("store") or "?"
        location = store or recorded_store(report)
        feature_store = open_existing_store(location, recorded)
        reduction = report.keys["reduction"]
        if feature_store.reduction_attrs(reduction) is None:
            raise PredictError(
                f"the store {location} has no complete reduction {reduction} of run "
                f"{run_dir.name} (the run was made with the store {recorded})"
            )
        _check_weights(feature_store, report)
    return PredictPlan(run_dir, report, name, load_model(run_dir, name), location)


def extract_settings_of(report: RunReport) -> ExtractSettings:
    """The extraction settings a run's features were made with."""
    settings = report.settings
    return ExtractSettings(
        backbone=settings["backbone"],
        weights=settings["weights"],
        layers=(settings["layer"],),
        image_size=settings.get("image_size"),
        pooling=settings.get("pooling"),
        dtype=settings.get("dtype", "float32"),
        precision=settings.get("precision", "float32"),
        seed=settings.get("seed", 0),
    )


def tta_scores(
    plan: PredictPlan,
    manifest: Manifest,
    progress: ProgressCallback | None = None,
    images_per_step: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-class scores of a frozen-feature run with test-time augmentation: each
    image's 8 dihedral views through the backbone, rounded to the stored feature dtype,
    projected by the run's scaling + PCA and scored by its classifier; the scores averaged
    over the views, then argmax. `images_per_step` images (x 8 views) are in memory at a time."""
    import dask.array as da

    from tasks.classify.models import predict_scores
    from tasks.features.extract import build_model, prefetched, resolve_backbone
    from tasks.finetune.tta import dihedral_views, mean_over_views
    from tasks.reduce.stage import load_pca

    report = plan.report
    settings = extract_settings_of(report)
    spec, weights, size = resolve_backbone(settings)
    backbone = build_model(spec, weights, size, [report.setting("layer")], settings)
    pca = load_pca(FeatureStore(plan.store), report.keys["reduction"])
    paths = manifest.paths()
    steps = [paths[i : i + images_per_step] for i in range(0, len(paths), images_per_step)]
    preprocess = load_preprocess(spec)
    scores, done = [], 0
    # preprocessing is per pixel, so views of preprocessed images are preprocessed views
    for batch in prefetched(steps, size, preprocess, settings.decode_workers):
        views = np.asarray(dihedral_views(batch))
        features = np.concatenate(
            [
                np.asarray(backbone.predict_on_batch(views[i : i + settings.batch_size]))
                for i in range(0, len(views), settings.batch_size)
            ]
        )
        stored_like = features.astype(settings.dtype).astype(np.float32)
        _, view_scores = predict_scores(plan.model, pca.project(da.from_array(stored_like)))
        scores.append(mean_over_views(view_scores))
        done += len(batch)
        if progress:
            progress(done, len(paths))
    averaged = np.concatenate(scores)
    classes = getattr(plan.model, "classes_", np.arange(averaged.shape[1]))
    return np.asarray(classes)[np.argmax(averaged, axis=1)], averaged


def predict_folder(
    plan: PredictPlan,
    folder: Path,
    progress: ProgressCallback | None = None,
    labels: Path | None = None,
    tta: bool = False,
) -> tuple[list[dict], Manifest, dict]:
    """Predict every image of `folder` (or those a labels CSV lists) with a checked run;
    `tta` averages each image's scores over its 8 dihedral views (all computed anew)."""
    from tasks.classify.models import predict_scores
    from tasks.reduce.stage import load_pca  # imports scikit-learn: not needed for the checks

    report = plan.report
    manifest = scan_for_prediction(folder, labels)
    class_names = report.class_names
    if plan.classifier == MODEL_NAME:  # an end-to-end network: images in, probabilities out
        from tasks.finetune.training import predict_finetuned

        paths = manifest.paths()
        predicted, scores = predict_finetuned(report, plan.model, paths, tta=tta, progress=progress)
        labels = [class_names.index(label) for label in predicted]
        counts = {"images_computed": len(labels), "images_cached": 0}
    elif tta:
        labels, scores = tta_scores(plan, manifest, progress)
        counts = {"images_computed": len(labels), "images_cached": 0}
    else:
        store = FeatureStore(plan.store)
        result = extract(manifest, store, extract_settings_of(report), progress)
        layer = report.setting("layer")
        features = store.feature_array(result.feature_keys[layer]).as_dask()
        pca = load_pca(store, report.keys["reduction"])
        labels, scores = predict_scores(plan.model, pca.project(features))
        counts = {"images_computed": result.images_computed, "images_cached": result.images_cached}
    rows = [
        {
            "file": record.path,
            "true_class": record.label,
            "predicted_class": class_names[int(label)],
            **{f"score_{c}": float(s) for c, s in zip(class_names, row, strict=True)},
            **({TTA_COLUMN: VIEWS} if tta else {}),
        }
        for record, label, row in zip(manifest.records, labels, scores, strict=True)
    ]
    info = {"classifier": plan.classifier, "store": plan.store, "tta": tta, **counts}
    return rows, manifest, info


def write_predictions_csv(rows: list[dict], path: Path) -> Path:
    """One row per image: file, true class ('?' if unknown), predicted class, per-class scores
    (and tta_views, 8, when the scores are averages over test-time augmentation's views)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
