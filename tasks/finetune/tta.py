"""Test-time augmentation: every image seen in the 8 symmetries of the square, the model's
per-class scores averaged over them, then argmax.

A cell under a microscope has no up and no left, so the 8 turns and mirrors are as likely as
the original: averaging over them smooths out the orientation a model happened to learn.
The same views serve the frozen-feature and the fine-tuned prediction paths, and training's
random `dihedral` augmentation draws from them. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import numpy as np

VIEWS = 8  # 4 quarter turns, each mirrored or not
TTA_COLUMN = "tta_views"  # the predictions CSV's column saying how many views were averaged


def symmetries(images):
    """(batch, 8, h, w, c): each image turned by 0, 1, 2, 3 quarter turns, then those four
    mirrored left-right. Exact pixel moves: no interpolation, nothing filled in."""
    import tensorflow as tf

    turns = [tf.image.rot90(images, k) for k in range(4)]
    return tf.stack(turns + [tf.reverse(turn, axis=[2]) for turn in turns], axis=1)


def dihedral_views(images):
    """(batch x 8, h, w, c), image-major (image 0's 8 views, then image 1's...), so a model's
    outputs over any batching reshape to (images, 8, classes)."""
    import tensorflow as tf

    views = symmetries(images)
    return tf.reshape(views, tf.concat([[-1], tf.shape(views)[2:]], axis=0))


def mean_over_views(scores: np.ndarray) -> np.ndarray:
    """(images, classes): the scores of image-major views averaged per image."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores.reshape(-1, VIEWS, scores.shape[-1]).mean(axis=1)
