"""The classify stage: fit classifiers on a stored reduction's rows and write the run folder.

It reads only reduced rows from the store, never images or a backbone, so re-running it costs
only the classifiers themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.data.scan import Manifest
from tasks.features.store import FeatureStore
from tasks.reduce.stage import ReduceOutcome, load_projected
from tasks.runs.schema import RunReport


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
) -> RunReport:
    """Fit every classifier on cached reduced rows, evaluate on the test rows, write the run."""
    from tasks.classify.models import train_and_evaluate
    from tasks.runs.plots import explained_variance_png, pca_class_map_png
    from tasks.runs.report import write_run

    projected, attrs = load_projected(store, reduction.key)
    labels = np.asarray(manifest.labels)
    results = [
        train_and_evaluate(
            name,
            projected[train_rows],
            labels[train_rows],
            projected[test_rows],
            labels[test_rows],
            manifest.class_names,
            options=(options or {}).get(name),
            seed=seed,
        )
        for name in classifiers
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    cumulative = np.asarray(attrs["pca"]["cumulative_variance_ratio"])
    explained_variance_png(
        cumulative, reduction.n_components, attrs["variance"], run_dir / "pca_variance.png"
    )
    rows = np.concatenate([train_rows, test_rows])
    pca_class_map_png(
        projected[rows],
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
    )
