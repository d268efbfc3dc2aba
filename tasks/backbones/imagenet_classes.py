"""ImageNet-1k class names, from a data file shipped with the project.

Why: Keras' ``decode_predictions`` downloads its class index, and no installed package carries
the table, so it lives in ``imagenet_classes.txt`` (one Keras-style name per line, line ``i`` is
class index ``i``; note the table's own duplicates "crane" and "maillot").
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

__all__ = ["NUM_IMAGENET_CLASSES", "imagenet_class_names"]

NUM_IMAGENET_CLASSES = 1000
_DATA_FILE = "imagenet_classes.txt"


@lru_cache(maxsize=1)
def _read_names() -> tuple[str, ...]:
    """Read the table once; a wrong line count means a damaged install, so fail loudly."""
    text = files(__package__).joinpath(_DATA_FILE).read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(f"{_DATA_FILE} has {len(names)} names, expected {NUM_IMAGENET_CLASSES}")
    return names


def imagenet_class_names() -> list[str]:
    """Return the 1000 ImageNet class names in the standard class-index order."""
    return list(_read_names())
