"""Fine-tuning input: tf.data pipelines over image files or the decoded-input cache,
augmentation, class weights and validation rows.

Images are decoded with the same Pillow code as extraction, so a fine-tuned model sees exactly
what the feature pipeline sees. TensorFlow is imported inside the functions that build
pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.classify.models import validation_split
from tasks.data.scan import Manifest
from tasks.data.splits import has_group_column, split_rows
from tasks.finetune.settings import FinetuneSettings
from tasks.finetune.tta import VIEWS, dihedral_views, symmetries

# augment(batch of 0..255 float images, stateless seed pair) -> batch of the same shape
Augment = Callable[..., object]


@dataclass(frozen=True)
class CachedImages:
    """Rows of a decoded-input cache (uint8, n x size x size x 3), read instead of files."""

    array: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def dihedral(images, seed):
    """Each image of the batch turned by a random multiple of 90 degrees, then mirrored or
    not: a uniform draw from the 8 symmetries of the square. Exact pixel moves (no
    interpolation, no corners filled in), which is all a cell's orientation can vary by."""
    import tensorflow as tf

    draw = tf.random.stateless_uniform(
        tf.shape(images)[:1], seed=seed, minval=0, maxval=VIEWS, dtype=tf.int32
    )
    return tf.gather(symmetries(images), draw, axis=1, batch_dims=1)


def colour_jitter(images, seed, settings: FinetuneSettings):
    """Each image's brightness, contrast, saturation and hue moved by its own random amount
    (uniform in +-the setting), on 0..255 pixels, clipped back into that range: stains and
    microscopes differ between photos, so the model must not learn one photo's tint.

    The draws come from the batch's stateless seed, so a resumed epoch replays them."""
    import tensorflow as tf

    n = tf.shape(images)[:1]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)

    def draw(index: int, amount: float):
        value = tf.random.stateless_uniform(n, seed=seeds[index], minval=-amount, maxval=amount)
        return tf.reshape(value, (-1, 1, 1, 1))

    out = images
    if settings.brightness_jitter:  # a shift of up to the fraction of the full range
        out = out + 255.0 * draw(0, settings.brightness_jitter)
    if settings.contrast_jitter:  # spread around each image's channel means
        mean = tf.reduce_mean(out, axis=[1, 2], keepdims=True)
        out = (out - mean) * (1.0 + draw(1, settings.contrast_jitter)) + mean
    if settings.saturation_jitter or settings.hue_jitter:
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(out, 0.0, 255.0) / 255.0)
        hue, saturation, value = tf.unstack(hsv, axis=-1)
        if settings.saturation_jitter:
            factor = 1.0 + draw(2, settings.saturation_jitter)[..., 0]
            saturation = tf.clip_by_value(saturation * factor, 0.0, 1.0)
        if settings.hue_jitter:  # a turn of the colour circle, a fraction of it
            hue = tf.math.floormod(hue + draw(3, settings.hue_jitter)[..., 0], 1.0)
        out = 255.0 * tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))
    return tf.clip_by_value(out, 0.0, 255.0)


def augmentation(settings: FinetuneSettings) -> Augment | None:
    """The training batches' augmentation: the geometric one (settings.augment) then the
    colour jitter, or None when both are off.

    It runs inside tf.data on 0..255 images, before preprocess_input: RandomContrast clips
    to that range, so it must see the raw pixels, and validation/test pipelines skip it.
    """
    geometric = _geometric(settings)
    if not settings.colour_jitter:
        return geometric

    def augment(images, seed):
        moved = images if geometric is None else geometric(images, seed)
        return colour_jitter(moved, seed, settings)

    return augment


def _geometric(settings: FinetuneSettings) -> Augment | None:
    """settings.augment as a batch function, or None."""
    if settings.augment == "dihedral":
        return dihedral
    if settings.augment == "none":
        return None
    import keras

    seed = settings.seed
    layers = []
    if settings.flip != "none":
        layers.append(keras.layers.RandomFlip(settings.flip, seed=seed))
    if settings.rotation:
        layers.append(keras.layers.RandomRotation(settings.rotation, seed=seed + 1))
    if settings.zoom:
        layers.append(keras.layers.RandomZoom(settings.zoom, seed=seed + 2))
    if settings.translation:
        layers.append(
            keras.layers.RandomTranslation(
                settings.translation, settings.translation, seed=seed + 3
            )
        )
    if settings.contrast:
        layers.append(keras.layers.RandomContrast(settings.contrast, seed=seed + 4))
    if not layers:
        return None
    affine = keras.Sequential(layers, name="augmentation")
    return lambda images, _seed: affine(images, training=True)


def image_dataset(
    images: Sequence[str | Path] | CachedImages,
    labels: Sequence[int] | None,
    image_size: int,
    preprocess: Callable,
    batch_size: int,
    *,
    augment: Augment | None = None,
    shuffle_seed: int | None = None,
    views: bool = False,
):
    """A tf.data pipeline: (shuffle) -> batches read from the cache, or files decoded in
    parallel with Pillow -> (augment, seeded per batch) -> preprocess_input -> prefetch.
    Only paths or cache rows sit in memory, never the images.

    `labels` are class indices, or one row of targets per image (label smoothing); none for
    prediction. `views`: each batch becomes its images' 8 dihedral views, image-major (for
    test-time augmentation; labels must then be None)."""
    import tensorflow as tf

    from tasks.data.images import load_rgb

    cached = isinstance(images, CachedImages)
    keys = images.rows if cached else [str(p) for p in images]
    columns = [tf.constant(np.asarray(keys))]
    if labels is not None:
        labels = np.asarray(labels)
        columns.append(tf.constant(labels.astype(np.int32 if labels.ndim == 1 else np.float32)))
    dataset = tf.data.Dataset.from_tensor_slices(tuple(columns))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(keys), seed=shuffle_seed, reshuffle_each_iteration=True)

    auto = tf.data.AUTOTUNE
    if cached:

        def read(rows, *rest):
            batch = tf.numpy_function(lambda r: images.array[r], [rows], tf.uint8)
            batch.set_shape((None, image_size, image_size, 3))
            return (tf.cast(batch, tf.float32), *rest)

        dataset = dataset.batch(batch_size).map(read, num_parallel_calls=auto)
    else:

        def decode(path, *rest):
            image = tf.numpy_function(
                lambda p: load_rgb(p.decode(), image_size), [path], tf.float32
            )
            image.set_shape((image_size, image_size, 3))
            return (image, *rest)

        dataset = dataset.map(decode, num_parallel_calls=auto).batch(batch_size)
    if augment is not None:
        seed = 0 if shuffle_seed is None else shuffle_seed
        dataset = dataset.enumerate().map(
            lambda i, batch: (
                augment(batch[0], tf.stack([tf.cast(seed, tf.int64), i])),
                *batch[1:],
            ),
            num_parallel_calls=auto,
        )
    if views:
        if labels is not None:
            raise ValueError("views multiply the images, not their labels: give labels=None")
        dataset = dataset.map(lambda x, *rest: (dihedral_views(x), *rest), num_parallel_calls=auto)
    dataset = dataset.map(lambda x, *rest: (preprocess(x), *rest), num_parallel_calls=auto)
    return dataset.prefetch(auto)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Keras class_weight for these training labels: n / (classes x count), so every class
    adds the same total weight to the loss; a class absent from training weighs 1."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    present = np.count_nonzero(counts)
    return {
        c: float(counts.sum() / (present * counts[c])) if counts[c] else 1.0
        for c in range(n_classes)
    }


def validation_rows(
    manifest: Manifest,
    train_rows: np.ndarray,
    fraction: float,
    seed: int,
    group_regex: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(fit_rows, val_rows): the dataset's own valid/ rows if the training rows hold any, else
    a seeded split of the training rows: grouped by the labels table's `group` column or by
    `group_regex` when given (copies of one source image stay on one side, so early stopping
    is not fooled by near-duplicates), else stratified when the classes allow it."""
    train_rows = np.asarray(train_rows)
    splits = np.asarray([manifest.records[i].split for i in train_rows])
    if (splits == "valid").any():
        return train_rows[splits != "valid"], train_rows[splits == "valid"]
    if group_regex or has_group_column(manifest):
        subset = Manifest(
            root=manifest.root,
            records=[manifest.records[i] for i in train_rows],
            class_names=manifest.class_names,
        )
        fit, val = split_rows(subset, "grouped", fraction, seed, group_regex)
        return train_rows[fit], train_rows[val]
    labels = np.asarray(manifest.labels)[train_rows]
    fit, val, _, _ = validation_split(train_rows, labels, fraction, seed)
    return np.sort(fit), np.sort(val)
