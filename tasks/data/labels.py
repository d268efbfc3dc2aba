"""Labels from a CSV file (`path,label[,split][,group]`) instead of class folders.

Many datasets come as one folder of images plus a table of file name and label (competition
downloads, lab exports). The manifest is built by the same code as a folder scan, so the same
files with the same labels and splits get the same manifest key, hence the same cached features.
An optional `group` column names what images belong together (augmented copies of one photo,
one patient): `--split grouped` keeps each group on one side. A table without it keeps the key
it had before groups existed.

Mistakes in the table (missing columns, empty labels or groups, bad split values, duplicated or
missing files, paths outside the folder) are errors with one line each: a silently wrong label costs
more than a fixed CSV. Image files in the folder that the table does not list are left out with
a warning that counts them (a table often covers part of a download, e.g. without its unlabelled
test images). Listed files that exist but are unusable are skipped with a reason, as in a scan.
"""

from __future__ import annotations

import csv
import os
import stat
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasks.data.images import IMAGE_EXTENSIONS
from tasks.data.scan import (
    SPLIT_NAMES,
    DatasetError,
    ImageRecord,
    Manifest,
    Skipped,
    _check_root,
    _display,
    _examples,
    _no_images_error,
    _stat,
    _walk_files,
    finish_manifest,
    grouped_records,
)

PATH_COLUMNS = ("path", "file", "filename")
LABEL_COLUMNS = ("label", "class")
SPLIT_COLUMN = "split"
GROUP_COLUMN = "group"


class LabelsError(DatasetError):
    """The labels file cannot be used as it is; the message names the rows to fix."""


@dataclass(frozen=True)
class LabelRow:
    """One row of the table: a file relative to the dataset folder, its class, split and
    group (None when the table has no group column)."""

    line: int
    path: str
    label: str
    split: str
    group: str | None = None


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [name.strip().lower() for name in header]
    return next((lowered.index(name) for name in names if name in lowered), None)


def _rows_where(rows: list[tuple[int, str]], what: str, csv_path: Path) -> LabelsError:
    """One error line for every row with the same problem, naming the first few lines."""
    lines = _examples([f"line {line} ({value!r})" for line, value in rows])
    count = f"{len(rows)} row" if len(rows) == 1 else f"{len(rows)} rows"
    return LabelsError(f"labels file {csv_path}: {what} on {count}: {lines}")


def _relative(cell: str) -> str | None:
    """The cell as a POSIX path inside the folder, or None if it would leave it."""
    path = PurePosixPath(cell.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.as_posix()


def _read_table(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, cells) rows; blank lines are ignored."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {csv_path}") from None
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {csv_path} is not UTF-8 text (a CSV is)") from None
    except (OSError, csv.Error) as error:
        raise LabelsError(f"cannot read labels file {csv_path}: {error}") from None
    if not header:
        raise LabelsError(f"labels file {csv_path} is empty: expected a header `path,label`")
    return header, rows


def read_labels(csv_path: Path, root: Path) -> list[LabelRow]:
    """Read and check the table; every listed file must exist below `root`.

    Cheap (no file is opened but the CSV), so commands run it before starting any work.
    """
    csv_path, root = Path(csv_path).expanduser(), Path(root).expanduser()
    header, table = _read_table(csv_path)
    path_at, label_at = _column(header, PATH_COLUMNS), _column(header, LABEL_COLUMNS)
    split_at = _column(header, (SPLIT_COLUMN,))
    group_at = _column(header, (GROUP_COLUMN,))
    if path_at is None or label_at is None:
        raise LabelsError(
            f"labels file {csv_path} needs a column path (or file, filename) and a column "
            f"label (or class), optionally split and group; its header is: {', '.join(header)}"
        )

    def cell(cells: list[str], at: int | None) -> str:
        return cells[at].strip() if at is not None and at < len(cells) else ""

    rows, outside, no_label, bad_split, no_group = [], [], [], [], []
    for line, cells in table:
        raw, label, split = cell(cells, path_at), cell(cells, label_at), cell(cells, split_at)
        group = cell(cells, group_at) if group_at is not None else None
        path = _relative(raw)
        if path is None:
            outside.append((line, raw))
        elif not label:
            no_label.append((line, raw))
        elif split_at is not None and split.lower() not in SPLIT_NAMES:
            bad_split.append((line, split))
        elif group == "":  # a group left out would silently make a group of its own
            no_group.append((line, raw))
        else:
            split_name = SPLIT_NAMES[split.lower()] if split_at is not None else "all"
            rows.append(LabelRow(line, path, label, split_name, group))
    if outside:
        raise _rows_where(outside, f"empty path or a path outside {root}", csv_path)
    if no_label:
        raise _rows_where(no_label, "empty label", csv_path)
    if bad_split:
        raise _rows_where(bad_split, "split other than train, valid or test", csv_path)
    if no_group:
        raise _rows_where(no_group, "empty group (the table has a group column)", csv_path)
    seen: dict[str, int] = {}
    repeated = []
    for row in rows:
        if row.path in seen:
            repeated.append((row.line, f"{row.path}, first on line {seen[row.path]}"))
        seen.setdefault(row.path, row.line)
    if repeated:
        raise _rows_where(repeated, "file listed a second time", csv_path)
    missing = [(row.line, row.path) for row in rows if not os.path.lexists(root / row.path)]
    if missing:
        raise _rows_where(missing, f"file not found in {root}", csv_path)
    if not rows:
        raise LabelsError(f"labels file {csv_path} lists no files")
    return rows


def _unusable(path: Path) -> str | None:
    """Why a listed, existing file is not an image file, said as a folder scan says it."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image extension ({path.suffix or 'none'})"
    info = _stat(path)
    if isinstance(info, str):
        return info
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def _unlisted_warning(root: Path, listed: set[str], csv_path: Path) -> list[str]:
    """The image files below `root` that the table leaves out, counted in one warning."""
    info = root.stat()
    found = _walk_files((root, frozenset({(info.st_dev, info.st_ino)})), root, [])
    unlisted = [rel for path in found if (rel := _display(path, root)) not in listed]
    if not unlisted:
        return []
    return [
        f"{len(unlisted)} image files in {root} are not in {csv_path.name} and were left "
        f"out: {_examples(unlisted)}"
    ]


def _split_groups_warning(records: list[ImageRecord]) -> list[str]:
    """Groups the table's own split column puts in both training and test: a leak that
    `--split folder` (or auto) would measure as accuracy."""
    sides: dict[str, set[bool]] = defaultdict(set)
    for record in records:
        if record.group is not None:
            sides[record.group].add(record.split == "test")
    leaked = sorted(group for group, seen in sides.items() if len(seen) > 1)
    if not leaked:
        return []
    return [
        f"{len(leaked)} groups have images in both the training and the test split of the "
        f"labels file, which inflates test accuracy: {_examples(leaked)}"
    ]


def scan_labels(
    root: str | Path,
    csv_path: str | Path,
    limit_per_class: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """The manifest of the files a labels table lists, as `scan` builds it for folders."""
    root = Path(root).expanduser().resolve()
    csv_path = Path(csv_path).expanduser()
    _check_root(root)
    rows = read_labels(csv_path, root)
    skipped: list[Skipped] = []
    by_class: dict[tuple[str, str], list[Path]] = defaultdict(list)
    group_of: dict[Path, str] = {}
    for row in rows:
        reason = _unusable(root / row.path)
        if reason:
            skipped.append(Skipped(row.path, reason))
        else:
            by_class[(row.split, row.label)].append(root / row.path)
            if row.group is not None:
                group_of[root / row.path] = row.group
    records = grouped_records(
        by_class, root, skipped, limit_per_class, progress, group_of if group_of else None
    )
    if not records:
        raise _no_images_error(root, skipped, 0, any_candidates=True)
    warnings = _unlisted_warning(root, {row.path for row in rows}, csv_path)
    warnings += _split_groups_warning(records)
    return finish_manifest(root, records, skipped, warnings)
