"""The classify stage: fit classifiers on a stored reduction's rows and write the run folder.

It reads only reduced rows from the store, never images or a backbone, so re-running it costs
only the classifiers themselves. Its memory is planned before any fit (tasks/classify/plan.py):
classifiers that would not fit, or the SVM grid beyond `svm_max_rows`, hand over to the streamed
`sgd`, and when only `sgd` runs the projected rows are never loaded whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks.classify.plan import STREAMED, SVM_MAX_ROWS, ClassifyPlan, Shape, plan_classifiers
from tasks.classify.streamed import DEFAULT_OPTIONS, RowSource, stored_rows
from tasks.data.scan import Manifest
from tasks.features.near_copies import LeakCheck
from tasks.features.store import FeatureStore, StoreError
from tasks.reduce.plan import memory_limit
from tasks.reduce.stage import ReduceOutcome, load_projected
from tasks.runs.schema import RunReport

logger = logging.getLogger("featurepipe.classify")
STREAM_BUFFER_MIB = DEFAULT_OPTIONS["buffer_mib"]  # also for the class map's leading columns


def plan_run(
    source: RowSource,
    n_train: int,
    n_test: int,
    n_classes: int,
    classifiers: list[str],
    options: dict[str, dict] | None,
    svm_max_rows: int,
    memory_limit_gib: float | None,
) -> ClassifyPlan:
    """The stage's plan from the stored shapes, logged: the figures, then each handover."""
    from tasks.classify.models import resolve_options

    resolved = {
        name: resolve_options(name, (options or {}).get(name))
        for name in dict.fromkeys([*classifiers, STREAMED])
    }
    chunk_bytes = 4 * source.chunk_rows * source.chunk_columns
    shape = Shape(
        n_train, n_test, int(source.array.shape[0]), source.n_columns, n_classes, chunk_bytes
    )
    limit, limit_source = memory_limit(memory_limit_gib)
    plan = plan_classifiers(classifiers, shape, resolved, limit, limit_source, svm_max_rows)
    logger.info(plan.describe())
    for handover in plan.handovers:
        logger.warning(handover.line())
    return plan


def classify_run(
    store: FeatureStore,
    manifest: Manifest,
    reduction: ReduceOutcome,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    classifiers: list[str],
    run_dir: Path,
    settings: dict,
    seed: int = 0,
    extras: dict | None = None,
    options: dict[str, dict] | None = None,
    svm_max_rows: int = SVM_MAX_ROWS,
    memory_limit_gib: float | None = None,
    near_copies: LeakCheck | None = None,
) -> RunReport:
    """Fit every classifier on cached reduced rows, evaluate on the test rows, write the run.

    Classifiers are planned first (`plan_run`); the handovers are logged and recorded in the
    report's extras (`classifier_handover`, shown in report.md). `near_copies`, the test rows'
    near-copy check, goes into the report with the accuracy with and without a near-copy.
    """
    from tasks.classify.models import train_and_evaluate, train_and_evaluate_streamed
    from tasks.runs.plots import MAP_LDA_COMPONENTS, explained_variance_png, pca_class_map_png
    from tasks.runs.report import write_run

    attrs = store.reduction_attrs(reduction.key)
    if attrs is None:
        raise StoreError(f"no complete reduction {reduction.key} in {store.location}")
    train, test = (stored_rows(store, reduction.key, rows) for rows in (train_rows, test_rows))
    labels = np.asarray(manifest.labels)
    plan = plan_run(
        train,
        len(train_rows),
        len(test_rows),
        len(manifest.class_names),
        classifiers,
        options,
        svm_max_rows,
        memory_limit_gib,
    )
    projected = load_projected(store, reduction.key)[0] if plan.in_memory else None
    y_train, y_test = labels[train_rows], labels[test_rows]

    results = []
    for name in plan.run:  # projected is None only when every name is the streamed one
        common = {"options": (options or {}).get(name), "seed": seed}
        if name == STREAMED:
            result = train_and_evaluate_streamed(
                train, y_train, test, y_test, manifest.class_names, **common
            )
        else:
            result = train_and_evaluate(
                name,
                projected[train_rows],
                y_train,
                projected[test_rows],
                y_test,
                manifest.class_names,
                **common,
            )
        results.append(result)
    del projected
    run_dir.mkdir(parents=True, exist_ok=True)
    cumulative = np.asarray(attrs["pca"]["cumulative_variance_ratio"])
    explained_variance_png(
        cumulative, reduction.n_components, attrs["variance"], run_dir / "pca_variance.png"
    )
    rows = np.concatenate([train_rows, test_rows])
    pca_class_map_png(
        RowSource(train.array, rows).leading_columns(MAP_LDA_COMPONENTS, STREAM_BUFFER_MIB),
        labels[rows],
        len(train_rows),
        cumulative,
        manifest.class_names,
        run_dir / "class_map.png",
    )
    keys = {"manifest": manifest.key, "features": reduction.feature_key, "reduction": reduction.key}
    info = {
        "n_components": reduction.n_components,
        "pca_method": reduction.method,
        "explained_variance": reduction.explained_variance,
        "n_train": int(len(train_rows)),
        "n_test": int(len(test_rows)),
        "classifier_plan": plan.describe(),
        "classifier_handover": [handover.line() for handover in plan.handovers],
        **(extras or {}),
    }
    return write_run(
        run_dir,
        settings=settings,
        keys=keys,
        results=results,
        class_names=manifest.class_names,
        test_files=[manifest.records[i].path for i in test_rows],
        y_test=labels[test_rows],
        image_root=manifest.root,
        images={"class_map": "class_map.png", "pca_variance": "pca_variance.png"},
        extras=info,
        near_copies=near_copies,
    )
