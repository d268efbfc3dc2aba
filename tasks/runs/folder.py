"""Run-folder I/O: every read and write of a run folder goes through here.

report.json is written last (atomically), so a folder without one is an unfinished run.
Model files carry their sha256 in report.json because loading a pickle runs code: a file
that does not match is refused before it is opened.
"""

from __future__ import annotations

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

from tasks.errors import UserError
from tasks.runs.schema import RunReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODELS_DIR = "models"


class ModelIntegrityError(UserError):
    """A model file is missing from the report or its sha256 differs from the recorded one."""


def new_run_id() -> str:
    """Sortable UTC timestamp (to the millisecond) plus a random suffix against collisions."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def find_run(runs_root: Path, run_id: str) -> Path:
    """The folder of a finished run; ids are plain names, never paths out of the runs folder."""
    if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
        raise UserError(f"not a run id: {run_id!r} (see `featurepipe runs ls`)")
    if not is_finished(Path(runs_root) / run_id):
        raise UserError(f"no finished run {run_id} in {runs_root}")
    return Path(runs_root) / run_id


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
    path = Path(path)
    temp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda temp: temp.write_text(text))
    return Path(path)


def _is_keras(model: Any) -> bool:
    """Keras models (dense heads, fine-tuned networks) are saved in Keras' own format."""
    return type(model).__module__.startswith("keras.")


def save_model(run_dir: Path, name: str, model: Any) -> tuple[str, str]:
    """Save a fitted model under models/; returns its file (relative to the run) and sha256."""
    relative = f"{MODELS_DIR}/{name}.{'keras' if _is_keras(model) else 'joblib'}"
    path = Path(run_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_keras(model):
        atomic_write(path, model.save)
    else:
        atomic_write(path, lambda temp: joblib.dump(model, temp))
    return relative, sha256_file(path)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / REPORT_JSON).exists()


def write_report(run_dir: Path, report: RunReport, markdown: str) -> None:
    """report.md, then report.json last: its presence is what marks the run finished."""
    run_dir = Path(run_dir)
    if is_finished(run_dir):
        raise FileExistsError(f"{run_dir} already holds a finished run")
    write_text(run_dir / REPORT_MD, markdown)
    write_text(run_dir / REPORT_JSON, json.dumps(report.to_json(), indent=2))


def read_report(run_dir: Path) -> RunReport:
    """The run's report.json: the record that model hashes are checked against."""
    return RunReport.from_json(json.loads((Path(run_dir) / REPORT_JSON).read_text()))


def read_markdown(run_dir: Path) -> str:
    return (Path(run_dir) / REPORT_MD).read_text()


def load_model(run_dir: Path, name: str) -> Any:
    """Load a run's model only after its sha256 matches the one recorded in report.json.

    Raises ModelIntegrityError for a classifier the report does not list or a file whose
    hash differs (tampered, truncated or swapped): joblib pickles execute code on load.
    """
    run_dir = Path(run_dir)
    entry = read_report(run_dir).classifiers.get(name)
    if entry is None:
        raise ModelIntegrityError(f"run {run_dir.name} has no model named {name!r}")
    # Only the file name is taken from the report: a model can never be read from elsewhere.
    path = run_dir / MODELS_DIR / Path(entry.model_file).name
    actual = sha256_file(path)
    if actual != entry.model_sha256:
        raise ModelIntegrityError(
            f"{path} has sha256 {actual}, report.json records {entry.model_sha256}; "
            "refusing to load it"
        )
    if path.suffix == ".keras":
        import keras  # lazy: only Keras heads pay for the TensorFlow import

        return keras.saving.load_model(path)
    return joblib.load(path)


def list_runs(runs_root: Path) -> list[dict]:
    """One summary row per finished run under runs_root, newest first (plain JSON types)."""
    rows = []
    for report_path in Path(runs_root).glob(f"*/{REPORT_JSON}"):
        report = read_report(report_path.parent)
        rows.append(
            {
                "id": report.run_id,
                "created": report.created,
                "dataset": report.setting("dataset"),
                "backbone": report.setting("backbone"),
                "layer": report.setting("layer"),
                "best_classifier": report.best_classifier,
                "accuracy": report.accuracy(),
            }
        )
    return sorted(rows, key=lambda row: (row["created"], row["id"]), reverse=True)


def file_listing(run_dir: Path) -> list[tuple[str, int]]:
    """(path relative to the run, bytes) of every finished file, temp files left out."""
    run_dir = Path(run_dir)
    return sorted(
        (str(path.relative_to(run_dir)), path.stat().st_size)
        for path in run_dir.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    )
