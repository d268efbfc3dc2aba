"""report.json as typed records: what a run folder says about itself.

Readers get attributes instead of nested-dict lookups, so a misspelt field fails where it is
read, not three calls later. The JSON stays the same plain document (metrics and settings keep
their free-form dicts: their keys are class names and flags, not a fixed schema).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ClassifierReport:
    """One classifier's scores on the test rows and the files it left in the run folder."""

    metrics: dict[str, Any]  # accuracy, macro/weighted averages, per_class precision/recall/F1
    best_params: dict[str, Any]
    confusion: list[list[int]]  # rows true, columns predicted
    fit_seconds: float
    predict_seconds: float
    model_file: str
    model_sha256: str
    images: dict[str, str]  # kind (confusion, gallery, learning_curves) -> file in the run
    misclassified_file: str
    n_misclassified: int
    history: dict[str, list[float]] | None = None

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


@dataclass(frozen=True)
class RunReport:
    """The record a run folder is read back from; report.json is its JSON form."""

    run_id: str
    created: str
    settings: dict[str, Any]
    keys: dict[str, str]
    class_names: list[str]
    n_test: int
    best_classifier: str | None
    classifiers: dict[str, ClassifierReport]
    extras: dict[str, Any] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # run-wide figures, e.g. class_map
    # test images with a near-copy in training and the accuracy with/without one
    # (tasks.features.near_copies.LeakCheck.section); None in runs made before the check
    near_copies: dict[str, Any] | None = None

    def accuracy(self) -> dict[str, float]:
        """Test accuracy per classifier, in the order they were run."""
        return {name: entry.accuracy for name, entry in self.classifiers.items()}

    def setting(self, key: str) -> Any:
        return self.settings.get(key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        """Inverse of to_json; reports written before `images` or `near_copies` existed load
        with none."""
        known = {f.name for f in fields(ClassifierReport)}
        classifiers = {
            name: ClassifierReport(**{k: v for k, v in entry.items() if k in known})
            for name, entry in data["classifiers"].items()
        }
        own = {f.name for f in fields(cls)} - {"classifiers"}
        return cls(**{k: v for k, v in data.items() if k in own}, classifiers=classifiers)
