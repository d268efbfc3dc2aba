"""Fine-tuning input: the tf.data pipeline decodes like extraction (from files or the decoded-input
cache, identically), augments training only with exact turns and mirrors by default, weighs
classes by their counts, and takes validation rows from the dataset's valid/ tree, or grouped
by source image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.backbones.registry import get_spec, load_preprocess
from tasks.data.images import load_rgb
from tasks.data.labels import scan_labels
from tasks.data.scan import scan
from tasks.data.splits import split_rows
from tasks.finetune.cache import decoded_inputs
from tasks.finetune.data import (
    CachedImages,
    augmentation,
    class_weights,
    dihedral,
    image_dataset,
    validation_rows,
)
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
        augment=augmentation(FinetuneSettings(augment="affine", contrast=0.2)),
    )
    assert not np.allclose(next(iter(augmented))[0].numpy(), expected, atol=1e-2)
    assert augmentation(FinetuneSettings(augment="none")) is None
    affine_off = dict(flip="none", rotation=0, zoom=0, translation=0, contrast=0)
    assert augmentation(FinetuneSettings(augment="affine", **affine_off)) is None
    assert augmentation(FinetuneSettings()) is dihedral  # the default


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The 8 turns and mirrors of a square image, computed with numpy."""
    turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return turns + [np.flip(turn, axis=1) for turn in turns]


def test_dihedral_outputs_are_exact_turns_and_mirrors_of_their_inputs() -> None:
    images = np.random.default_rng(0).integers(0, 256, (16, 5, 5, 3)).astype(np.float32)
    seen: set[int] = set()
    for seed in range(4):
        out = np.asarray(dihedral(images, np.array([seed, 7])))
        for image, result in zip(images, out, strict=True):
            matches = [i for i, s in enumerate(_symmetries(image)) if np.array_equal(s, result)]
            assert len(matches) == 1  # exactly one of the 8 (a random image has no symmetry)
            seen.add(matches[0])
    assert seen == set(range(8))  # every symmetry is drawn, the identity included
    again = np.asarray(dihedral(images, np.array([3, 7])))
    np.testing.assert_array_equal(again, out)  # seeded: a resumed epoch replays its draws


def test_cached_inputs_read_like_the_files(image_tree: Path, tmp_path: Path) -> None:
    manifest = scan(image_tree)
    preprocess = load_preprocess(get_spec("vgg16"))
    rows = np.array([5, 0, 17, 3])
    cache = decoded_inputs(tmp_path / "cache", manifest, 16)
    assert cache.shape == (len(manifest.records), 16, 16, 3) and cache.dtype == np.uint8
    [stored] = list((tmp_path / "cache").iterdir())  # no partial file left behind
    labels = np.asarray(manifest.labels)[rows]
    from_files = image_dataset(manifest.paths(rows), labels, 16, preprocess, batch_size=4)
    from_cache = image_dataset(CachedImages(cache, rows), labels, 16, preprocess, batch_size=4)
    (x_files, y_files), (x_cache, y_cache) = next(iter(from_files)), next(iter(from_cache))
    np.testing.assert_array_equal(x_files.numpy(), x_cache.numpy())
    np.testing.assert_array_equal(y_files.numpy(), y_cache.numpy())

    modified = stored.stat().st_mtime_ns
    decoded_inputs(tmp_path / "cache", manifest, 16)  # a second run reads, never rewrites
    assert stored.stat().st_mtime_ns == modified
    decoded_inputs(tmp_path / "cache", manifest, 24)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # keyed by size too


def test_class_weights_give_every_class_the_same_total_weight() -> None:
    labels = np.array([0] * 30 + [1] * 10 + [3] * 20)
    weights = class_weights(labels, 4)
    assert weights[2] == 1.0  # absent from training
    totals = {c: weights[c] * np.count_nonzero(labels == c) for c in (0, 1, 3)}
    assert list(totals.values()) == pytest.approx([20.0, 20.0, 20.0])
    assert sum(totals.values()) == pytest.approx(len(labels))  # the mean weight stays 1


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


@pytest.mark.parametrize("groups_from", ["regex", "column"])
def test_grouped_validation_keeps_copies_of_one_source_on_one_side(
    tmp_path: Path, groups_from: str
) -> None:
    lines = ["path,label,group"]
    for label, tint in (("a", 0), ("b", 120)):
        for source in range(10):
            for copy in range(3):  # three augmented copies of each source image
                path = tmp_path / "cells" / label / f"_{source}_{copy}.png"
                write_image(path, seed=source * 10 + copy + tint, tint=tint)
                lines.append(f"{label}/_{source}_{copy}.png,{label},{label}{source}")
    regex = r"_(\d+)_" if groups_from == "regex" else None
    if groups_from == "column":
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        manifest = scan_labels(tmp_path / "cells", tmp_path / "labels.csv")
    else:
        manifest = scan(tmp_path / "cells")
    train, _ = split_rows(manifest, "grouped", 0.25, seed=0, group_regex=regex)
    fit, val = validation_rows(manifest, train, 0.2, seed=0, group_regex=regex)
    assert sorted([*fit, *val]) == sorted(train) and len(val)

    def sources(rows):
        return {(manifest.records[i].label, manifest.records[i].path.split("_")[1]) for i in rows}

    assert not sources(fit) & sources(val)
    assert {manifest.records[i].label for i in val} == {"a", "b"}


JITTERS = {
    "brightness_jitter": 0.1,
    "contrast_jitter": 0.2,
    "saturation_jitter": 0.3,
    "hue_jitter": 0.1,
}


@pytest.mark.parametrize("option", sorted(JITTERS))
def test_colour_jitter_changes_pixels_as_named_and_replays_its_seed(option: str) -> None:
    images = np.random.default_rng(1).integers(60, 190, (6, 8, 8, 3)).astype(np.float32)
    augment = augmentation(FinetuneSettings(augment="none", **{option: JITTERS[option]}))
    out = np.asarray(augment(images, np.array([0, 3])))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 255
    assert not np.allclose(out, images, atol=0.5)
    np.testing.assert_array_equal(out, np.asarray(augment(images, np.array([0, 3]))))
    assert not np.allclose(out, np.asarray(augment(images, np.array([0, 4]))), atol=0.5)
    if option == "brightness_jitter":  # one shift per image, a different one for each
        shifts = (out - images).reshape(len(images), -1)
        np.testing.assert_allclose(shifts, shifts[:, :1].repeat(shifts.shape[1], 1), atol=1e-3)
        assert len(np.unique(shifts[:, 0].round(3))) == len(images)
    elif option == "contrast_jitter":  # spread around each image's channel means
        np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-2)
    else:  # saturation and hue keep each pixel's value, max(r, g, b)
        np.testing.assert_allclose(out.max(axis=-1), images.max(axis=-1), atol=0.05)


def test_colour_jitter_off_leaves_pixels_and_on_follows_the_geometric_augmentation() -> None:
    off = {name: 0.0 for name in JITTERS}
    assert augmentation(FinetuneSettings(augment="none", **off)) is None
    assert augmentation(FinetuneSettings(augment="dihedral", **off)) is dihedral
    images = np.random.default_rng(2).integers(60, 190, (4, 8, 8, 3)).astype(np.float32)
    seed = np.array([5, 1])
    both = np.asarray(augmentation(FinetuneSettings(hue_jitter=0.2))(images, seed))
    turned = np.asarray(dihedral(images, seed))
    hue_only = augmentation(FinetuneSettings(augment="none", hue_jitter=0.2))
    np.testing.assert_allclose(both, np.asarray(hue_only(turned, seed)), atol=1e-4)


def test_label_smoothing_compiles_a_smoothed_loss() -> None:
    import keras

    from tasks.finetune.model import compile_model

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    compile_model(model, FinetuneSettings(), 1e-3)
    assert model.loss == "sparse_categorical_crossentropy"  # the default: as before
    compile_model(model, FinetuneSettings(label_smoothing=0.2), 1e-3)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.2)
    sure = model.loss(np.array([[1.0, 0.0]]), np.array([[0.999, 0.001]]))
    assert float(sure) > 0.5  # being sure is penalised: the target is (0.9, 0.1)
