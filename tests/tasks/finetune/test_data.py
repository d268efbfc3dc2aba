"""Fine-tuning input: the tf.data pipeline decodes like extraction, augments training only, and
validation rows come from the dataset's own valid/ tree when it has one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.backbones.registry import get_spec, load_preprocess
from tasks.data.images import load_rgb
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.data import augmentation, image_dataset, validation_rows
from tasks.finetune.settings import FinetuneSettings
from tests.conftest import write_image


def test_pipeline_matches_extraction_decoding_and_augments_training_only(image_tree: Path) -> None:
    paths = sorted(image_tree.rglob("*.png"))[:4]
    preprocess = load_preprocess(get_spec("vgg16"))
    expected = preprocess(np.stack([load_rgb(p, 32) for p in paths]))

    plain = image_dataset(paths, [0, 0, 1, 1], 32, preprocess, batch_size=4)
    first, second = (next(iter(plain))[0].numpy() for _ in range(2))
    np.testing.assert_allclose(first, expected, atol=1e-4)
    np.testing.assert_array_equal(first, second)

    augmented = image_dataset(
        paths,
        [0, 0, 1, 1],
        32,
        preprocess,
        batch_size=4,
        augment=augmentation(FinetuneSettings(contrast=0.2)),
    )
    assert not np.allclose(next(iter(augmented))[0].numpy(), expected, atol=1e-2)
    assert (
        augmentation(FinetuneSettings(flip="none", rotation=0, zoom=0, translation=0, contrast=0))
        is None
    )


def test_validation_rows_prefer_the_valid_tree(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    train, _ = split_rows(manifest, "stratified", 0.25, seed=0)
    fit, val = validation_rows(manifest, train, 0.25, seed=0)
    assert sorted([*fit, *val]) == sorted(train) and not set(fit) & set(val)
    assert {manifest.records[i].label for i in val} == {"cats", "dogs"}

    for split, count in (("train", 4), ("valid", 2), ("test", 2)):
        for label, tint in (("a", 0), ("b", 120)):
            for i in range(count):
                write_image(tmp_path / "tree" / split / label / f"{i}.png", seed=i, tint=tint)
    folders = scan(tmp_path / "tree")
    train, _ = split_rows(folders, "auto", 0.25, seed=0)
    fit, val = validation_rows(folders, train, 0.25, seed=0)
    assert {folders.records[i].split for i in val} == {"valid"} and len(val) == 4
    assert {folders.records[i].split for i in fit} == {"train"}
