"""Scan a labelled image folder into a Manifest: which files, which class, which split.

The manifest key depends only on file contents, labels and splits, so renaming or moving files
keeps cached features valid while changing one pixel invalidates them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.errors import UserError
from tasks.images import IMAGE_EXTENSIONS, check_image

SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid",
               "test": "test"}
SPLIT_ORDER = ("all", "train", "valid", "test")


class DatasetError(UserError):
    """The folder cannot be used as a dataset; the message says how to fix it."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is (relative to the dataset root) and what it is."""

    path: str
    label: str
    split: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, with the reason shown in reports."""

    path: str
    reason: str


@dataclass
class Manifest:
    """The images of a dataset in a fixed, content-defined order."""

    root: str
    records: list[ImageRecord]
    class_names: list[str]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Content key: hash of the ordered (split, label, sha256) triples."""
        rows = [(r.split, r.label, r.sha256) for r in self.records]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]

    @property
    def labels(self) -> list[int]:
        """Label indices into class_names, one per record."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[r.label] for r in self.records]

    def to_dict(self) -> dict:
        """Plain JSON-able form, stored beside the features (readable without TensorFlow)."""
        return {"root": self.root, "class_names": self.class_names,
                "records": [asdict(r) for r in self.records],
                "skipped": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Inverse of to_dict."""
        return cls(root=data["root"], class_names=list(data["class_names"]),
                   records=[ImageRecord(**r) for r in data["records"]],
                   skipped=[Skipped(**s) for s in data.get("skipped", [])])


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_roots(root: Path) -> list[tuple[str, Path]]:
    """The (split, folder) pairs: train/valid/test sub-trees if present, else the root itself."""
    subdirs = _class_dirs(root)
    splits = [(SPLIT_NAMES[d.name.lower()], d) for d in subdirs if d.name.lower() in SPLIT_NAMES]
    if splits and len(splits) == len(subdirs):
        return splits
    return [("all", root)]


def _walk_files(class_dir: Path) -> list[Path]:
    """Every file below a class folder, nested folders included, without following links."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(class_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / name for name in sorted(files))
    return found


def _candidates(root: Path, skipped: list[Skipped]) -> dict[tuple[str, str], list[Path]]:
    """Image-looking files grouped by (split, label); other files go to skipped."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for split, split_root in _split_roots(root):
        for path in sorted(p for p in split_root.iterdir() if p.is_file()):
            skipped.append(Skipped(path.relative_to(root).as_posix(), "not inside a class folder"))
        for class_dir in _class_dirs(split_root):
            files = groups.setdefault((split, class_dir.name), [])
            for path in _walk_files(class_dir):
                rel = path.relative_to(root).as_posix()
                if path.name.startswith("."):
                    skipped.append(Skipped(rel, "hidden file"))
                elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                    reason = f"not an image extension ({path.suffix or 'none'})"
                    skipped.append(Skipped(rel, reason))
                elif path.is_symlink() and not path.exists():
                    skipped.append(Skipped(rel, "broken symbolic link"))
                else:
                    files.append(path)
    return groups


def scan(root: str | Path, limit_per_class: int | None = None,
         progress: Callable[[int], None] | None = None) -> Manifest:
    """Scan a class-per-subfolder tree (optionally with train/valid/test sub-trees).

    With limit_per_class, images are taken in sha256 order: a stable pseudo-random sample that
    does not depend on file names (blood-cell names cluster by source photo).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    skipped: list[Skipped] = []
    groups = _candidates(root, skipped)
    if not any(groups.values()):
        raise DatasetError(
            f"no images found in {root}: expected one sub-folder per class "
            "(optionally inside train/, valid/, test/) holding image files")
    records: list[ImageRecord] = []
    for (split, label), paths in sorted(groups.items(),
                                        key=lambda kv: (SPLIT_ORDER.index(kv[0][0]), kv[0][1])):
        hashed = sorted((file_sha256(p), p) for p in paths)
        kept = 0
        for digest, path in hashed:
            if limit_per_class is not None and kept >= limit_per_class:
                break
            rel = path.relative_to(root).as_posix()
            reason = check_image(path)
            if progress:
                progress(1)
            if reason:
                skipped.append(Skipped(rel, reason))
                continue
            records.append(ImageRecord(rel, label, split, path.stat().st_size, digest))
            kept += 1
    if not records:
        raise DatasetError(f"no readable images in {root} ({len(skipped)} files skipped)")
    class_names = sorted({r.label for r in records})
    return Manifest(root=str(root), records=records, class_names=class_names, skipped=skipped)
