"""Fine-tuning works for every backbone in the registry, whatever its base ends with (a feature
map, or a pooled vector like Lite0's): every backbone builds its model and classifies a batch;
one of each kind trains a tiny epoch end to end (random weights, smallest input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.registry import BACKBONES
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.model import build_finetune_model
from tasks.finetune.settings import FinetuneSettings, resolved
from tasks.finetune.training import run_finetune
from tests.conftest import write_image


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes x 4 images: 4 to fit, 2 to validate, 2 to test."""
    root = tmp_path_factory.mktemp("few") / "images"
    for label, tint in (("a", 0), ("b", 120)):
        for i in range(4):
            write_image(root / label / f"{i}.png", seed=10 * tint + i, tint=tint)
    return root


def _tiny(name: str) -> FinetuneSettings:
    spec = BACKBONES[name]
    return FinetuneSettings(
        backbone=name,
        weights="none",
        image_size=spec.min_size,
        head=(4,),
        phase1_epochs=0,  # straight to phase 2: the head and the last base layers both train
        phase2_epochs=1,
        unfreeze_last=2,
        batch_size=8,
        validation_fraction=0.34,
        flip="none",
        rotation=0,
        zoom=0,
        translation=0,
        contrast=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_a_model_that_classifies(name: str) -> None:
    settings = resolved(_tiny(name))
    model = build_finetune_model(settings, n_classes=3)
    images = np.random.default_rng(0).uniform(
        0, 255, (2, settings.image_size, settings.image_size, 3)
    )
    scores = np.asarray(model(images.astype("float32")))
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "efficientnet-lite0"])  # a feature map; a pooled vector
def test_feature_map_and_pooled_bases_fine_tune(
    name: str, few_images: Path, tmp_path: Path
) -> None:
    settings = _tiny(name)
    manifest = scan(few_images)
    train, test = split_rows(manifest, "stratified", 0.25, seed=0)
    report = run_finetune(manifest, train, test, settings, tmp_path / "run")
    entry = report.classifiers["finetune"]
    assert entry.best_params["epochs_run"] == 1
    assert sum(map(sum, entry.confusion)) == len(test) == 2  # the best checkpoint predicted
