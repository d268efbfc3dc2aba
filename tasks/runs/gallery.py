"""The misclassified-images gallery: the test images a classifier got wrong, most sure first.

Confident mistakes are the ones worth looking at (a mislabelled image, a class that looks like
another); a near-tie says little. The gallery is capped so it stays a small picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.data.images import ImageError, load_rgb
from tasks.runs.plots import gallery_png

GALLERY_CAP = 24
THUMBNAIL_PX = 96


def predicted_scores(y_pred: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's score for the class it was assigned: a probability, or the SVM's decision
    value (then only comparable within one classifier)."""
    y_pred = np.asarray(y_pred, dtype=int)
    return np.asarray(scores, dtype=float)[np.arange(len(y_pred)), y_pred]


def mistakes_by_confidence(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """Indices of the wrong predictions, highest predicted-class score first."""
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))
    confidence = predicted_scores(y_pred, scores)[wrong]
    return wrong[np.argsort(-confidence, kind="stable")]


def _short(name: str, limit: int = 12) -> str:
    """Class names cut to fit under a thumbnail (the CSV keeps them whole)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        return load_rgb(path, THUMBNAIL_PX).astype(np.uint8)
    except ImageError:  # moved or deleted since the run's scan: shown as a grey box
        return None


def write_gallery(
    path: Path,
    mistakes: np.ndarray,
    image_paths: Sequence[Path],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    class_names: list[str],
    cap: int = GALLERY_CAP,
) -> Path | None:
    """Gallery PNG of the first `cap` mistakes (thumbnail, true -> predicted, score); None when
    there are none. `mistakes` come in the order to show, see mistakes_by_confidence."""
    chosen = mistakes[:cap]
    if not len(chosen):
        return None
    captions = [
        f"{_short(class_names[y_true[i]])}\n-> {_short(class_names[y_pred[i]])} {confidence[i]:.2f}"
        for i in chosen
    ]
    return gallery_png([_thumbnail(Path(image_paths[i])) for i in chosen], captions, path)
