"""One validated settings model for every flow and command, from flags and/or a YAML/TOML file.

Pydantic gives users precise messages for bad values and gives the Prefect UI a typed form.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.backbones.registry import check_input_size, get_spec
from tasks.errors import UserError
from tasks.features.extract import ExtractSettings
from tasks.reduce.stage import PcaSettings


class SettingsError(UserError):
    """Invalid settings; the message lists every problem in user terms."""


class BackboneChoice(BaseModel):
    """Checks shared by every settings model that names a backbone: an unknown name or too
    small an input fails at validation, before Prefect starts or any image is read."""

    @model_validator(mode="after")
    def _backbone_fits(self):
        spec = get_spec(self.backbone)
        if self.image_size is not None:
            check_input_size(spec, self.image_size)
        return self


class PipelineSettings(BackboneChoice):
    """Every knob of a featurepipe run, with the original notebook's choices as defaults."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(
        None,
        description="Image folder: one sub-folder per class "
        "(optionally inside train/ valid/ test/)",
    )
    store: str = Field("featurepipe-store", description="Feature store location (Zarr)")
    runs: Path = Field(Path("runs"), description="Folder that receives one folder per run")
    backbone: str = "vgg16"
    weights: str = Field("imagenet", description="imagenet, hed-vgg16, none, or a weights file")
    layers: list[str] = Field(default_factory=list, description="Cut layers; empty = default")
    image_size: int | None = Field(None, ge=8, le=1024)
    pooling: Literal["avg", "max"] | None = None
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = Field(16, ge=1, le=1024)
    limit_per_class: int | None = Field(None, ge=1)
    variance: float = Field(0.8, gt=0.0, le=1.0, description="PCA variance target")
    components: int | None = Field(
        None, ge=1, description="Fixed number of PCA components (instead of the variance target)"
    )
    pca_method: Literal["gram", "randomized", "incremental"] = "gram"
    classifiers: list[str] = Field(default_factory=lambda: ["svm", "logreg"])
    classifier_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per classifier, e.g. {svm: {param_grid: {C: [1, 10]}}}"
    )
    split: Literal["auto", "stratified", "grouped", "folder"] = "auto"
    test_size: float = Field(0.25, gt=0.0, lt=1.0)
    group_regex: str | None = None
    seed: int = 0
    dask_address: str | None = Field(None, description="tcp://host:port of a Dask scheduler")
    workers: int = Field(1, ge=1, le=64, description="Local Dask worker processes")

    @field_validator("layers", "classifiers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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

    def pca_settings(self) -> PcaSettings:
        return PcaSettings(self.pca_method, self.variance, self.components)

    def extract_settings(self) -> ExtractSettings:
        return ExtractSettings(
            backbone=self.backbone,
            weights=self.weights,
            layers=tuple(self.layers),
            image_size=self.image_size,
            pooling=self.pooling,
            dtype=self.dtype,
            batch_size=self.batch_size,
            seed=self.seed,
        )


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
