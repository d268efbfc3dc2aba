"""Scan the images to predict: a flat folder (no labels), or a labelled dataset whose true
labels are kept beside the predictions.

Prediction takes what users have at hand, so unlike a training scan it needs no class folders.
"""

from __future__ import annotations

from pathlib import Path

from tasks.data.images import IMAGE_EXTENSIONS, check_image, is_url
from tasks.data.labels import scan_labels
from tasks.data.scan import DatasetError, ImageRecord, Manifest, Skipped, file_sha256, scan

UNLABELLED = "?"


def scan_unlabelled(folder: Path) -> Manifest:
    """Every image file directly in `folder` (no class sub-folders needed), label '?'."""
    records, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(Skipped(path.name, f"not an image extension ({path.suffix or 'none'})"))
            continue
        reason = check_image(path)
        if reason:
            skipped.append(Skipped(path.name, reason))
            continue
        records.append(
            ImageRecord(path.name, UNLABELLED, "all", path.stat().st_size, file_sha256(path))
        )
    if not records:
        raise DatasetError(f"no readable images in {folder}")
    return Manifest(str(folder.resolve()), records, [UNLABELLED], skipped)


def scan_for_prediction(folder: str | Path, labels: Path | None = None) -> Manifest:
    """True labels, kept beside the predictions, come from a labels CSV when given, else from
    class sub-folders when present; a flat folder's images are unlabelled."""
    if labels is not None:
        return scan_labels(folder, labels)
    if is_url(folder):  # object storage: a labelled tree (class folders), read remotely
        return scan(folder)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"folder not found: {folder}")
    has_images_here = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
    return scan_unlabelled(folder) if has_images_here else scan(folder)
