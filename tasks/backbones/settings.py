"""The settings every stage that runs a backbone shares: which one, which weights, what size.

Extraction and fine-tuning both derive their settings from this model, and the flow settings
from theirs, so each field, default and constraint is declared once. The checks run at
validation: an unknown name or too small an input fails before any image is read.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.backbones.registry import check_input_size, get_spec


class BackboneSettings(BaseModel):
    """Backbone, weights, input size, batch size and seed (random init, splits, classifiers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field("vgg16", description="Registry name (see `featurepipe backbones ls`)")
    weights: str = Field("imagenet", description="imagenet, hed-vgg16, none, or a weights file")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="Square input size; None: the backbone's default"
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Images per backbone batch")
    seed: int = Field(0, description="Seed for random weights, splits, init and classifiers")

    @model_validator(mode="after")
    def _backbone_fits(self):
        spec = get_spec(self.backbone)
        if self.image_size is not None:
            check_input_size(spec, self.image_size)
        return self
