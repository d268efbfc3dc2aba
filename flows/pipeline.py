"""Prefect flows: extract, reduce, classify and the pipeline that chains them.

Thin wiring only: each task calls one plain function from tasks/, and the store's content keys
(not Prefect's run-scoped cache) decide what is recomputed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import flow_run, task_run
from prefect.states import State

from flows.progress import ProgressDisplay
from flows.settings import PipelineSettings
from tasks.classify.stage import classify_run
from tasks.data.labels import scan_labels
from tasks.data.scan import Manifest, scan
from tasks.data.splits import group_source, has_group_column, split_rows
from tasks.errors import UserError, is_disk_full
from tasks.features.extract import ExtractResult, extract
from tasks.features.near_copies import LeakCheck, leak_check, near_copy_groups, unit_rows
from tasks.features.store import FeatureStore
from tasks.reduce.stage import ReduceOutcome, cached_reduction, reduce_cached
from tasks.reduce.stage import logger as reduce_logger
from tasks.runs.redact import redact
from tasks.runs.schema import RunReport


def transient_io_failure(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry I/O hiccups (a network store, a busy disk), never bad input, a full disk or bugs:
    those fail the same way every time, and a retry would only delay the message."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, OSError) and not is_disk_full(error)


# Our progress lines (e.g. long PCA passes) are INFO; Prefect hands the "featurepipe" logger its
# API handler (PREFECT_LOGGING_EXTRA_LOGGERS) but not a level, and the root's WARNING hid them.
logging.getLogger("featurepipe").setLevel(logging.INFO)

# Backoff between attempts; extraction resumes from its finished chunks on every retry.
IO_RETRIES = {
    "retries": 2,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": transient_io_failure,
}


def _run_name() -> str:
    settings = flow_run.parameters.get("settings")
    if isinstance(settings, dict):
        settings = PipelineSettings(**settings)
    layers = ",".join(settings.layers) or "default-layer"
    source = Path(settings.data).name if settings.data else Path(settings.store).name
    return f"{source}-{settings.backbone}-{layers}"


def _classify_run_name() -> str:
    keys = flow_run.parameters.get("feature_keys") or []
    return "classify-" + ",".join(key[:8] for key in keys)


def _scan_run_name() -> str:
    return f"scan-{Path(str(task_run.parameters['data'])).name}"  # a path's or a URL's last part


@task(name="scan", cache_policy=NO_CACHE, task_run_name=_scan_run_name)
def scan_task(
    data: Path | str, limit_per_class: int | None, labels: Path | None = None
) -> Manifest:
    manifest = scan_labels(data, labels, limit_per_class) if labels else scan(data, limit_per_class)
    logger = get_run_logger()
    logger.info(
        "scanned %s: %d images, %d classes, %d skipped",
        data,
        len(manifest.records),
        len(manifest.class_names),
        len(manifest.skipped),
    )
    for warning in manifest.warnings:
        logger.warning(warning)
    return manifest


def _check_group_source(settings: PipelineSettings, manifest: Manifest) -> None:
    """Fail before the (long) extraction when a grouped split has two sources of groups."""
    if settings.split == "grouped":
        near_copies = settings.group_by == "near-copies"
        group_source(has_group_column(manifest), settings.group_regex, near_copies)


def _require_classes(manifest: Manifest) -> None:
    """Fail before the (long) extraction when no classifier could be trained afterwards."""
    if len(manifest.class_names) < 2:
        raise UserError(
            f"classifiers need at least 2 classes; {manifest.root} has "
            f"{len(manifest.class_names)} ({', '.join(manifest.class_names)})"
        )


def _scales_out(settings: PipelineSettings) -> bool:
    """Whether to run on a Dask cluster (--workers > 1 or --dask-address). Otherwise Dask's
    threads in this process do the work: for PCA a one-worker LocalCluster only adds a socket
    between the reads and the products, and is slower (benchmarks/README.md, "Scheduler and
    panel size of the gram fit")."""
    return settings.workers > 1 or settings.dask_address is not None


# tag "backbone": `prefect concurrency-limit create backbone 1` serialises backbone passes
@task(
    name="extract",
    cache_policy=NO_CACHE,
    **IO_RETRIES,
    task_run_name="extract-{settings.backbone}",
    tags=["backbone"],
)
def extract_task(manifest: Manifest, settings: PipelineSettings) -> ExtractResult:
    from tasks.cluster import dask_client

    store = FeatureStore(settings.store)
    logger = get_run_logger()
    progress = ProgressDisplay(f"extract {settings.backbone}")
    with progress, contextlib.ExitStack() as stack:
        client = (
            stack.enter_context(dask_client(settings.dask_address, settings.workers, 1))
            if _scales_out(settings)
            else None
        )
        result = extract(
            manifest,
            store,
            settings.extract_settings(),
            progress,
            on_wait=lambda: logger.info(
                "waiting for another run extracting the same features into this store"
            ),
            client=client,
        )
    logger.info(
        "features: %d computed, %d cached (%.1f s)",
        result.images_computed,
        result.images_cached,
        result.seconds,
    )
    return result


@task(name="reduce", cache_policy=NO_CACHE, **IO_RETRIES, task_run_name="reduce-{layer}")
def reduce_task(
    settings: PipelineSettings, layer: str, feature_key: str, train_rows: np.ndarray
) -> ReduceOutcome:
    from tasks.cluster import dask_client

    store = FeatureStore(settings.store)
    outcome = cached_reduction(store, feature_key, train_rows, settings.pca_settings())
    if outcome is None:  # start a cluster only when there is something to fit
        with (
            dask_client(settings.dask_address, settings.workers)
            if _scales_out(settings)
            else contextlib.nullcontext()
        ):
            with ProgressDisplay(f"reduce {layer}", unit="rows", log=reduce_logger) as progress:
                pca = settings.pca_settings()
                outcome = reduce_cached(store, feature_key, train_rows, pca, progress)
    get_run_logger().info(
        "%s: %d components (%s, %s)",
        layer,
        outcome.n_components,
        outcome.method,
        "cached" if outcome.cached else "fitted",
    )
    return outcome


@task(name="near-copy-groups", cache_policy=NO_CACHE, task_run_name="near-copy-groups-{layer}")
def near_copy_groups_task(settings: PipelineSettings, layer: str, feature_key: str) -> dict:
    """Groups of near-copies in one layer's stored features, for a grouped split."""
    rows = unit_rows(FeatureStore(settings.store).feature_array(feature_key).data)
    found = near_copy_groups(rows, settings.near_copy_threshold)
    get_run_logger().info("%s (layer %s)", found.describe(), layer)
    return {
        "groups": found.groups,
        "layer": layer,
        "threshold": found.threshold,
        "rule": settings.near_copy_threshold if settings.near_copy_threshold == "auto" else "fixed",
        "n_groups": found.n_groups,
        "largest_share": found.largest_share,
    }


def _split(
    settings: PipelineSettings, manifest: Manifest, feature_keys: dict[str, str]
) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(train, test, near-copy groups' figures or None): one split for every layer, so
    layers compare on the same rows; near-copy groups come from the first layer's features."""
    found = None
    if settings.split == "grouped" and settings.group_by == "near-copies":
        found = near_copy_groups_task(settings, *next(iter(feature_keys.items())))
    train, test = split_rows(
        manifest,
        settings.split,
        settings.test_size,
        settings.seed,
        settings.group_regex,
        groups=None if found is None else found.pop("groups"),
    )
    return train, test, found


def publish_run(report: RunReport, run_dir: Path, label: str) -> None:
    """A run's Prefect artifacts: the metrics table, and report.md's content with its pictures
    inline and the run folder named as host and path (a file:// link opens nowhere else)."""
    from tasks.runs.markdown import artifact_markdown, metrics_table

    create_table_artifact(metrics_table(report), description=f"metrics {label}")
    create_markdown_artifact(artifact_markdown(report, run_dir), description=f"report {label}")


# the settings of a run that its features decide, whatever the flags of the run said
FEATURE_FIELDS = ("backbone", "weights", "image_size", "pooling", "dtype", "precision")


def _made_with(store: FeatureStore, feature_key: str) -> dict:
    """The backbone settings the stored features were made with, `auto` resolved: a run
    records these (a classify-only run too, whose flags default to other weights), so that
    `predict` rebuilds the same backbone."""
    attrs = store.feature_array(feature_key).attrs
    made = attrs.get("settings", {})
    return {
        "precision": attrs.get("precision", "float32"),
        **{field: made[field] for field in FEATURE_FIELDS if field in made},
    }


def _near_copy_check(
    settings: PipelineSettings,
    store: FeatureStore,
    manifest: Manifest,
    layer: str,
    feature_key: str,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
) -> LeakCheck:
    """Every run checks its own split: test images with a near-copy in training, logged, and
    one WARNING when they are most of the test set."""
    rows = unit_rows(store.feature_array(feature_key).data)
    files = [record.path for record in manifest.records]
    check = leak_check(rows, train_rows, test_rows, settings.near_copy_threshold, files)
    logger = get_run_logger()
    if (warning := check.warning()) is not None:
        logger.warning("%s: %s", layer, warning)
    else:
        logger.info(
            "%s: %d of %d test images have a near-copy in training (cosine >= %.4f, %s); "
            "leak estimate %.0f%%",
            layer,
            int(check.has_copy.sum()),
            len(test_rows),
            check.threshold,
            settings.near_copy_threshold if settings.near_copy_threshold == "auto" else "fixed",
            100 * check.leak_estimate,
        )
    return check


@task(name="classify", cache_policy=NO_CACHE, **IO_RETRIES, task_run_name="classify-{layer}")
def classify_task(
    settings: PipelineSettings,
    layer: str,
    manifest: Manifest,
    reduction: ReduceOutcome,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    extras: dict,
) -> dict:
    from tasks.runs.folder import new_run_id

    run_id = new_run_id()
    run_dir = Path(settings.runs) / run_id
    store = FeatureStore(settings.store)
    check = _near_copy_check(
        settings, store, manifest, layer, reduction.feature_key, train_rows, test_rows
    )
    run_settings = {
        **settings.model_dump(mode="json"),
        **_made_with(store, reduction.feature_key),
        "layer": layer,
        "dataset": str(settings.data or manifest.root),
        # absolute, so that `predict --run` finds the run's store from any folder
        "store": settings.store
        if "://" in settings.store
        else str(Path(settings.store).expanduser().resolve()),
    }
    report = classify_run(
        store,
        manifest,
        reduction,
        train_rows,
        test_rows,
        settings.classifiers,
        run_dir,
        run_settings,
        seed=settings.seed,
        extras=extras,
        options=settings.classifier_options,
        svm_max_rows=settings.svm_max_rows,
        memory_limit_gib=settings.memory_limit,
        near_copies=check,
    )
    publish_run(report, run_dir, layer)
    return {"run_id": run_id, "run_dir": str(run_dir), "report": report}


def _reduce_and_classify(
    settings: PipelineSettings, manifest: Manifest, feature_keys: dict[str, str], extras: dict
) -> dict[str, dict]:
    """Split once, then per layer: reduce (cached by key), classify; the part shared by all
    flows."""
    train, test, found = _split(settings, manifest, feature_keys)
    if found is not None:
        extras = {**extras, "near_copy_groups": found}
    layers = {}
    for layer, feature_key in feature_keys.items():
        reduction = reduce_task(settings, layer, feature_key, train)
        run = classify_task(settings, layer, manifest, reduction, train, test, extras)
        layers[layer] = {
            "feature_key": feature_key,
            "reduce_key": reduction.key,
            "n_components": reduction.n_components,
            "pca_method": reduction.method,
            "reduce_cached": reduction.cached,
            "reduce_seconds": reduction.seconds,
            "run_id": run["run_id"],
            "run_dir": run["run_dir"],
            "accuracy": run["report"].accuracy(),
            "near_copy_share": run["report"].near_copies["share"],
            "near_copy_leak_estimate": run["report"].near_copies["leak_estimate"],
        }
    return layers


def _summary(
    settings: PipelineSettings,
    manifest: Manifest,
    layers: dict[str, dict],
    extracted: ExtractResult | None,
) -> dict:
    first = next(iter(layers.values()))
    total = len(manifest.records)
    return {
        "images_total": total,
        "images_computed": extracted.images_computed if extracted else 0,
        "images_cached": extracted.images_cached if extracted else total,
        "images_skipped": len(manifest.skipped),
        "skipped": [asdict(s) for s in manifest.skipped],
        "store": redact(settings.store),
        "manifest_key": manifest.key,
        "class_names": manifest.class_names,
        "warnings": manifest.warnings,
        "run_id": first["run_id"],
        "run_dir": first["run_dir"],
        "n_components": first["n_components"],
        "accuracy": first["accuracy"],
        "near_copy_share": first["near_copy_share"],
        "near_copy_leak_estimate": first["near_copy_leak_estimate"],
        "layers": layers,
        "flow_run_id": str(flow_run.id),
        "extract_seconds": extracted.seconds if extracted else 0.0,
        "images_per_second": extracted.images_per_second if extracted else None,
    }


@flow(name="extract", flow_run_name=_run_name)
def extract_flow(settings: PipelineSettings) -> dict:
    """Scan the image folder and fill the feature store (one backbone pass for all layers)."""
    manifest = scan_task(settings.data, settings.limit_per_class, settings.labels)
    extracted = extract_task(manifest, settings)
    return {
        **asdict(extracted),
        "store": redact(settings.store),
        "manifest_key": manifest.key,
        "images_skipped": len(manifest.skipped),
        "skipped": [asdict(s) for s in manifest.skipped],
        "flow_run_id": str(flow_run.id),
    }


@flow(name="reduce", flow_run_name=_run_name)
def reduce_flow(settings: PipelineSettings, feature_key: str) -> dict:
    """Fit scaling + PCA on the train rows of stored features; no images, no backbone."""
    store = FeatureStore(settings.store, mode="r+")  # must exist
    manifest = store.manifest_for(feature_key)
    train, _, _ = _split(settings, manifest, {"features": feature_key})
    return asdict(reduce_task(settings, "features", feature_key, train))


@flow(name="classify", flow_run_name=_classify_run_name)
def classify_flow(settings: PipelineSettings, feature_keys: list[str]) -> dict:
    """Re-run only the classifier stage on stored features: never builds the backbone."""
    store = FeatureStore(settings.store, mode="r+")  # must exist
    keys = {}
    for prefix in feature_keys:
        array = store.feature_array(store.find(prefix)[1])
        keys[array.attrs.get("layer", array.key)] = array.key
    manifest = store.manifest_for(next(iter(keys.values())))
    layers = _reduce_and_classify(settings, manifest, keys, {})
    return _summary(settings, manifest, layers, None)


@flow(name="pipeline", flow_run_name=_run_name)
def pipeline_flow(settings: PipelineSettings) -> dict:
    """Scan -> extract (one backbone pass for all layers) -> per layer: reduce -> classify."""
    manifest = scan_task(settings.data, settings.limit_per_class, settings.labels)
    _require_classes(manifest)
    _check_group_source(settings, manifest)
    extracted = extract_task(manifest, settings)
    extras = {
        "warnings": manifest.warnings,
        "skipped": [asdict(s) for s in manifest.skipped],
        "extract_seconds": extracted.seconds,
        "images_per_second": extracted.images_per_second,
    }
    layers = _reduce_and_classify(settings, manifest, extracted.feature_keys, extras)
    for layer, info in layers.items():
        info["n_features"] = extracted.n_features.get(layer)
    return _summary(settings, manifest, layers, extracted)


@flow(name="sweep", flow_run_name=_run_name)
def sweep_flow(settings: PipelineSettings) -> dict:
    """The notebook's experiment: every layer from one backbone pass, reduced, classified and
    compared in one table (Markdown, CSV, bar chart, Prefect table artifact)."""
    from tasks.runs.folder import read_report
    from tasks.runs.markdown import inline_pictures
    from tasks.runs.sweep import sweep_markdown, sweep_rows, write_sweep

    summary = pipeline_flow(settings)
    reports = {
        layer: read_report(Path(info["run_dir"])) for layer, info in summary["layers"].items()
    }
    rows = sweep_rows(summary["layers"], reports)
    folder = Path(settings.runs) / f"sweep-{summary['run_id']}"
    title = f"Layer sweep: {settings.backbone} on {settings.data}, split {settings.split}"
    paths = write_sweep(rows, folder, title)
    create_table_artifact(rows, key="layer-sweep", description="accuracy per layer")
    create_markdown_artifact(
        sweep_markdown(rows, title, inline_pictures(folder)), description="layer sweep chart"
    )
    return {**summary, "sweep": rows, "sweep_files": {k: str(v) for k, v in paths.items()}}


@flow(name="predict", flow_run_name="predict-{run_dir.name}")
def predict_flow(
    run_dir: Path,
    data: Path | str,
    out: Path,
    store: str | None = None,
    classifier: str | None = None,
    labels: Path | None = None,
    tta: bool = False,
) -> dict:
    """Predict new images with a finished run and write a CSV (file, class, scores). The
    store defaults to the run's own; the run is checked before any image is read. `tta`:
    scores averaged over each image's 8 dihedral views (tasks.runs.predict)."""
    from tasks.runs.predict import plan_prediction, predict_folder, write_predictions_csv

    plan = plan_prediction(run_dir, store, classifier)
    with ProgressDisplay(f"predict {plan.report.setting('backbone')}") as progress:
        rows, manifest, info = predict_folder(plan, data, progress, labels, tta)
    write_predictions_csv(rows, out)
    get_run_logger().info("%d predictions written to %s", len(rows), out)
    return {
        **info,
        "store": redact(info["store"]),
        "predictions": len(rows),
        "csv": str(out),
        "skipped": [asdict(s) for s in manifest.skipped],
    }
