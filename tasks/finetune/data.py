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
from tasks.data.splits import split_rows
from tasks.finetune.settings import FinetuneSettings

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
        tf.shape(images)[:1], seed=seed, minval=0, maxval=8, dtype=tf.int32
    )
    turns = tf.stack([tf.image.rot90(images, k) for k in range(4)], axis=1)
    turned = tf.gather(turns, draw % 4, axis=1, batch_dims=1)
    mirror = tf.reshape(draw >= 4, (-1, 1, 1, 1))
    return tf.where(mirror, tf.reverse(turned, axis=[2]), turned)


def augmentation(settings: FinetuneSettings) -> Augment | None:
    """The training batches' augmentation (settings.augment), or None when it is off.

    It runs inside tf.data on 0..255 images, before preprocess_input: RandomContrast clips
    to that range, so it must see the raw pixels, and validation/test pipelines skip it.
    """
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
):
    """A tf.data pipeline: (shuffle) -> batches read from the cache, or files decoded in
    parallel with Pillow -> (augment, seeded per batch) -> preprocess_input -> prefetch.
    Only paths or cache rows sit in memory, never the images."""
    import tensorflow as tf

    from tasks.data.images import load_rgb

    cached = isinstance(images, CachedImages)
    keys = images.rows if cached else [str(p) for p in images]
    columns = [tf.constant(np.asarray(keys))]
    if labels is not None:
        columns.append(tf.constant(np.asarray(labels, dtype=np.int32)))
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
    a seeded split of the training rows: grouped by `group_regex` when given (copies of one
    source image stay on one side, so early stopping is not fooled by near-duplicates), else
    stratified when the classes allow it."""
    train_rows = np.asarray(train_rows)
    splits = np.asarray([manifest.records[i].split for i in train_rows])
    if (splits == "valid").any():
        return train_rows[splits != "valid"], train_rows[splits == "valid"]
    if group_regex:
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
