"""Fine-tuning input: tf.data pipelines streamed from image files, augmentation, validation rows.

Images are decoded with the same Pillow code as extraction, so the dataset is never held in
memory and a fine-tuned model sees exactly what the feature pipeline sees. TensorFlow is
imported inside the functions that build pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tasks.classify.models import validation_split
from tasks.data.scan import Manifest
from tasks.finetune.settings import FinetuneSettings


def augmentation(settings: FinetuneSettings):
    """Keras preprocessing layers for the training batches, or None when all are off.

    They run inside tf.data on 0..255 images, before preprocess_input: RandomContrast clips
    to that range, so it must see the raw pixels, and validation/test pipelines skip it.
    """
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
    return keras.Sequential(layers, name="augmentation") if layers else None


def image_dataset(
    paths: Sequence[str | Path],
    labels: Sequence[int] | None,
    image_size: int,
    preprocess: Callable,
    batch_size: int,
    *,
    augment=None,
    shuffle_seed: int | None = None,
):
    """A tf.data pipeline from files: (shuffle paths) -> parallel Pillow decode -> batch ->
    (augment) -> preprocess_input -> prefetch. Only paths sit in memory, never the images."""
    import tensorflow as tf

    from tasks.data.images import load_rgb

    columns = [tf.constant([str(p) for p in paths])]
    if labels is not None:
        columns.append(tf.constant(np.asarray(labels, dtype=np.int32)))
    dataset = tf.data.Dataset.from_tensor_slices(tuple(columns))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(path, *rest):
        image = tf.py_function(
            lambda p: load_rgb(p.numpy().decode(), image_size), [path], tf.float32
        )
        image.set_shape((image_size, image_size, 3))
        return (image, *rest)

    auto = tf.data.AUTOTUNE
    dataset = dataset.map(decode, num_parallel_calls=auto).batch(batch_size)
    if augment is not None:
        dataset = dataset.map(
            lambda x, *rest: (augment(x, training=True), *rest), num_parallel_calls=auto
        )
    dataset = dataset.map(lambda x, *rest: (preprocess(x), *rest), num_parallel_calls=auto)
    return dataset.prefetch(auto)


def validation_rows(
    manifest: Manifest, train_rows: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit_rows, val_rows): the dataset's own valid/ rows if the training rows hold any,
    else a seeded split of the training rows, stratified when the classes allow it."""
    train_rows = np.asarray(train_rows)
    splits = np.asarray([manifest.records[i].split for i in train_rows])
    if (splits == "valid").any():
        return train_rows[splits != "valid"], train_rows[splits == "valid"]
    labels = np.asarray(manifest.labels)[train_rows]
    fit, val, _, _ = validation_split(train_rows, labels, fraction, seed)
    return np.sort(fit), np.sort(val)
