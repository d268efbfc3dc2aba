"""Scan a labelled image tree in object storage (s3://bucket/prefix, any fsspec URL).

Same layout, content hashes, skip reasons and manifest key as a local folder, so features
cached for a local copy of the images are reused for the remote one and vice versa. Each file
is read once (hashed and checked from the same bytes), in concurrent batches: object stores
answer one request at a time slowly but many at once well.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator

from tasks.data.images import IMAGE_EXTENSIONS, check_image
from tasks.data.scan import (
    IGNORED_FOLDERS,
    SPLIT_NAMES,
    SPLIT_ORDER,
    DatasetError,
    ImageRecord,
    Manifest,
    Skipped,
    _drop_untrained_classes,
    _no_images_error,
    finish_manifest,
    uses_splits,
)

READ_BATCH = 64  # files fetched concurrently per request batch


def _unusable(part: str, is_folder: bool) -> str | None:
    """Why a key part (a 'folder' or the file name) leaves the file out, as a local scan says."""
    what = "folder (not scanned)" if is_folder else "file"
    if part.startswith("."):
        return f"hidden {what}"
    if is_folder and part in IGNORED_FOLDERS:
        return "macOS archive metadata folder (not scanned)"
    return None


def _layout(
    files: list[str], skipped: list[Skipped], warnings: list[str]
) -> tuple[dict[tuple[str, str], list[str]], int]:
    """(split, class) -> relative file paths, and the image files outside any class folder.

    Object stores have no folders, only keys: the folders are the keys' prefixes.
    """
    usable: list[list[str]] = []
    reported: set[str] = set()
    for rel in files:
        parts = rel.split("/")
        for depth, part in enumerate(parts):
            reason = _unusable(part, depth < len(parts) - 1)
            if reason:
                where = "/".join(parts[: depth + 1])
                if where not in reported:
                    reported.add(where)
                    skipped.append(Skipped(where, reason))
                break
        else:
            usable.append(parts)
    top = sorted({parts[0] for parts in usable if len(parts) > 1})
    splits = uses_splits(top, warnings)
    depth = 2 if splits else 1  # parts before the file name: (split,) class
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    stray = 0
    for parts in usable:
        rel = "/".join(parts)
        if len(parts) <= depth:
            skipped.append(Skipped(rel, "not inside a class folder"))
            stray += parts[-1].lower().endswith(tuple(IMAGE_EXTENSIONS))
        elif not parts[-1].lower().endswith(tuple(IMAGE_EXTENSIONS)):
            suffix = parts[-1].rsplit(".", 1)[1] if "." in parts[-1] else ""
            reason = f"not an image extension ({'.' + suffix if suffix else 'none'})"
            skipped.append(Skipped(rel, reason))
        else:
            split = SPLIT_NAMES[parts[0].lower()] if splits else "all"
            groups[(split, parts[depth - 1])].append(rel)
    return groups, stray


def _read(fs, paths: list[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """(path, bytes or the error) for each path, fetched in concurrent batches."""
    for start in range(0, len(paths), READ_BATCH):
        batch = paths[start : start + READ_BATCH]
        contents = fs.cat(batch, on_error="return")
        for path in batch:
            yield path, contents.get(path, FileNotFoundError(path))


def _examined(
    fs, root: str, rels: list[str], progress: Callable[[int], None] | None
) -> list[tuple[str, str, int, str | None]]:
    """(sha256, relative path, size, why unusable or None) per readable file, in hash order."""
    found = []
    for path, data in _read(fs, [f"{root}/{rel}" for rel in rels]):
        rel = path[len(root) + 1 :]
        if progress:
            progress(1)
        if isinstance(data, Exception):
            found.append(("", rel, 0, f"cannot read: {data}"))
            continue
        found.append((hashlib.sha256(data).hexdigest(), rel, len(data), check_image(data)))
    return sorted(found)


def scan_url(
    url: str, limit_per_class: int | None = None, progress: Callable[[int], None] | None = None
) -> Manifest:
    """The manifest of an image tree under `url`; record paths are relative to it, so the key
    equals that of the same files in a local folder (`scan`)."""
    import fsspec

    url = url.rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        files = sorted(path[len(root) + 1 :] for path in fs.find(root, withdirs=False))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot list dataset {url}: {error}") from error
    if not files:
        raise DatasetError(f"dataset folder not found (or empty): {url}")
    skipped: list[Skipped] = []
    warnings: list[str] = []
    groups, stray = _layout(files, skipped, warnings)
    if not groups:
        raise _no_images_error(url, skipped, stray, any_candidates=False)
    records: list[ImageRecord] = []
    for split, label in sorted(groups, key=lambda g: (SPLIT_ORDER.index(g[0]), g[1])):
        kept = 0
        for digest, rel, size, reason in _examined(fs, root, groups[(split, label)], progress):
            if limit_per_class is not None and kept >= limit_per_class:
                break
            if reason:
                skipped.append(Skipped(rel, reason))
                continue
            records.append(ImageRecord(rel, label, split, size, digest))
            kept += 1
    records = _drop_untrained_classes(records, skipped)
    if not records:
        raise _no_images_error(url, skipped, stray, any_candidates=True)
    return finish_manifest(url, records, skipped, warnings)
