"""Scan a labelled image folder into a Manifest: which files, which class, which split.

The manifest key depends only on file contents, labels and splits, so renaming or moving files
keeps cached features valid while changing one pixel invalidates them.

A single bad file never stops a scan: it is listed in `Manifest.skipped` with a reason. Problems
of the dataset as a whole that only matter downstream (one class, tiny classes, duplicates,
train/test leaks) go to `Manifest.warnings`, because extraction alone still works; only a folder
without any usable image raises DatasetError.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.data.images import IMAGE_EXTENSIONS, check_image, is_url
from tasks.errors import UserError

SPLIT_NAMES = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "test": "test",
}
SPLIT_ORDER = ("all", "train", "valid", "test")
# The SVM grid search uses 3 stratified CV folds (tasks/classify/models.py):
# each class needs 3 images.
MIN_PER_CLASS = 3
# Folders that archive tools add and that never hold a class (macOS zips add __MACOSX).
IGNORED_FOLDERS = frozenset({"__MACOSX"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")


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
    group: str | None = None  # from a labels table's `group` column: one source photo, say


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, with the reason shown in reports."""

    path: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """Records with identical content: ambiguous across classes, a test leak across splits."""

    sha256: str
    paths: list[str]


@dataclass
class Manifest:
    """The images of a dataset in a fixed, content-defined order."""

    root: str
    records: list[ImageRecord]
    class_names: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Content key: hash of the ordered (split, label, sha256) triples, with each record's
        group when a labels table gave groups (without one, keys made before groups existed
        stay the same, and so do the cached features found by them)."""
        rows: list[tuple[str, ...]] = [(r.split, r.label, r.sha256) for r in self.records]
        if any(r.group is not None for r in self.records):
            rows = [(*row, r.group or "") for row, r in zip(rows, self.records, strict=True)]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]

    @property
    def labels(self) -> list[int]:
        """Label indices into class_names, one per record."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[r.label] for r in self.records]

    def paths(self, rows: Iterable[int] | None = None) -> list[Path | str]:
        """Absolute paths of the records (all, or the given rows; URLs for a dataset in object
        storage), refusing any record path that would leave the dataset root: manifests are
        read back from stores and configs."""
        root = Path(self.root)
        chosen = self.records if rows is None else [self.records[i] for i in rows]
        paths: list[Path | str] = []
        for record in chosen:
            if Path(record.path).is_absolute() or ".." in Path(record.path).parts:
                raise DatasetError(f"manifest path {record.path!r} escapes {self.root}")
            remote = is_url(self.root)
            paths.append(f"{self.root.rstrip('/')}/{record.path}" if remote else root / record.path)
        return paths

    def to_dict(self) -> dict:
        """Plain JSON-able form, stored beside the features (readable without TensorFlow)."""
        return {
            "root": self.root,
            "class_names": self.class_names,
            "records": [_record_dict(r) for r in self.records],
            "skipped": [asdict(s) for s in self.skipped],
            "warnings": list(self.warnings),
            "duplicates": [asdict(d) for d in self.duplicates],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Inverse of to_dict; manifests stored before warnings/duplicates existed load too."""
        return cls(
            root=data["root"],
            class_names=list(data["class_names"]),
            records=[ImageRecord(**r) for r in data["records"]],
            skipped=[Skipped(**s) for s in data.get("skipped", [])],
            warnings=list(data.get("warnings", [])),
            duplicates=[
                Duplicate(d["sha256"], list(d["paths"])) for d in data.get("duplicates", [])
            ],
        )


def _record_dict(record: ImageRecord) -> dict:
    """A record as stored: without `group` when it has none, as before groups existed."""
    data = asdict(record)
    if data["group"] is None:
        del data["group"]
    return data


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _display(path: Path, root: Path) -> str:
    """Path relative to the root, printable and JSON-safe: undecodable bytes become \\xNN."""
    return os.fsencode(path.relative_to(root).as_posix()).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    """Linux names are bytes; non-UTF-8 ones decode to surrogates that reports cannot write."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _os_reason(error: OSError) -> str:
    """A user-readable reason for an I/O failure on one file or folder."""
    if error.errno == errno.ENOENT:
        return "file disappeared during the scan"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "cannot read: permission denied"
    return f"cannot read: {error.strerror or error}"


def _unusable_name(path: Path, is_folder: bool) -> str | None:
    """Why an entry is left out because of its name alone (hidden, archive junk, not UTF-8)."""
    what = "folder (not scanned)" if is_folder else "file"
    if path.name.startswith("."):
        return f"hidden {what}"
    if is_folder and path.name in IGNORED_FOLDERS:
        return "macOS archive metadata folder (not scanned)"
    if not _is_utf8(path.name):
        return f"{'folder' if is_folder else 'file'} name is not valid UTF-8: rename it"
    return None


Folder = tuple[Path, frozenset[tuple[int, int]]]  # a folder and the ids of it and its parents


def _stat(path: Path) -> os.stat_result | str:
    """The stat of what a path points to, or why it cannot be followed (broken link, loop)."""
    try:
        return path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        return _os_reason(error)


def _list_folder(
    folder: Folder, root: Path, skipped: list[Skipped]
) -> tuple[list[Folder], list[Path]]:
    """Sub-folders to descend into and other entries, in name order; the rest is skipped.

    Folder links are followed (datasets are often assembled with `ln -s`), except those that
    point back to an enclosing folder, which would loop forever.
    """
    path, ancestors = folder
    try:
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as error:
        skipped.append(Skipped(_display(path, root), f"{_os_reason(error)} (folder not scanned)"))
        return [], []
    folders: list[Folder] = []
    files: list[Path] = []
    for entry in entries:
        entry_path = Path(entry.path)
        try:
            is_folder = entry.is_dir()
        except OSError:  # a link loop: _stat below names it
            is_folder = False
        reason = _unusable_name(entry_path, is_folder)
        info = _stat(entry_path) if reason is None else reason
        if isinstance(info, str):
            skipped.append(Skipped(_display(entry_path, root), info))
        elif stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in ancestors:
                skipped.append(
                    Skipped(
                        _display(entry_path, root),
                        "symbolic link loop (points back to an enclosing folder)",
                    )
                )
            else:
                folders.append((entry_path, ancestors | {(info.st_dev, info.st_ino)}))
        elif stat.S_ISREG(info.st_mode):
            files.append(entry_path)
        else:
            skipped.append(
                Skipped(_display(entry_path, root), "not a regular file (a device, pipe or socket)")
            )
    return folders, files


def _walk_files(class_dir: Folder, root: Path, skipped: list[Skipped]) -> list[Path]:
    """Every image file below a class folder, nested folders included."""
    found: list[Path] = []
    stack = [class_dir]
    while stack:
        folders, files = _list_folder(stack.pop(), root, skipped)
        stack.extend(reversed(folders))
        for path in files:
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                reason = f"not an image extension ({path.suffix or 'none'})"
                skipped.append(Skipped(_display(path, root), reason))
    return found


def _top_folders(folder: Folder, root: Path, skipped: list[Skipped]) -> tuple[list[Folder], int]:
    """Sub-folders of the dataset or of a split, and how many image files lie beside them.

    Files there belong to no class and are skipped; the count feeds the "no images" hint.
    """
    folders, files = _list_folder(folder, root, skipped)
    for path in files:
        skipped.append(Skipped(_display(path, root), "not inside a class folder"))
    return folders, sum(path.suffix.lower() in IMAGE_EXTENSIONS for path in files)


def uses_splits(top_folders: list[str], warnings: list[str]) -> bool:
    """Whether the top-level folders are train/valid/test sub-trees (all of them must be);
    split folders beside other folders are classes, with a warning saying so."""
    splits = [name for name in top_folders if name.lower() in SPLIT_NAMES]
    if splits and len(splits) < len(top_folders):
        others = [name for name in top_folders if name.lower() not in SPLIT_NAMES]
        warnings.append(
            f"split folders ({', '.join(splits)}) sit beside other folders "
            f"({', '.join(others)}): every top-level folder is treated as a class; move all "
            "classes inside train/, valid/ and test/ to use the splits"
        )
    return bool(splits) and len(splits) == len(top_folders)


def _class_folders(
    root: Path, skipped: list[Skipped], warnings: list[str]
) -> tuple[list[tuple[str, Folder]], int]:
    """(split, class folder) pairs and the number of image files outside any class folder.

    train/valid/test sub-trees are used only when the root holds nothing else, so a flat
    dataset may still have a class named "test".
    """
    info = root.stat()
    subdirs, stray = _top_folders((root, frozenset({(info.st_dev, info.st_ino)})), root, skipped)
    if not uses_splits([d[0].name for d in subdirs], warnings):
        return [("all", d) for d in subdirs], stray
    splits = [(SPLIT_NAMES[d[0].name.lower()], d) for d in subdirs]
    pairs: list[tuple[str, Folder]] = []
    for split, split_dir in splits:
        class_dirs, split_stray = _top_folders(split_dir, root, skipped)
        pairs.extend((split, d) for d in class_dirs)
        stray += split_stray
    return pairs, stray


def _check_root(root: Path) -> None:
    """Fail early, with the fix, when the root is not a folder at all."""
    if root.is_dir():
        return
    if root.is_file():
        hint = (
            " (extract the archive first)" if root.name.lower().endswith(ARCHIVE_SUFFIXES) else ""
        )
        raise DatasetError(f"dataset folder is a file, not a folder: {root}{hint}")
    raise DatasetError(f"dataset folder not found: {root}")


def _hash_all(paths: list[Path], root: Path, skipped: list[Skipped]) -> list[tuple[str, Path]]:
    """(sha256, path) pairs in content order; files that cannot be read are skipped."""
    hashed: list[tuple[str, Path]] = []
    for path in paths:
        try:
            hashed.append((file_sha256(path), path))
        except OSError as error:
            skipped.append(Skipped(_display(path, root), _os_reason(error)))
    return sorted(hashed)


def _drop_untrained_classes(
    records: list[ImageRecord], skipped: list[Skipped]
) -> list[ImageRecord]:
    """Test images of a class that has no training images cannot be predicted: skip them."""
    trained = {r.label for r in records if r.split != "test"}
    if not trained:
        return records
    kept: list[ImageRecord] = []
    for record in records:
        if record.split != "test" or record.label in trained:
            kept.append(record)
            continue
        close = difflib.get_close_matches(record.label, sorted(trained), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        skipped.append(
            Skipped(
                record.path,
                f"class {record.label!r} has no training images (not in train/ or valid/){hint}",
            )
        )
    return kept


def _find_duplicates(records: list[ImageRecord]) -> list[Duplicate]:
    """Groups of records with the same content, in record order."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_hash[record.sha256].append(record.path)
    return [Duplicate(digest, paths) for digest, paths in by_hash.items() if len(paths) > 1]


def _examples(items: list[str], limit: int = 3) -> str:
    """A short, bounded list for one warning line."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _dataset_warnings(records: list[ImageRecord], duplicates: list[Duplicate]) -> list[str]:
    """What will go wrong downstream (classification, evaluation), said at scan time."""
    found: list[str] = []
    labels = sorted({r.label for r in records})
    if len(labels) == 1:
        found.append(
            f"only one class ({labels[0]!r}): features can be extracted, but "
            "classifiers need at least 2 classes"
        )
    training = Counter(r.label for r in records if r.split != "test")
    small = [f"{name!r} ({training[name]})" for name in labels if training[name] < MIN_PER_CLASS]
    if small:
        found.append(
            f"classes with fewer than {MIN_PER_CLASS} training images: "
            f"{_examples(small, 10)}; the SVM's {MIN_PER_CLASS}-fold cross-validation "
            "needs more: add images or remove these classes"
        )
    tested = {r.label for r in records if r.split == "test"}
    if tested and set(labels) - tested:
        untested = [repr(name) for name in labels if name not in tested]
        found.append(
            f"classes without test images: {_examples(untested, 10)}; their accuracy "
            "cannot be measured"
        )
    by_path = {r.path: r for r in records}
    mixed = [
        " = ".join(d.paths) for d in duplicates if len({by_path[p].label for p in d.paths}) > 1
    ]
    if mixed:
        found.append(
            f"{len(mixed)} identical images appear under different classes (their "
            f"label is ambiguous; see duplicates): {_examples(mixed)}"
        )
    leaked = [
        " = ".join(d.paths)
        for d in duplicates
        if len(splits := {by_path[p].split for p in d.paths}) > 1 and "test" in splits
    ]
    if leaked:
        found.append(
            f"{len(leaked)} identical images are in both the training and the test "
            f"split, which inflates test accuracy: {_examples(leaked)}"
        )
    return found


def _no_images_error(
    root: Path, skipped: list[Skipped], stray: int, any_candidates: bool
) -> DatasetError:
    """The error for a folder without one usable image, naming the most common causes."""
    if not any_candidates:
        hint = (
            (
                f"; found {stray} image files directly in the folder: move them into one "
                "sub-folder per class"
            )
            if stray
            else ""
        )
        return DatasetError(
            f"no images found in {root}: expected one sub-folder per class "
            f"(optionally inside train/, valid/, test/) holding image files{hint}"
        )
    common = Counter(s.reason for s in skipped).most_common(3)
    reasons = "; ".join(f"{count} x {reason}" for reason, count in common)
    return DatasetError(f"no readable images in {root} ({len(skipped)} files skipped: {reasons})")


def scan(
    root: str | Path,
    limit_per_class: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Scan a class-per-subfolder tree (optionally with train/valid/test sub-trees).

    With limit_per_class, images are taken in sha256 order: a stable pseudo-random sample that
    does not depend on file names (blood-cell names cluster by source photo).
    """
    if is_url(root):  # s3://bucket/prefix or any fsspec URL: same layout, read remotely
        from tasks.data.remote import scan_url

        return scan_url(str(root), limit_per_class, progress)
    root = Path(root).expanduser().resolve()
    _check_root(root)
    skipped: list[Skipped] = []
    warnings: list[str] = []
    class_folders, stray = _class_folders(root, skipped, warnings)
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for split, class_dir in class_folders:
        groups[(split, class_dir[0].name)].extend(_walk_files(class_dir, root, skipped))
    if not any(groups.values()):
        raise _no_images_error(root, skipped, stray, any_candidates=False)
    records = grouped_records(groups, root, skipped, limit_per_class, progress)
    if not records:
        raise _no_images_error(root, skipped, stray, any_candidates=True)
    return finish_manifest(root, records, skipped, warnings)


def grouped_records(
    groups: dict[tuple[str, str], list[Path]],
    root: Path,
    skipped: list[Skipped],
    limit_per_class: int | None = None,
    progress: Callable[[int], None] | None = None,
    group_of: Mapping[Path, str] | None = None,
) -> list[ImageRecord]:
    """Records of (split, label) -> files groups in manifest order (split, label, sha256), so
    the key depends on contents only, whatever listed the files (class folders or a CSV).
    `group_of` gives each file's group (a labels table's `group` column)."""
    records: list[ImageRecord] = []
    for (split, label), paths in sorted(
        groups.items(), key=lambda kv: (SPLIT_ORDER.index(kv[0][0]), kv[0][1])
    ):
        kept = 0
        for digest, path in _hash_all(paths, root, skipped):
            if limit_per_class is not None and kept >= limit_per_class:
                break
            rel = _display(path, root)
            reason = check_image(path)
            if progress:
                progress(1)
            if reason is None:
                try:
                    size = path.stat().st_size
                except OSError as error:
                    reason = _os_reason(error)
            if reason:
                skipped.append(Skipped(rel, reason))
                continue
            group = group_of.get(path) if group_of is not None else None
            records.append(ImageRecord(rel, label, split, size, digest, group))
            kept += 1
    return _drop_untrained_classes(records, skipped)


def finish_manifest(
    root: Path, records: list[ImageRecord], skipped: list[Skipped], warnings: list[str]
) -> Manifest:
    """The manifest of scanned records, with duplicates and dataset-level warnings."""
    duplicates = _find_duplicates(records)
    return Manifest(
        root=str(root),
        records=records,
        class_names=sorted({r.label for r in records}),
        skipped=skipped,
        warnings=warnings + _dataset_warnings(records, duplicates),
        duplicates=duplicates,
    )
