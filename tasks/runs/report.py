"""Run folders: report.json/report.md, figures, misclassified lists and hashed model files.

A run folder holds everything needed to read a run back and predict with its models.
report.json is written last (atomically), so a folder without one is an unfinished run.
Model files carry their sha256 in report.json because loading a pickle runs code: a file
that does not match is refused before it is opened.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from tasks.classify.models import ClassifierResult
from tasks.errors import UserError
from tasks.runs.plots import confusion_png, learning_curves_png
from tasks.runs.redact import redact

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODELS_DIR = "models"


class ModelIntegrityError(UserError):
    """A model file is missing from the report or its sha256 differs from the recorded one."""


def new_run_id() -> str:
    """Sortable UTC timestamp (to the millisecond) plus a random suffix against collisions."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def to_plain(value: Any) -> Any:
    """Recursively turn numpy scalars/arrays, Paths, tuples and sets into JSON types.

    Non-finite floats become None so report.json stays strict JSON for any reader.
    """
    if isinstance(value, dict):
        return {str(to_plain(k)): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(to_plain(v) for v in value)
    if isinstance(value, np.ndarray | np.generic):
        return to_plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a report: {value!r}")


def sha256_file(path: Path) -> str:
    """Content hash of a model file: the check that makes loading a pickle safe-ish."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves a
    half-written file under the final name. The temp name keeps the suffix (Keras needs it)."""
    temp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _is_keras(model: Any) -> bool:
    """Keras models (dense heads, fine-tuned networks) are saved in Keras' own format."""
    return type(model).__module__.startswith("keras.")


def _model_file(result: ClassifierResult) -> str:
    suffix = "keras" if _is_keras(result.model) else "joblib"
    return f"{MODELS_DIR}/{result.name}.{suffix}"


def _save_model(result: ClassifierResult, path: Path) -> None:
    if _is_keras(result.model):
        atomic_write(path, result.model.save)
    else:
        atomic_write(path, lambda temp: joblib.dump(result.model, temp))


def _write_misclassified(
    path: Path, test_files: list[str], y_test: np.ndarray, y_pred: np.ndarray, names: list[str]
) -> int:
    """CSV of the test files the classifier got wrong; returns how many there were."""
    wrong = np.flatnonzero(y_test != y_pred)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "true", "predicted"])
        writer.writerows([test_files[i], names[y_test[i]], names[y_pred[i]]] for i in wrong)
    return len(wrong)


def _classifier_entry(
    run_dir: Path,
    result: ClassifierResult,
    class_names: list[str],
    test_files: list[str],
    y_test: np.ndarray,
) -> dict[str, Any]:
    """Write one classifier's files and return its section of report.json."""
    name = result.name
    images = {"confusion": f"confusion_{name}.png"}
    confusion_png(
        result.confusion, class_names, run_dir / images["confusion"], f"{name}: test confusion"
    )
    if result.history:
        images["learning_curves"] = f"learning_curves_{name}.png"
        learning_curves_png(result.history, run_dir / images["learning_curves"])
    misclassified = f"misclassified_{name}.csv"
    n_wrong = _write_misclassified(
        run_dir / misclassified, test_files, y_test, np.asarray(result.y_pred), class_names
    )
    model_file = _model_file(result)
    _save_model(result, run_dir / model_file)
    return {
        "metrics": result.metrics,
        "best_params": result.best_params,
        "confusion": result.confusion,
        "fit_seconds": result.fit_seconds,
        "predict_seconds": result.predict_seconds,
        "model_file": model_file,
        "model_sha256": sha256_file(run_dir / model_file),
        "images": images,
        "misclassified_file": misclassified,
        "n_misclassified": n_wrong,
        "history": result.history,
    }


def write_run(
    run_dir: Path,
    *,
    settings: dict,
    keys: dict,
    results: list[ClassifierResult],
    class_names: list[str],
    test_files: list[str],
    y_test: np.ndarray,
    extras: dict | None = None,
) -> dict:
    """Write a complete run folder and return the report dict (plain JSON types).

    The folder name is the run id; an existing report is never overwritten; credentials in the
    settings are masked.
    """
    run_dir = Path(run_dir)
    y_test = np.asarray(y_test)
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate classifier names in results: {names}")
    if len(test_files) != len(y_test):
        raise ValueError(f"{len(test_files)} test files but {len(y_test)} test labels")
    if (run_dir / REPORT_JSON).exists():
        raise FileExistsError(f"{run_dir} already holds a finished run")
    (run_dir / MODELS_DIR).mkdir(parents=True, exist_ok=True)

    classifiers = {
        r.name: _classifier_entry(run_dir, r, class_names, test_files, y_test) for r in results
    }
    best = max(classifiers, key=lambda n: classifiers[n]["metrics"]["accuracy"], default=None)
    report = to_plain(
        {
            "run_id": run_dir.name,
            "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "settings": redact(settings),
            "keys": keys,
            "class_names": class_names,
            "n_test": len(y_test),
            "best_classifier": best,
            "classifiers": classifiers,
            "extras": extras or {},
        }
    )
    atomic_write(run_dir / REPORT_MD, lambda p: p.write_text(report_markdown(report)))
    atomic_write(run_dir / REPORT_JSON, lambda p: p.write_text(json.dumps(report, indent=2)))
    return report


def read_report(run_dir: Path) -> dict:
    """The run's report.json: the record that model hashes are checked against."""
    return json.loads((Path(run_dir) / REPORT_JSON).read_text())


def load_model(run_dir: Path, name: str) -> Any:
    """Load a run's model only after its sha256 matches the one recorded in report.json.

    Raises ModelIntegrityError for a classifier the report does not list or a file whose
    hash differs (tampered, truncated or swapped): joblib pickles execute code on load.
    """
    run_dir = Path(run_dir)
    entry = read_report(run_dir)["classifiers"].get(name)
    if entry is None:
        raise ModelIntegrityError(f"run {run_dir.name} has no model named {name!r}")
    # Only the file name is taken from the report: a model can never be read from elsewhere.
    path = run_dir / MODELS_DIR / Path(entry["model_file"]).name
    actual = sha256_file(path)
    if actual != entry["model_sha256"]:
        raise ModelIntegrityError(
            f"{path} has sha256 {actual}, report.json records {entry['model_sha256']}; "
            "refusing to load it"
        )
    if path.suffix == ".keras":
        import keras  # lazy: only Keras heads pay for the TensorFlow import

        return keras.saving.load_model(path)
    return joblib.load(path)


def _setting(report: dict, key: str) -> Any:
    return report.get("settings", {}).get(key)


def list_runs(runs_root: Path) -> list[dict]:
    """One summary row per finished run under runs_root, newest first."""
    rows = []
    for report_path in Path(runs_root).glob(f"*/{REPORT_JSON}"):
        report = json.loads(report_path.read_text())
        rows.append(
            {
                "id": report["run_id"],
                "created": report["created"],
                "dataset": _setting(report, "dataset"),
                "backbone": _setting(report, "backbone"),
                "layer": _setting(report, "layer"),
                "best_classifier": report["best_classifier"],
                "accuracy": {
                    name: entry["metrics"]["accuracy"]
                    for name, entry in report["classifiers"].items()
                },
            }
        )
    return sorted(rows, key=lambda row: (row["created"], row["id"]), reverse=True)


def metrics_table(report: dict) -> list[dict]:
    """Rows for a Prefect table artifact: one per classifier."""
    return [
        {
            "classifier": name,
            "accuracy": entry["metrics"]["accuracy"],
            "macro_f1": entry["metrics"]["macro"]["f1"],
            "weighted_f1": entry["metrics"]["weighted"]["f1"],
            "fit_seconds": entry["fit_seconds"],
        }
        for name, entry in report["classifiers"].items()
    ]


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_value(value: Any, limit: int = 200) -> str:
    """Compact JSON for a bullet; long values are cut (report.json keeps them whole)."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + " … (full value in report.json)"


def _md_bullets(mapping: dict) -> str:
    return "\n".join(f"- **{key}**: `{_md_value(value)}`" for key, value in mapping.items())


def run_summary_markdown(report: dict) -> str:
    """Short Markdown for a Prefect artifact: what ran and how each classifier scored."""
    rows = [
        [
            f"**{row['classifier']}**"
            if row["classifier"] == report["best_classifier"]
            else row["classifier"],
            f"{row['accuracy']:.4f}",
            f"{row['macro_f1']:.4f}",
            f"{row['weighted_f1']:.4f}",
            f"{row['fit_seconds']:.2f}",
        ]
        for row in metrics_table(report)
    ]
    header = ["classifier", "accuracy", "macro F1", "weighted F1", "fit s"]
    context = ", ".join(
        f"{key} `{_setting(report, key)}`" for key in ("dataset", "backbone", "layer")
    )
    return "\n\n".join(
        [
            f"# Run {report['run_id']}",
            f"Created {report['created']}; {context}; {report['n_test']} test images; "
            f"best: **{report['best_classifier']}**.",
            _md_table(header, rows),
        ]
    )


def _classifier_markdown(name: str, entry: dict, class_names: list[str]) -> str:
    per_class = entry["metrics"]["per_class"]
    class_rows = [
        [
            c,
            *(f"{per_class[c][m]:.4f}" for m in ("precision", "recall", "f1")),
            per_class[c]["support"],
        ]
        for c in class_names
    ]
    confusion_rows = [
        [f"**{c}**", *counts] for c, counts in zip(class_names, entry["confusion"], strict=True)
    ]
    images = "\n\n".join(f"![{kind} {name}]({file})" for kind, file in entry["images"].items())
    return "\n\n".join(
        [
            f"## {name}",
            f"Best parameters: `{_md_value(entry['best_params'])}`",
            f"Fit {entry['fit_seconds']:.2f} s, predict {entry['predict_seconds']:.3f} s. "
            f"Model `{entry['model_file']}` (sha256 `{entry['model_sha256']}`). "
            f"{entry['n_misclassified']} misclassified: "
            f"[{entry['misclassified_file']}]({entry['misclassified_file']}).",
            _md_table(["class", "precision", "recall", "F1", "support"], class_rows),
            "Confusion matrix (rows true, columns predicted):",
            _md_table(["true \\ predicted", *class_names], confusion_rows),
            images,
        ]
    )


def report_markdown(report: dict) -> str:
    """The full human-readable report.md: summary, inputs, then one section per classifier."""
    sections = [
        run_summary_markdown(report),
        "## Settings\n\n" + _md_bullets(report["settings"]),
        "## Keys\n\n" + _md_bullets(report["keys"]),
    ]
    if report["extras"]:
        sections.append("## Extras\n\n" + _md_bullets(report["extras"]))
    sections += [
        _classifier_markdown(name, entry, report["class_names"])
        for name, entry in report["classifiers"].items()
    ]
    return "\n\n".join(sections) + "\n"
