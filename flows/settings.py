"""One validated settings model per flow, composed of the stages' own settings.

Each stage declares its settings once, with defaults and constraints (tasks.backbones.settings,
tasks.features.extract, tasks.reduce.stage, tasks.finetune.settings); a flow's model inherits
from the stages it runs, so flags, config files, the Prefect form and report.json all keep one
flat set of names. Pydantic gives users precise messages for bad values and the Prefect UI a
typed form.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.classify.plan import SVM_MAX_ROWS
from tasks.data.images import is_url
from tasks.data.splits import SPLIT_METHODS, SplitError, group_source
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings
from tasks.features.near_copies import NearCopySettings
from tasks.features.store import DEFAULT_STORE
from tasks.reduce.stage import PcaSettings

DEFAULT_RUNS = Path("runs")
Stage = TypeVar("Stage", bound=BaseModel)


class SettingsError(UserError):
    """Invalid settings; the message lists every problem in user terms."""


def comma_list(value: Any) -> Any:
    """Accept "a, b" from a flag as well as a list from a config file."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def stage_settings(settings: BaseModel, stage: type[Stage]) -> Stage:
    """The part of a flow's settings one stage takes, as that stage's own settings class."""
    return stage(**{name: getattr(settings, name) for name in stage.model_fields})


class DataSettings(BaseModel):
    """Which images, how they are split into train and test, and where runs are written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path | str | None = Field(
        None,
        description="Image folder: one sub-folder per class "
        "(optionally inside train/ valid/ test/); or s3://bucket/prefix (any fsspec URL)",
    )
    runs: Path = Field(DEFAULT_RUNS, description="Folder that receives one folder per run")
    limit_per_class: int | None = Field(None, ge=1)
    split: Literal[SPLIT_METHODS] = "auto"
    test_size: float = Field(0.25, gt=0.0, lt=1.0)
    group_regex: str | None = Field(
        None,
        description="File-name regex giving a grouped split's group (when the labels file has "
        "no group column)",
    )
    labels: Path | None = Field(
        None,
        description="CSV of path,label[,split][,group] (paths relative to data) instead of "
        "class folders; a group column gives --split grouped its groups",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _path_or_url(cls, value: Any) -> Any:
        """A URL stays text (a Path would fold its '//'); anything else is a local path."""
        return value if value is None or is_url(value) else Path(value)


class ClassifierSettings(BaseModel):
    """Which classifiers run on the reduced features, and their options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifiers: list[str] = Field(default_factory=lambda: ["svm", "logreg"])
    classifier_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per classifier, e.g. {svm: {param_grid: {C: [1, 10]}}}"
    )
    svm_max_rows: int = Field(
        SVM_MAX_ROWS, ge=0, description="Training rows above which the SVM grid hands over to sgd"
    )

    @field_validator("classifiers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("classifiers")
    @classmethod
    def _known_classifiers(cls, value: list[str]) -> list[str]:
        from tasks.classify.models import CLASSIFIERS

        unknown = [name for name in value if name not in CLASSIFIERS]
        if unknown or not value:
            raise ValueError(
                f"unknown classifier(s) {unknown or value}; choose from {', '.join(CLASSIFIERS)}"
            )
        return value

    @field_validator("classifier_options")
    @classmethod
    def _known_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from tasks.classify.models import resolve_options

        for name, options in value.items():
            resolve_options(name, options)  # unknown names/keys fail here, not after extraction
        return value


class PipelineSettings(
    ClassifierSettings, PcaSettings, ExtractSettings, NearCopySettings, DataSettings
):
    """Every knob of a featurepipe run, with the original notebook's choices as defaults.

    Pydantic orders fields from the last base to the first, so forms and reports read data,
    near-copies, backbone and extraction, PCA, classifiers; PCA's method is accepted only as
    `pca_method`.
    """

    model_config = ConfigDict(validate_by_name=False)

    store: str = Field(DEFAULT_STORE, description="Feature store location (Zarr)")
    dask_address: str | None = Field(None, description="tcp://host:port of a Dask scheduler")
    workers: int = Field(1, ge=1, le=64, description="Local Dask worker processes")

    @field_validator("layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        return comma_list(value)

    @model_validator(mode="after")
    def _near_copies_group_a_grouped_split(self) -> PipelineSettings:
        """--group-by near-copies only makes sense for a grouped split, and as its only source
        of groups (a labels file's group column is checked once the table is read)."""
        if self.group_by == "near-copies":
            if self.split != "grouped":
                raise ValueError("--group-by near-copies needs --split grouped")
            try:
                group_source(False, self.group_regex, near_copies=True)
            except SplitError as error:
                raise ValueError(str(error)) from None
        return self

    def extract_settings(self) -> ExtractSettings:
        return stage_settings(self, ExtractSettings)

    def pca_settings(self) -> PcaSettings:
        return stage_settings(self, PcaSettings)


def read_config(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict (keys may use - or _)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(f"cannot read config file {path}: {error}") from error
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"config file {path} is not valid: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def load_settings(
    config: Path | None = None, model: type[BaseModel] = PipelineSettings, **flags: Any
) -> BaseModel:
    """Merge a config file with flags (flags win; None means 'not given') and validate."""
    values = read_config(config) if config else {}
    values.update({key: value for key, value in flags.items() if value is not None})
    try:
        return model(**values)
    except ValidationError as error:
        raise SettingsError(f"invalid settings: {_problems(error)}") from None


def _problems(error: ValidationError) -> str:
    """Each problem as `field: message`; our own checks' messages as written, without
    pydantic's "Value error, " prefix or a field name for whole-model checks."""
    problems = []
    for e in error.errors():
        message = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        field = ".".join(str(part) for part in e["loc"])
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)
