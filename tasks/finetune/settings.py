"""What decides a fine-tuned model: the backbone settings plus head, phases and augmentation.

Declared once, with every constraint, for Python callers and the flow's settings alike.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tasks.backbones.precision import PRECISIONS
from tasks.backbones.registry import get_spec
from tasks.backbones.settings import BackboneSettings
from tasks.errors import UserError

# the classifier name of a fine-tuned model in report.json, beside svm, logreg, ...; here, not
# in training.py, so that predict can recognise such a run without importing TensorFlow
MODEL_NAME = "finetune"

OPTIMIZERS = ("adam", "adamw", "nadam", "rmsprop", "sgd")
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")
AUGMENTATIONS = ("dihedral", "affine", "none")
CLASS_WEIGHTS = ("balanced", "none")


class FinetuneError(UserError):
    """Fine-tuning cannot start or resume with these settings; the message says why."""


class FinetuneSettings(BackboneSettings):
    """Everything that decides the fine-tuned model (data selection is the caller's)."""

    head: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (512, 64), description="Dense(relu) widths on the pooled base output"
    )
    dropout: float = Field(0.3, ge=0.0, lt=1.0, description="After every hidden Dense layer")
    batch_norm: bool = Field(
        False,
        description="BatchNormalization after pooling: VGG-style pooled features are "
        "unnormalised (hed-vgg16 reaches ~190) and can stall the ReLU head",
    )
    optimizer: Literal[OPTIMIZERS] = "adam"
    phase1_epochs: int = Field(10, ge=0, description="Epochs with the base frozen")
    phase1_learning_rate: float = Field(1e-3, gt=0.0)
    phase2_epochs: int = Field(10, ge=0, description="Epochs with the top of the base trained")
    phase2_learning_rate: float = Field(
        1e-4, gt=0.0, description="The rate of every measured full-data run (README)"
    )
    unfreeze_last: int = Field(4, ge=0, description="Base layers trained in phase 2")
    unfreeze_from: str | None = Field(
        None, description="Or: train every layer from this one (wins if given)"
    )
    patience: int = Field(
        5, ge=1, description="Early stopping on val_loss, per phase; the best weights are kept"
    )
    class_weight: Literal[CLASS_WEIGHTS] = Field(
        "balanced",
        description="balanced: each class weighs n / (classes x its count) in the loss, so a "
        "rare class counts as much as a common one; none: every image weighs 1",
    )
    precision: Literal[PRECISIONS] = Field(
        "float32",
        description="Training compute precision: bfloat16 or float16 run the layers in 16 bits "
        "with float32 weights and a float32 softmax (Keras mixed precision; float16 adds loss "
        "scaling). float32 by default: the accuracy of 16-bit training is not measured yet, "
        "and its speed depends on the backbone (benchmarks/README.md)",
    )
    cache_inputs: bool = Field(
        True,
        description="Decode and resize every image once into a uint8 array beside the runs "
        "(keyed by dataset and size) and read that in every epoch and run",
    )
    validation_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Of the training rows, when there is no valid/ tree"
    )
    augment: Literal[AUGMENTATIONS] = Field(
        "dihedral",
        description="dihedral: each training image turned by a random multiple of 90 degrees "
        "and mirrored or not (exact, lossless; for images without an up or a left, such as "
        "cells under a microscope); affine: the flip, rotation, zoom, translation and "
        "contrast settings; none",
    )
    flip: Literal[FLIP_MODES] = Field("horizontal", description="augment=affine only")
    rotation: float = Field(
        0.05, ge=0.0, le=1.0, description="augment=affine: fraction of a full turn; 0: off"
    )
    zoom: float = Field(0.1, ge=0.0, lt=1.0, description="augment=affine only")
    translation: float = Field(0.1, ge=0.0, lt=1.0, description="augment=affine only")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="augment=affine only")
    brightness_jitter: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Colour jitter, with any augment: each training image's pixels shifted by "
        "up to this fraction of the full range; 0: off",
    )
    contrast_jitter: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Colour jitter: each training image's spread around its channel means "
        "scaled by 1 +- up to this; 0: off",
    )
    saturation_jitter: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Colour jitter: each training image's saturation scaled by 1 +- up to "
        "this; 0: off",
    )
    hue_jitter: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Colour jitter: each training image's hue turned by up to this fraction of "
        "the colour circle (stains differ between photos); 0: off",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Training targets 1 - s + s/classes for the true class and s/classes for "
        "the others (categorical cross-entropy on one-hot targets); 0: off, hard labels",
    )
    tta: bool = Field(
        False,
        description="Evaluate the test rows with test-time augmentation: each image's 8 "
        "dihedral views, the softmax averaged (8x the prediction time); training is unchanged",
    )

    @property
    def colour_jitter(self) -> bool:
        return bool(
            self.brightness_jitter
            or self.contrast_jitter
            or self.saturation_jitter
            or self.hue_jitter
        )

    @model_validator(mode="after")
    def _trains(self):
        if self.phase1_epochs + self.phase2_epochs == 0:
            raise ValueError("at least one epoch is needed (phase1_epochs + phase2_epochs)")
        return self


def resolved(settings: FinetuneSettings) -> FinetuneSettings:
    """Settings with the image size filled in, as stored in state and report."""
    spec = get_spec(settings.backbone)
    size = settings.image_size or spec.default_size
    return settings.model_copy(update={"backbone": spec.name, "image_size": size})
